"""Synthetic patients, the training loop, its checkpoints and the compact model's weights file."""

import json
import os

import pytest
import torch

from helpers import random_network, randomize_
from mgr_engine import engine as engine_module
from mgr_engine import train
from mgr_engine.errors import InvalidOptionError, WeightsNotFoundError
from mgr_engine.losses import lncc2_loss
from mgr_engine.model import GradICONNetwork, NetworkConfig, read_safetensors, save_safetensors
from mgr_engine.ops import identity_map
from mgr_engine.preprocess import normalize_intensity

pytest.importorskip("nilearn")
from mgr_engine import synth  # noqa: E402

SHAPE = (32, 32, 32)
TINY = dict(input_shape=SHAPE, down_channels=(2, 4, 8, 8), up_channels=(4, 8, 8))


def tiny_options(**overrides):
    return {**TINY, "batch_size": 1, "lr": 1e-3, "log_every": 1, "save_every": 100, **overrides}


# ---------------------------------------------------------------- synthesis

def test_template_files_read_without_nibabel(tmp_path, monkeypatch):
    nibabel = pytest.importorskip("nibabel")
    import numpy as np
    import shutil

    from mgr_engine.errors import MissingDependencyError

    folder = synth.template_dir()
    for name in synth.TEMPLATE_FILES.values():
        assert np.array_equal(synth.read_nifti(folder / name), np.asarray(nibabel.load(str(folder / name)).dataobj))
        shutil.copy(folder / name, tmp_path / name)
    reference = synth.load_template((20, 20, 20))
    synth.load_template.cache_clear()
    monkeypatch.setenv("MGR_ENGINE_TEMPLATE_DIR", str(tmp_path))
    assert synth.template_dir() == tmp_path
    assert torch.equal(synth.load_template((20, 20, 20))["tissue"], reference["tissue"])
    synth.load_template.cache_clear()
    (tmp_path / synth.TEMPLATE_FILES["wm"]).unlink()
    with pytest.raises(MissingDependencyError, match="lacks"):
        synth.load_template((20, 20, 20))
    synth.load_template.cache_clear()


def test_brain_patient_is_deterministic_and_seeds_differ():
    a, b, c = synth.brain_patient(7, SHAPE), synth.brain_patient(7, SHAPE), synth.brain_patient(8, SHAPE)
    assert torch.equal(a.labels, b.labels)
    for contrast in ("t1", "t2", "rand0"):
        assert torch.equal(a.image(contrast), b.image(contrast))
    assert not torch.equal(a.labels, c.labels)
    assert not torch.equal(a.image("t2"), c.image("t2"))
    assert not torch.equal(a.image("rand0"), a.image("rand1"))


def test_brain_patient_shapes_ranges_and_labels():
    patient = synth.brain_patient(3, SHAPE)
    assert patient.labels.shape == SHAPE and patient.labels.dtype == torch.uint8
    assert set(patient.labels.unique().tolist()) == {0, 1, 2, 3}
    assert torch.allclose(patient.tissue.sum(1), torch.ones(1, *SHAPE), atol=1e-5)
    for contrast in patient.contrasts:
        image = patient.image(contrast)
        assert image.shape == (1, 1, *SHAPE) and image.dtype == torch.float32
        assert float(image.min()) == 0.0 and float(image.max()) == 1.0
        assert image.std() > 0.1
    with pytest.raises(ValueError):
        patient.image("ct")


def _mean_by_label(patient, contrast):
    image = patient.image(contrast)[0, 0]
    return [float(image[patient.labels == label].mean()) for label in range(4)]


@pytest.mark.parametrize("seed", [0, 5])
def test_one_label_map_fits_every_contrast(seed):
    """Each contrast's tissue intensities order as its table says, on the patient's one label
    map: the contrasts are aligned renderings of the same anatomy."""
    patient = synth.brain_patient(seed, (48, 48, 48))
    background, csf, gm, wm = _mean_by_label(patient, "t1")
    assert wm > gm > csf > background
    background, csf, gm, wm = _mean_by_label(patient, "t2")
    assert csf > gm > wm > background
    background, csf, gm, wm = _mean_by_label(patient, "flair")  # CSF suppressed; GM vs WM blurs with partial volume
    assert min(gm, wm) > csf > background


def test_patients_differ_by_a_smooth_deformation():
    a, b = synth.brain_patient(1, SHAPE), synth.brain_patient(2, SHAPE)
    overlap = train.dice(a.labels, b.labels, 3)
    assert 0.2 < overlap < 0.95  # the same anatomy, moved
    displacement = synth.random_diffeomorphism((48, 48, 48), torch.Generator().manual_seed(0), scale=0.045)
    identity = identity_map((48, 48, 48))
    assert train.negative_jacobian_percent(identity + displacement) == 0.0
    assert 0.5 < float((displacement * 47).norm(dim=1).mean()) < 5


def test_shapes_family_pairs_share_labels():
    a = synth.shapes_patient(1, SHAPE, family=9)
    b = synth.shapes_patient(2, SHAPE, family=9)
    assert torch.equal(a.labels, synth.shapes_patient(1, SHAPE, family=9).labels)
    assert not torch.equal(a.labels, b.labels)
    shared = set(a.labels.unique().tolist()) & set(b.labels.unique().tolist())
    assert len(shared) >= 5
    assert torch.equal(a.image("rand2"), synth.shapes_patient(1, SHAPE, family=9).image("rand2"))


def test_ct_contrasts_are_opt_in_and_leave_the_mri_contrasts_unchanged():
    plain, with_ct = synth.brain_patient(7, SHAPE), synth.brain_patient(7, SHAPE, ct=True)
    assert "ct" not in plain.contrasts
    assert with_ct.contrasts == synth.BRAIN_CONTRASTS + synth.CT_CONTRASTS
    for contrast in synth.BRAIN_CONTRASTS:
        assert torch.equal(plain.image(contrast), with_ct.image(contrast))
    ct = with_ct.image("ct")
    assert torch.equal(with_ct.image("ct_inverted"), 1.0 - ct)
    assert ct.min() >= 0 and ct.max() <= 1
    labels = with_ct.labels
    brain = ct[0, 0][labels > 0]
    # Tissues sit a few HU above water in the [-1000, 1000] window: about 0.5, nearly flat.
    assert 0.48 < float(brain.median()) < 0.54 and float(brain.std()) < 0.05
    # Air far from the head is about 0; the bone shell around the brain is bright.
    assert float(ct[0, 0, :2].mean()) < 0.05
    assert float((ct[0, 0][labels == 0] > 0.8).float().mean()) > 0.05
    with pytest.raises(ValueError, match="ct"):
        plain.image("ct")


def test_training_with_ct_draws_the_ct_contrasts():
    config = train.TrainConfig(**tiny_options(variant="mono", ct=True, shapes_fraction=0.0, augment=False)).check()
    gen = torch.Generator().manual_seed(2)
    drawn = {train.make_batch(config, gen)["contrasts"][0][1] for _ in range(24)}
    assert drawn & set(synth.CT_CONTRASTS)
    gen = torch.Generator().manual_seed(2)
    plain = train.TrainConfig(**tiny_options(variant="mono", shapes_fraction=0.0, augment=False)).check()
    assert not {train.make_batch(plain, gen)["contrasts"][0][1] for _ in range(24)} & set(synth.CT_CONTRASTS)


def test_training_never_draws_held_out_seeds():
    gen = torch.Generator().manual_seed(0)
    seeds = []
    for _ in range(6):
        a, b = synth.training_pair(gen, SHAPE, shapes_fraction=0.5)
        assert a.kind == b.kind and a.family == b.family
        seeds += [a.seed, b.seed]
    assert max(seeds) < synth.HOLDOUT_START
    held_out = list(synth.evaluation_pairs(2, SHAPE))
    assert [p.seed for pair in held_out for p in pair] == [synth.HOLDOUT_START + i for i in range(4)]


# ---------------------------------------------------------------- sampling and augmentation

def _draws(variant, n=400):
    gen = torch.Generator().manual_seed(1)
    return [train.choose_contrasts(variant, synth.BRAIN_CONTRASTS, gen) for _ in range(n)]


def test_variant_b_uses_the_inputs_for_the_loss():
    draws = _draws("B")
    assert all(loss_a == in_a and loss_b == in_b for in_a, in_b, loss_a, loss_b in draws)
    assert sum(in_a != in_b for in_a, in_b, _, _ in draws) > 250  # inputs multimodal about 5/6 of the time


def test_variant_f_uses_one_contrast_for_both_loss_images():
    draws = _draws("F")
    assert all(loss_a == loss_b for _, _, loss_a, loss_b in draws)
    assert sum(loss_a != in_a for in_a, _, loss_a, _ in draws) > 250  # drawn anew, not the input
    assert {loss_a for _, _, loss_a, _ in draws} == set(synth.BRAIN_CONTRASTS)


def test_variant_r_draws_each_loss_image_independently():
    draws = _draws("R")
    assert sum(loss_a != loss_b for _, _, loss_a, loss_b in draws) > 250
    assert sum(loss_a != in_a for in_a, _, loss_a, _ in draws) > 250
    counts = {name: sum(d[3] == name for d in draws) for name in synth.BRAIN_CONTRASTS}
    assert min(counts.values()) > 30  # roughly uniform: 400 / 6 = 67 expected


def test_variant_mono_is_monomodal():
    draws = _draws("mono")
    assert all(len(set(d)) == 1 for d in draws)
    assert {d[0] for d in draws} == set(synth.BRAIN_CONTRASTS)
    with pytest.raises(InvalidOptionError):
        train.choose_contrasts("X", synth.BRAIN_CONTRASTS, torch.Generator())


def test_augmentation_flips_both_sides_alike_and_moves_loss_images_with_inputs():
    volume = torch.rand(2, 2, 16, 16, 16)
    volume[:, 1] = volume[:, 0] * 2  # the "loss image" channel: a function of the input channel
    a, b = train.augment(volume, volume.clone(), torch.Generator().manual_seed(3), noise=0.0)
    assert torch.allclose(a, b)  # without affine noise both sides share the axis permutation and flips
    assert torch.allclose(a[:, 1], a[:, 0] * 2, atol=1e-5)
    candidates = []
    for perm in ((2, 3, 4), (2, 4, 3), (3, 2, 4), (3, 4, 2), (4, 2, 3), (4, 3, 2)):
        permuted = volume[:1].permute(0, 1, *perm)
        for dims in ([], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]):
            candidates.append(permuted.flip(dims) if dims else permuted)
    assert any(torch.allclose(a[:1], c, atol=1e-5) for c in candidates)
    noisy, _ = train.augment(volume, volume.clone(), torch.Generator().manual_seed(3), noise=0.05)
    assert not any(torch.allclose(noisy[:1], c, atol=1e-3) for c in candidates)


# ---------------------------------------------------------------- objective and steps

def test_objective_compares_the_loss_images_through_the_inputs_maps():
    net = randomize_(GradICONNetwork(NetworkConfig(SHAPE, (2, 4, 8, 8), (4, 8, 8))), 2, 0.2).eval()
    moving, fixed = synth.brain_patient(1, SHAPE), synth.brain_patient(2, SHAPE)
    inputs = moving.image("t1"), fixed.image("t2")
    losses = moving.image("flair"), fixed.image("pd")
    with torch.no_grad():
        plain, phi_ab, phi_ba = engine_module.gradicon_objective(
            net, *inputs, lncc2_loss, generator=torch.Generator().manual_seed(0))
        same, _, _ = engine_module.gradicon_objective(
            net, *inputs, lncc2_loss, generator=torch.Generator().manual_seed(0), loss_moving=inputs[0],
            loss_fixed=inputs[1])
        randomized, _, _ = engine_module.gradicon_objective(
            net, *inputs, lncc2_loss, generator=torch.Generator().manual_seed(0), loss_moving=losses[0],
            loss_fixed=losses[1])

        def similarity(a, b):
            return lncc2_loss(engine_module.warp(a, phi_ab), b) + lncc2_loss(engine_module.warp(b, phi_ba), a)

    assert torch.equal(plain, same)
    expected = plain - similarity(*inputs) + similarity(*losses)
    torch.testing.assert_close(randomized, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(randomized - plain)) > 1e-3


def test_training_steps_reduce_the_loss_on_a_fixed_pair():
    config = train.TrainConfig(**tiny_options(augment=False, variant="B")).check()
    net = GradICONNetwork(config.network_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    moving, fixed = synth.brain_patient(1, SHAPE), synth.brain_patient(2, SHAPE)
    batch = {"moving": moving.image("t1"), "fixed": fixed.image("t1"),
             "loss_moving": moving.image("t1"), "loss_fixed": fixed.image("t1")}
    gen = torch.Generator().manual_seed(0)
    losses = [train.training_step(net, optimizer, batch, config, gen)["similarity"] for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.02, losses
    assert net.training  # BatchNorm in train mode during steps, as icon_registration trains


def test_first_stage_leaves_the_last_unet_out():
    config = train.TrainConfig(**tiny_options())
    net = GradICONNetwork(config.network_config())
    net.last_unet = False
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batch = train.make_batch(config, torch.Generator().manual_seed(0))
    train.training_step(net, optimizer, batch, config, torch.Generator().manual_seed(1))
    assert all(p.grad is None for p in net.unets[3].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.unets[2].parameters())
    fields = net.displacement_fields(batch["moving"], batch["fixed"])
    assert torch.count_nonzero(fields[3]) == 0


def test_mixed_precision_step_keeps_maps_float32():
    config = train.TrainConfig(**tiny_options())
    net = GradICONNetwork(config.network_config())
    net.unet_autocast = torch.bfloat16
    batch = train.make_batch(config, torch.Generator().manual_seed(0))
    terms = train.training_step(net, torch.optim.Adam(net.parameters(), lr=1e-3), batch, config,
                                torch.Generator().manual_seed(1))
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert net(batch["moving"], batch["fixed"]).dtype == torch.float32


# ---------------------------------------------------------------- checkpoints and the weights file

def test_resumed_training_continues_identically(tmp_path):
    straight = train.train(tmp_path / "straight", tiny_options(steps=4, last_unet_from=2), device="cpu")
    train.train(tmp_path / "resumed", tiny_options(steps=3, last_unet_from=2), device="cpu")
    resumed = train.train(tmp_path / "resumed", {"steps": 4}, device="cpu")
    assert resumed == {**straight, "seconds": resumed["seconds"]}
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key, value in a["network"].items():
        assert torch.equal(value, b["network"][key]), key
    assert torch.equal(a["generator"], b["generator"])
    logged = [json.loads(line)["loss"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert logged == [json.loads(line)["loss"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]


def test_resuming_refuses_another_configuration(tmp_path):
    train.train(tmp_path, tiny_options(steps=1), device="cpu")
    with pytest.raises(InvalidOptionError, match="lmbda"):
        train.train(tmp_path, {"steps": 2, "lmbda": 1.0}, device="cpu")
    with pytest.raises(InvalidOptionError, match="unknown"):
        train.train(tmp_path, {"stepz": 2}, device="cpu")


@pytest.mark.parametrize("options, named", [
    ({"save_every": 0, "log_every": 0}, r"save_every 0 \(needs >= 1\); log_every 0 \(needs >= 1\)"),
    ({"lmbda": -1.0}, r"lmbda -1.0 \(needs >= 0\)"),
    ({"eval_every": 5, "eval_pairs": 0}, r"eval_pairs 0 \(needs >= 1 where eval_every > 0\)"),
    ({"steps": -1, "batch_size": 0}, r"steps -1 \(needs >= 0\); batch_size 0 \(needs >= 1\)"),
])
def test_options_out_of_range_are_named_before_a_step(tmp_path, options, named):
    """save_every or log_every of 0 was a ZeroDivisionError after the first step; a negative
    GradICON weight trained; one message named four options at once."""
    from mgr_engine import cli

    with pytest.raises(InvalidOptionError, match="training options out of range: " + named):
        train.train(tmp_path, tiny_options(**options), device="cpu")
    assert not (tmp_path / train.LOG_FILE).exists()
    assert cli.main(["train", "--run_dir", str(tmp_path / "cli"), "--max_minutes", "0"]) == 2
    assert train.train(tmp_path / "none", tiny_options(steps=0), device="cpu") == {"step": 0}  # was {}


def test_a_refused_run_leaves_no_run_directory(tmp_path):
    """The run directory was made before the options were checked: a refused new run left an
    empty folder (its name then looked like a run to resume)."""
    with pytest.raises(InvalidOptionError, match="too small"):
        train.train(tmp_path / "small" / "run", tiny_options(input_shape=(8, 8, 8), steps=0), device="cpu")
    with pytest.raises(InvalidOptionError, match="out of range"):
        train.train(tmp_path / "range", tiny_options(lmbda=-1.0, steps=0), device="cpu")
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidOptionError, match="is a file; give a directory"):
        train.train(tmp_path / "file", tiny_options(steps=0), device="cpu")


def test_resuming_a_run_past_its_steps_says_there_is_no_step_to_take(tmp_path, caplog):
    train.train(tmp_path, tiny_options(steps=2), device="cpu")
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert train.train(tmp_path, {"steps": 1}, device="cpu") == {"step": 2}
    assert "is at step 2 already, 1 asked for: no step to take" in caplog.text
    assert "resumed" not in caplog.text  # was "resumed ... at step 2 of 1"


def test_resuming_with_a_new_learning_rate_applies_it(tmp_path):
    train.train(tmp_path, tiny_options(steps=1, lr=1e-3), device="cpu")
    train.train(tmp_path, {"steps": 2, "lr": 2e-4}, device="cpu")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["lr"] == 2e-4
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [2e-4]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 2e-4


def test_a_new_run_can_start_from_weights(tmp_path):
    train.train(tmp_path / "first", tiny_options(steps=2), device="cpu")
    weights = tmp_path / "first" / train.WEIGHTS_FILE
    train.train(tmp_path / "second", tiny_options(steps=0), device="cpu", init_weights=weights)
    first, _, _ = read_safetensors(weights)
    second, _, _ = read_safetensors(tmp_path / "second" / train.WEIGHTS_FILE)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
    with pytest.raises(InvalidOptionError, match="init_weights"):
        train.train(tmp_path / "third", tiny_options(steps=0, up_channels=(4, 8, 4)), device="cpu",
                    init_weights=weights)


def test_cli_train_writes_weights_the_engine_loads(tmp_path):
    from mgr_engine import Engine, cli

    run = tmp_path / "run"
    argv = ["train", "--run_dir", str(run), "--steps", "1", "--input_shape", *map(str, SHAPE),
            "--down_channels", "2", "4", "8", "8", "--up_channels", "4", "8", "8", "--batch_size", "1", "--device", "cpu"]
    assert cli.main(argv) == 0
    engine = Engine(model="compact", weights=run / "compact.safetensors", device="cpu")
    assert engine.config == NetworkConfig(SHAPE, (2, 4, 8, 8), (4, 8, 8))
    _, _, metadata = read_safetensors(run / "compact.safetensors")
    assert json.loads(metadata["training"])["step"] == 1
    assert json.loads(metadata["preprocessing"]) == train.PREPROCESSING


def test_compact_without_bundled_weights_says_it_is_untrained(tmp_path, monkeypatch):
    monkeypatch.setitem(engine_module.BUNDLED_WEIGHTS, "compact", tmp_path / "compact.safetensors")
    with pytest.raises(WeightsNotFoundError, match="has not been trained yet"):
        engine_module.Engine(model="compact", device="cpu")


def test_safetensors_roundtrip(tmp_path):
    net = random_network((72, 72, 72), narrow=True, seed=3, displacement_scale=0.3)
    path = save_safetensors(net, tmp_path / "w.safetensors", half=False, metadata={"note": "x"})
    state, config, metadata = read_safetensors(path)
    assert config == net.config and metadata["note"] == "x"
    reloaded = GradICONNetwork(config)
    engine_module.load_official_state_dict(reloaded, state)
    for key, value in net.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key

    half = save_safetensors(net, tmp_path / "h.safetensors")
    assert half.stat().st_size < 0.6 * path.stat().st_size
    umask = os.umask(0o027)
    try:  # readable by others as the umask allows (safetensors alone writes 0600)
        assert save_safetensors(net, tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    engine = engine_module.Engine(model="compact", weights=half, device="cpu")
    moving = torch.rand(1, 1, 72, 72, 72)
    fixed = torch.rand(1, 1, 72, 72, 72)
    with torch.no_grad():
        expected = net(moving, fixed)
    got = engine.predict_map(moving, fixed)
    assert (got - expected).abs().max() * 71 < 0.05  # float16 convolutions: under 0.05 voxel
    assert (expected - identity_map((72, 72, 72))).abs().max() * 71 > 0.5  # the network moves points


def test_the_log_names_the_network_a_safetensors_file_brings(caplog):
    """A .safetensors file carries its network's configuration, which the engine takes over the
    named model's: the log said "loaded multigradicon weights" for the compact model's file."""
    import logging

    bundled = engine_module.BUNDLED_WEIGHTS["compact"]
    with caplog.at_level(logging.INFO, logger="mgr_engine"):
        engine_module.Engine(model="compact", device="cpu")
        engine_module.Engine(weights=bundled, device="cpu")
    assert f"loaded compact weights from {bundled} on cpu" in caplog.text
    assert f"loaded weights from {bundled} on cpu into a network of input 64x64x64, not multigradicon's" in caplog.text
    assert "loaded multigradicon weights" not in caplog.text


def test_compact_config_is_under_20_megabytes(tmp_path):
    net = GradICONNetwork(engine_module.COMPACT_CONFIG)
    path = train.export_weights(net, tmp_path / "compact.safetensors")
    assert path.stat().st_size < 20e6
    assert engine_module.Engine(model="compact", weights=path, device="cpu").input_shape == (64, 64, 64)


def test_weights_file_preprocessing_defaults_apply(tmp_path):
    net = random_network((72, 72, 72), narrow=True, seed=3)
    path = save_safetensors(net, tmp_path / "w.safetensors",
                            metadata={"preprocessing": json.dumps({"mri_quantile_range": [0.0, 0.5]})})
    engine = engine_module.Engine(model="compact", weights=path, device="cpu")
    import itk
    import numpy as np

    array = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    out = engine.preprocess(itk.image_from_array(array), "mri", name="x")
    expected = normalize_intensity(array, "mri", quantile_range=(0.0, 0.5))
    default = normalize_intensity(array, "mri")
    from mgr_engine.preprocess import resize

    torch.testing.assert_close(out, resize(expected, (72, 72, 72))[None, None])
    assert not torch.allclose(out, resize(default, (72, 72, 72))[None, None])


# ---------------------------------------------------------------- evaluation helpers

def test_evaluation_helpers():
    identity = identity_map(SHAPE)
    patient = synth.brain_patient(4, SHAPE)
    assert torch.equal(train.warp_labels(patient.labels, identity), patient.labels)
    assert train.dice(patient.labels, patient.labels, 2) == 1.0
    assert train.negative_jacobian_percent(identity) == 0.0
    flipped = identity.clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    assert train.negative_jacobian_percent(flipped) == 100.0
    results = train.evaluate_pairs(lambda m, f: identity, [(patient, patient)], [("t1", "t2")])
    assert results["t1/t2"]["after"] == {1: 1.0, 2: 1.0, 3: 1.0}
