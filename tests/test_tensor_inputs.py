"""Tensors given straight to ``Engine.predict_map`` and ``Engine.instance_optimize`` (a real-time
pipeline's way in): other floating dtypes and arrays computed as float32, wrong shapes, dtypes,
NaN voxels, masks and options refused with typed errors that say what to give; the engine's
weights and network configuration given as Python objects (state dicts, dicts of fields)."""

import logging

import numpy as np
import pytest
import torch

from helpers import smooth_volume
from mgr_engine import Engine
from mgr_engine.errors import InvalidImageError, InvalidOptionError


@pytest.fixture(scope="module")
def engine():
    return Engine(model="compact", device="cpu")


@pytest.fixture(scope="module")
def inputs(engine):
    return tuple(torch.from_numpy(smooth_volume(engine.input_shape, seed)).clamp(0, 1)[None, None] for seed in (1, 2))


def test_other_floating_dtypes_and_arrays_give_the_float32_map(engine, inputs):
    moving, fixed = inputs
    expected = engine.predict_map(moving, fixed)
    assert expected.dtype == torch.float32
    for given in ((moving.double(), fixed.double()), (moving.numpy(), fixed.numpy()),
                  (moving.numpy().astype(np.float64), fixed.numpy())):
        torch.testing.assert_close(engine.predict_map(*given), expected)
    # bfloat16 rounds the intensities themselves: the same map within that rounding
    halves = engine.predict_map(moving.bfloat16(), fixed.bfloat16())
    assert halves.dtype == torch.float32 and (halves - expected).abs().max() < 0.02


def grid(engine):
    return ", ".join(map(str, engine.input_shape))


@pytest.mark.parametrize("make, message", [
    (lambda m: m[0, 0], r"got \(64, 64, 64\) \(tensor\[None, None\] adds the batch and channel axes\)"),
    (lambda m: m[0], r"got \(1, 64, 64, 64\); images of other sizes go through Engine.preprocess"),
    (lambda m: m[..., :32], r"got \(1, 1, 64, 64, 32\)"),
    (lambda m: m.expand(1, 2, -1, -1, -1), r"got \(1, 2, 64, 64, 64\)"),
    (lambda m: (m * 255).to(torch.uint8), "moving is uint8: the network takes floating-point intensities"),
    (lambda m: m.clone().index_put_((torch.tensor([0]),) * 5, torch.tensor(float("nan"))),
     "moving has 1 NaN or infinite voxels"),
    (lambda m: [1, 2, 3], r"moving is a list, not a tensor: give a \(B, 1, 64, 64, 64\) torch tensor"),
    (lambda m: "moving.nii.gz", "moving is a str, not a tensor"),
])
def test_predict_map_refuses_what_is_not_a_network_input(engine, inputs, make, message):
    moving, fixed = inputs
    with pytest.raises(InvalidImageError, match=message) as caught:
        engine.predict_map(make(moving), fixed)
    if "must be" in str(caught.value):
        assert f"(B, 1, {grid(engine)})" in str(caught.value)


def test_batches_of_different_sizes_are_refused(engine, inputs):
    moving, fixed = inputs
    with pytest.raises(InvalidImageError, match="moving and fixed hold 2 and 1 volumes"):
        engine.predict_map(torch.cat([moving, moving]), fixed)


def test_values_far_outside_zero_to_one_are_warned_about_once_per_engine(inputs, caplog):
    engine = Engine(model="compact", device="cpu")
    moving, fixed = inputs
    raw_ct = moving * 2000 - 1000
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        engine.predict_map(moving, fixed)
        engine.predict_map(moving * 1.05, fixed)  # a normalization of one's own that overshoots a little
        assert not caplog.records
        engine.predict_map(raw_ct, fixed)
        engine.predict_map(raw_ct, fixed)
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 1 and "moving's values span [-998.773, 1000]" in warned[0] and "not [0, 1]" in warned[0]


def test_instance_optimization_refuses_a_nan_image_as_the_image_not_as_a_learning_rate(engine, inputs):
    moving, fixed = inputs
    nan_fixed = fixed.clone()
    nan_fixed[..., 3, 4, 5] = float("nan")
    with pytest.raises(InvalidImageError, match="fixed has 1 NaN or infinite voxels"):
        engine.instance_optimize(moving, nan_fixed, iterations=1, progress=False)


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(1, 1, 64, 64, 64), "moving_mask is empty \\(no voxel inside\\): IO would optimize the regularizer alone"),
    (torch.ones(1, 1, 32, 32, 32), r"moving_mask has shape \(1, 1, 32, 32, 32\), which does not fit"),
    (torch.full((64, 64, 64), float("nan")), "moving_mask has NaN or infinite voxels"),
])
def test_instance_optimization_refuses_loss_masks_that_would_mislead_it(engine, inputs, mask, message):
    moving, fixed = inputs
    with pytest.raises(InvalidImageError, match=message):
        engine.instance_optimize(moving, fixed, iterations=1, progress=False, moving_mask=mask)


def test_instance_optimization_refuses_a_batch_of_pairs(engine, inputs):
    """Adam on the shared weights fitted one network to both pairs: each map differed from its
    own pair's IO (by 0.2 voxel in three steps here), without a word."""
    moving, fixed = (torch.cat([tensor, tensor.flip(2)]) for tensor in inputs)
    with pytest.raises(InvalidImageError, match="adapts the network to one pair; got a batch of 2. Call it once per"):
        engine.instance_optimize(moving, fixed, iterations=1, progress=False)


def test_instance_optimization_takes_arrays_and_masks_that_broadcast(engine, inputs):
    moving, fixed = inputs
    mask = np.zeros(engine.input_shape, bool)
    mask[8:56, 8:56, 8:56] = True
    _, _, given = engine.instance_optimize(moving.numpy(), fixed.double(), iterations=1, progress=False,
                                           fixed_mask=mask, generator=torch.Generator().manual_seed(0))
    _, _, expected = engine.instance_optimize(moving, fixed, iterations=1, progress=False,
                                              fixed_mask=torch.from_numpy(mask).float()[None, None],
                                              generator=torch.Generator().manual_seed(0))
    assert given == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(lmbda=-1.0), "lmbda .* must be a finite number >= 0 .* got -1.0"),
    (dict(lmbda="1.5"), "got '1.5'"),
    (dict(lmbda=float("nan")), "got nan"),
    (dict(generator=0), r"generator must be a torch.Generator \(torch.Generator\(\).manual_seed\(seed\)\) or None, got int"),
])
def test_instance_optimization_refuses_bad_options(engine, inputs, options, message):
    with pytest.raises(InvalidOptionError, match=message):
        engine.instance_optimize(*inputs, iterations=1, progress=False, **options)


def test_preprocess_takes_what_register_takes(engine, tmp_path):
    itk = pytest.importorskip("itk")
    array = smooth_volume((30, 40, 50), seed=3) * 800 + 20
    expected = engine.preprocess(itk.image_from_array(array), "mri", name="fixed")
    assert expected.shape == (1, 1, *engine.input_shape) and 0 <= expected.min() and expected.max() <= 1
    itk.imwrite(itk.image_from_array(array), str(tmp_path / "fixed.nii.gz"))
    for given in (array, torch.from_numpy(array), tmp_path / "fixed.nii.gz", str(tmp_path / "fixed.nii.gz")):
        assert torch.equal(engine.preprocess(given, "mri", name="fixed"), expected)
    with pytest.raises(InvalidImageError, match="input array has 2 dimensions"):
        engine.preprocess(array[0], "mri")


@pytest.mark.parametrize("flag", ["compile", "io_checkpointing", "cache_host_memory"])
def test_engine_flags_given_as_strings_are_refused(flag):
    """compile="no" is truthy: it compiled the network for minutes."""
    with pytest.raises(InvalidOptionError, match=f"{flag} must be True or False, got 'no'"):
        Engine(model="compact", device="cpu", **{flag: "no"})


def test_the_network_itself_refuses_another_grid_as_a_typed_error(engine):
    """``GradICONNetwork`` used on its own (a training loop's): a plain ValueError before."""
    with torch.no_grad(), pytest.raises(InvalidImageError, match=r"network input must be \(64, 64, 64\), got "
                                                                  r"\(32, 32, 32\) and \(32, 32, 32\); Engine.preprocess"):
        engine.network(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))


def test_a_state_dict_of_arrays_loads_and_one_of_other_things_is_refused(engine):
    """NumPy arrays (weights read with safetensors.numpy) were an AttributeError; a training
    checkpoint's dict (the state dict inside, a step count beside) a KeyError-like mismatch or an
    AttributeError; a list given as weights was read as the file '[1]'."""
    from mgr_engine.errors import CheckpointError
    from mgr_engine.model import official_state_dict

    state = official_state_dict(engine.network)
    from_arrays = Engine(model="compact", weights={k: v.numpy() for k, v in state.items()}, device="cpu")
    for ours, theirs in zip(from_arrays.network.state_dict().values(), engine.network.state_dict().values()):
        assert torch.equal(ours, theirs)
    with pytest.raises(CheckpointError, match=r"the state dict's 'model', 'step' are not a tensor \(dict\)"):
        Engine(model="compact", weights={"model": state, "step": 3}, device="cpu")
    with pytest.raises(InvalidOptionError, match="weights must be a checkpoint's path or a state dict, got a list"):
        Engine(model="compact", weights=[1], device="cpu")
    import mgr_engine

    with pytest.raises(InvalidOptionError, match="got a list"):
        mgr_engine.register(np.ones((20, 20, 20)), np.ones((20, 20, 20)), model="compact", weights=[1])


def test_a_network_config_given_as_a_dict_is_taken_and_a_shape_is_refused():
    """A dict of its fields (JSON's) or a bare shape was an AttributeError deep in the network."""
    from mgr_engine.engine import COMPACT_CONFIG

    fields = {"input_shape": [64, 64, 64], "down_channels": [2, 8, 16, 32, 64], "up_channels": [8, 16, 32, 32]}
    assert Engine(model="compact", device="cpu", config=fields).config == COMPACT_CONFIG
    with pytest.raises(InvalidOptionError, match=r"got a tuple: NetworkConfig\(input_shape=...\) for a shape"):
        Engine(model="compact", device="cpu", config=(64, 64, 64))
    with pytest.raises(InvalidOptionError, match="unexpected keyword argument 'shape'; its fields are input_shape"):
        Engine(model="compact", device="cpu", config={"shape": (64, 64, 64)})
    from mgr_engine import GradICONNetwork

    assert GradICONNetwork(fields, initialize=False).config == COMPACT_CONFIG
    with pytest.raises(InvalidOptionError, match="got a tuple"):
        GradICONNetwork((64, 64, 64))


def test_warm_up_runs_the_network_and_one_io_step_and_leaves_the_weights(inputs, monkeypatch, caplog):
    """``warm_up`` (a real-time system's start-up) runs the forward for the batch size asked
    and, given a similarity, one IO step with it; the engine's weights stay the checkpoint's,
    so the next registration's map is what it would have been."""
    engine = Engine(model="compact", device="cpu")
    moving, fixed = inputs
    expected = engine.predict_map(moving, fixed)
    weights = {k: v.clone() for k, v in engine.network.state_dict().items()}
    calls = []
    for name in ("predict_map", "instance_optimize"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *args, _original=original, _name=name, **kwargs:
                            calls.append((_name, args[0].shape[0], kwargs.get("similarity"))) or _original(*args, **kwargs))
    with caplog.at_level(logging.INFO, logger="mgr_engine"):
        seconds = engine.warm_up(batch_size=2, io_sim="mind")
    assert seconds > 0 and "warm-up" in caplog.text
    assert calls == [("predict_map", 2, None), ("instance_optimize", 1, "mind")]
    assert all(torch.equal(weights[k], v) for k, v in engine.network.state_dict().items())
    assert torch.equal(engine.predict_map(moving, fixed), expected)


@pytest.mark.parametrize("options,message", [
    ({"batch_size": 0}, "batch_size 0"), ({"batch_size": True}, "batch_size True"),
    ({"io_sim": "ncc"}, "unknown similarity 'ncc'"),
])
def test_warm_up_refuses_bad_options_before_any_work(engine, options, message, monkeypatch):
    monkeypatch.setattr(engine, "predict_map", lambda *args: pytest.fail("ran before refusing"))
    with pytest.raises(InvalidOptionError, match=message):
        engine.warm_up(**options)
