"""Instance optimization: losses step by step equal to the authors' finetune_execute."""

import copy
import logging
import math

import pytest
import torch

from helpers import (cuda_sync_debug, random_network, recorded_io_precisions, reference_network, smooth_volume,
                     tensor_core_tf32x3)
from mgr_engine import Engine, ops
from mgr_engine.losses import (gradicon_regularizer, lncc2_loss, lncc_loss, mind_loss, points_with_steps,
                               regularizer_points)
from mgr_engine.model import official_state_dict

icon = pytest.importorskip("icon_registration")
from icon_registration import losses as ref_losses  # noqa: E402  (not itk_wrapper: it imports itk)

SHAPE = (72, 72, 72)
STEPS = 3
REFERENCE_SIMILARITY = {
    "lncc": lambda: icon.LNCC(sigma=5),
    "lncc2": lambda: ref_losses.SquaredLNCC(sigma=5),
    "mind": lambda: ref_losses.MINDSSC(radius=2, dilation=2),
}


def images():
    moving = torch.from_numpy(smooth_volume(SHAPE, 21))[None, None]
    fixed = torch.from_numpy(smooth_volume(SHAPE, 22))[None, None]
    return moving, fixed


def masks():
    moving_mask = torch.zeros(1, 1, *SHAPE)
    moving_mask[..., 8:60, 10:66, 5:50] = 1
    fixed_mask = torch.zeros(1, 1, *SHAPE)
    fixed_mask[..., 12:70, 4:50, 20:68] = 2  # any nonzero value counts
    return moving_mask, fixed_mask


def reference_io(net, similarity, moving, fixed, mask_kwargs, layout=torch.contiguous_format):
    # here, not at the top: it imports itk, which the GPU machine lacks (its tests here need none)
    from icon_registration import itk_wrapper

    ref = reference_network(net, loss_fn=REFERENCE_SIMILARITY[similarity](), loss_function_masking=bool(mask_kwargs))
    ref.to(memory_format=layout)
    recorded = []
    forward = ref.forward

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        recorded.append(out.all_loss.item())
        return out

    ref.forward = recording_forward
    before = copy.deepcopy(ref.state_dict())
    torch.manual_seed(1234)
    itk_wrapper.finetune_execute(ref, moving, fixed, STEPS, 2e-5, **mask_kwargs)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # restored
    return recorded, ref.phi_AB_vectorfield.detach()


# IO is compared in the reference's arithmetic: PyTorch's warp (the C++ warp that the CPU uses by
# default is held to it in float64, test_kernels_warp_cpu), and the same memory layout on both
# sides. In float32, IO's result is only defined up to rounding that Adam's first, sign-like
# steps amplify: after three steps the reference's float32 map is 0.07 voxel from its float64
# one (lncc2), and the reference run channels-last 0.057 voxel from itself run contiguous
# (masked lncc2, AMD EPYC without AVX-512, 2026-12-01; 1.9e-3 on an EPYC with AVX-512). So the
# engine's own layout, channels-last, is held to the reference run channels-last (masked; the
# masks' arithmetic does not depend on the layout, so no masked contiguous case: 30 s of CI).
@pytest.mark.parametrize("similarity,masked,layout", [
    ("lncc", False, torch.contiguous_format),
    ("lncc2", False, torch.contiguous_format),
    ("mind", False, torch.contiguous_format),
    ("lncc2", True, torch.channels_last_3d),
])
def test_io_losses_equal_reference(similarity, masked, layout):
    net = random_network(SHAPE, narrow=True, seed=4, displacement_scale=0.3)
    moving, fixed = images()
    moving_mask, fixed_mask = masks() if masked else (None, None)
    mask_kwargs = {"mask_A": moving_mask, "mask_B": fixed_mask} if masked else {}
    expected, expected_map = reference_io(net, similarity, moving, fixed, mask_kwargs, layout)

    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    engine.network.to(memory_format=layout)
    before = {k: v.clone() for k, v in engine.network.state_dict().items()}
    torch.manual_seed(1234)
    with ops.kernel_mode("torch"):
        phi_ab, phi_ba, losses = engine.instance_optimize(
            moving, fixed, iterations=STEPS, similarity=similarity, moving_mask=moving_mask, fixed_mask=fixed_mask,
            progress=False)
    assert len(losses) == STEPS + 1 == len(expected)
    assert losses[0] != losses[-1]  # the optimizer changed the weights
    # The first loss is a plain forward: it must match tightly. Our LNCC window then sums in
    # another order than the reference's conv3d (banded matrix products), and Adam's
    # normalized steps grow that: up to 4e-5 relative after three steps (masked lncc2).
    torch.testing.assert_close(losses[0], expected[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=2e-4, atol=2e-6)
    # The map: 0.03 voxel. Measured up to 4.4e-3 on 2 threads (mind: 5e-4 on 2 or 3 threads),
    # but 0.016 with OMP_NUM_THREADS=1 (mind; the others stayed below 5e-3): another split of the
    # reductions, whose rounding Adam amplifies as above (float32 against float64: 0.07), so a
    # tighter bound would pass or fail by the machine's core count. Three steps move the map by
    # 0.8 voxel (lncc, mind), one step by 0.27, so a wrong or missing step still shows.
    voxel = torch.tensor(SHAPE, dtype=torch.float32).view(1, 3, 1, 1, 1) - 1
    assert ((phi_ab - expected_map) * voxel).abs().max() < 0.03
    # the engine's weights are the checkpoint's again
    assert all(torch.equal(before[k], v) for k, v in engine.network.state_dict().items())


def test_io_changes_the_map_and_next_call_starts_from_checkpoint():
    net = random_network(SHAPE, narrow=True, seed=4, displacement_scale=0.3)
    moving, fixed = images()
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    plain = engine.predict_map(moving, fixed)
    tuned, _, _ = engine.instance_optimize(moving, fixed, iterations=2, similarity="lncc2", lr=1e-3, progress=False)
    assert (tuned - plain).abs().max() > 1e-4
    assert torch.equal(engine.predict_map(moving, fixed), plain)
    # nothing of the call stays behind: no gradients (0.26 GiB for the official network)
    assert all(p.grad is None and not p.requires_grad for p in engine.network.parameters())


def test_io_runs_under_the_precision_asked_and_refuses_bf16(monkeypatch):
    """``precision="tf32"`` puts IO's steps and final forward under the engine's TF32 section
    (cuDNN's and cuBLAS' switches on CUDA), ``"tf32x3"`` its steps (the final forward, which
    records no convolution for the split, in fp32); the default is fp32 whatever the engine's
    own precision; bf16 (the no-IO forward's autocast) is refused before any step."""
    from mgr_engine.errors import InvalidOptionError

    net = random_network(SHAPE, narrow=True, seed=4, displacement_scale=0.3)
    moving, fixed = images()
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", precision="tf32")
    sections = []
    original = engine._precision
    monkeypatch.setattr(engine, "_precision", lambda precision: sections.append(precision) or original(precision))
    engine.instance_optimize(moving, fixed, iterations=1, progress=False)
    engine.instance_optimize(moving, fixed, iterations=1, progress=False, precision="tf32")
    engine.instance_optimize(moving, fixed, iterations=1, progress=False, precision="tf32x3")
    expected = ["fp32", "fp32", "tf32", "tf32", "tf32x3", "fp32"]  # the steps', the final forward's
    assert sections == expected
    with pytest.raises(InvalidOptionError, match="choose one of fp32, tf32, tf32x3"):
        engine.instance_optimize(moving, fixed, iterations=1, progress=False, precision="bf16")
    assert sections == expected


def test_tf32_on_the_cpu_says_it_runs_in_fp32(caplog):
    """TF32 settings act on CUDA only: asked of a CPU engine (its no-IO forward, or IO), each says
    once per engine that it runs in fp32, and the maps are fp32's; fp32 and bf16 say nothing."""
    net = random_network(SHAPE, narrow=True, seed=4, displacement_scale=0.3)
    moving, fixed = images()
    plain = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", precision="tf32")
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        for _ in range(2):
            phi = engine.predict_map(moving, fixed)
            engine.instance_optimize(moving, fixed, iterations=1, progress=False, precision="tf32x3")
    said = [r.getMessage() for r in caplog.records if "acts on CUDA devices only" in r.getMessage()]
    assert [message.split()[1] for message in said] == ["'tf32'", "'tf32x3'"]
    assert all("on cpu this runs in fp32" in message for message in said)
    assert torch.equal(phi, plain.predict_map(moving, fixed))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        plain.instance_optimize(moving, fixed, iterations=1, progress=False)
        Engine(weights=official_state_dict(net), config=net.config, device="cpu",
               precision="bf16").predict_map(moving, fixed)
    assert not [r for r in caplog.records if "acts on CUDA" in r.getMessage()]


def test_registrations_run_io_in_the_precision_asked(monkeypatch):
    """``io_precision`` of ``register`` and ``register_many`` (the engine's and the module's) is
    instance_optimize's ``precision``, fp32 by default; refused before any image is read."""
    import mgr_engine
    from mgr_engine import engine as engine_module
    from mgr_engine.errors import InvalidOptionError

    net = random_network(SHAPE, narrow=True, seed=4, displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    monkeypatch.setattr(engine_module, "_engine_for", lambda *args: engine)
    asked = recorded_io_precisions(monkeypatch, engine)
    fixed, moving = smooth_volume((40, 44, 36), 1), smooth_volume((40, 44, 36), 2)
    options = dict(io_iterations=1, progress=False)
    engine.register(fixed, moving, **options)
    engine.register(fixed, moving, io_precision="tf32", **options)
    list(engine.register_many([(fixed, moving)], io_precision="tf32x3", **options))
    mgr_engine.register(fixed, moving, io_precision="tf32x3", **options)
    list(mgr_engine.register_many([(fixed, moving)], io_precision="tf32", **options))
    assert asked == ["fp32", "tf32", "tf32x3", "tf32x3", "tf32"]
    with pytest.raises(InvalidOptionError, match="instance optimization precision 'tf32x2'"):
        engine.register("not read", "not read", io_precision="tf32x2", **options)
    assert len(asked) == 5


# The reference's MIND-SSC builds float32 kernels, so it is compared in float32.
@pytest.mark.parametrize("ours,theirs,dtype", [(lncc_loss, "lncc", torch.float64), (lncc2_loss, "lncc2", torch.float64),
                                               (mind_loss, "mind", torch.float32)])
def test_similarity_values_and_gradients_equal_reference(ours, theirs, dtype):
    a = torch.from_numpy(smooth_volume((20, 24, 22), 1))[None, None].to(dtype).requires_grad_()
    b = torch.from_numpy(smooth_volume((20, 24, 22), 2))[None, None].to(dtype)
    mask = (torch.rand(1, 1, 20, 24, 22, generator=torch.Generator().manual_seed(0)) > 0.3).to(dtype)
    for m in (None, mask):
        value = ours(a, b, m)
        (grad,) = torch.autograd.grad(value, a)
        expected = REFERENCE_SIMILARITY[theirs]()(a, b, m)
        (expected_grad,) = torch.autograd.grad(expected, a)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("shape", [(7, 9, 6), (3, 11, 5), (2, 2, 2)])
def test_mind_patch_mean_is_avg_pool_of_replicated_edges(shape):
    """MIND-SSC's patch mean by matrix products equals avg_pool3d of the replicate-padded
    volume (what the reference computes), also where the window is wider than an axis."""
    import torch.nn.functional as F

    from mgr_engine.losses import box_matrix, separable_filter

    volume = torch.rand(2, 12, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = F.avg_pool3d(F.pad(volume, (2,) * 6, mode="replicate"), 5, stride=1)
    ours = separable_filter(volume, lambda n: box_matrix(n, 2, torch.float64))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def image_and_two_targets():
    """A float64 image wanting a gradient and two targets, as IO's two directions compare."""
    image = torch.from_numpy(smooth_volume((12, 14, 10), 3))[None, None].double().requires_grad_()
    targets = [torch.from_numpy(smooth_volume((12, 14, 10), seed))[None, None].double() for seed in (4, 5)]
    return image, targets


def test_mind_target_descriptor_is_computed_once_per_target_in_a_run(monkeypatch):
    """IO's steps compare with the same two targets: within one run (with_constant_targets) their
    MIND-SSC descriptors are computed once. Same values and gradients as computed afresh; a new
    run computes them again."""
    from mgr_engine import losses

    image, targets = image_and_two_targets()

    def fresh(target):  # the same ops (in C++ on the CPU: one for the image's descriptor and the distance)
        return losses.mind_distance(image, losses.mind_ssc(target))

    calls = []
    descriptor = losses.mind_ssc
    monkeypatch.setattr(losses, "mind_ssc", lambda volume: calls.append(volume) or descriptor(volume))
    run = losses.with_constant_targets(mind_loss)
    for _ in range(3):  # the two targets alternate, as IO's two directions do
        for target in targets:
            value = run(image, target)
            torch.testing.assert_close(value, fresh(target), rtol=0, atol=0)
            torch.testing.assert_close(torch.autograd.grad(value, image)[0],
                                       torch.autograd.grad(fresh(target), image)[0], rtol=0, atol=0)
    cached_calls = [c for c in calls if any(c is t for t in targets)]
    assert len(cached_calls) == 2 + 2 * 3 * 2  # each target once, plus fresh()'s two per check
    targets[0].pow_(2)  # a new run sees the change (a scaling would not do: MIND-SSC is invariant to it)
    torch.testing.assert_close(losses.with_constant_targets(mind_loss)(image, targets[0]), fresh(targets[0]),
                               rtol=0, atol=0)
    assert sum(c is targets[0] for c in calls) == 1 + 2 * 3 + 2  # computed again by the new run


@pytest.mark.parametrize("name", ["lncc", "lncc2"])
def test_lncc_target_moments_are_computed_once_per_target_in_a_run(monkeypatch, name):
    """LNCC's window means of the target (blur(J), blur(J^2)) are computed once per target in a
    run: values and gradients as computed afresh (in float64, to rounding: the blurs are batched
    differently), with or without a mask; a new run computes them again."""
    from mgr_engine import losses

    similarity = losses.similarity_by_name(name)
    image, targets = image_and_two_targets()
    mask = torch.rand(1, 1, 12, 14, 10, generator=torch.Generator().manual_seed(6)) > 0.5
    calls = []
    moments = losses.target_moments
    monkeypatch.setattr(losses, "target_moments", lambda target: calls.append(target) or moments(target))
    run = losses.with_constant_targets(similarity)
    for _ in range(3):  # the two targets alternate, as IO's two directions do
        for target in targets:
            for m in (None, mask):
                value, expected = run(image, target, m), similarity(image, target, m)
                torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(torch.autograd.grad(value, image)[0],
                                           torch.autograd.grad(expected, image)[0], rtol=1e-10, atol=1e-14)
    assert [id(c) for c in calls] == [id(t) for t in targets]
    targets[0].pow_(2)
    torch.testing.assert_close(losses.with_constant_targets(similarity)(image, targets[0]),
                               similarity(image, targets[0]), rtol=1e-12, atol=1e-14)
    assert len(calls) == 3


def test_instance_optimization_computes_each_mind_target_once(monkeypatch):
    from mgr_engine import losses

    net = random_network((72, 72, 72), narrow=True, seed=5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    moving = torch.from_numpy(smooth_volume((72, 72, 72), 1))[None, None]
    fixed = torch.from_numpy(smooth_volume((72, 72, 72), 2))[None, None]
    calls, distances = [], []
    descriptor, distance = losses.mind_ssc, losses.mind_distance
    monkeypatch.setattr(losses, "mind_ssc", lambda volume: calls.append(volume) or descriptor(volume))
    monkeypatch.setattr(losses, "mind_distance", lambda *args: distances.append(args[0]) or distance(*args))
    engine.instance_optimize(moving, fixed, iterations=2, similarity="mind", progress=False)
    on_targets = [c for c in calls if c.data_ptr() in (moving.data_ptr(), fixed.data_ptr())]
    assert len(on_targets) == 2  # three objective evaluations, two directions: once per target
    assert len(distances) == 3 * 2  # the warped image's descriptor against it, at every evaluation


def reference_points(identity, seed):
    """The reference's jittered grid (GradientICONSparse): full-size noise from the CPU's
    global generator, added, then every second voxel."""
    torch.manual_seed(seed)
    noise = torch.randn(identity.shape).to(identity.device)
    return (identity + 2 * noise / identity.shape[-1])[:, :, ::2, ::2, ::2]


def test_regularizer_points_on_the_cpu_are_the_reference_stream():
    identity = ops.identity_map((9, 12, 7)).contiguous(memory_format=torch.channels_last_3d)
    expected = reference_points(identity, 3)
    after_reference = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(regularizer_points(identity), expected)
    assert torch.equal(torch.get_rng_state(), after_reference)  # drew as much as the reference
    assert torch.equal(regularizer_points(identity, torch.Generator().manual_seed(5)), reference_points(identity, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_regularizer_points_on_a_gpu():
    """On a GPU without a generator the noise is drawn there (the CPU's generator untouched);
    a CPU generator still draws the reference's stream."""
    identity = ops.identity_map((175, 175, 175), device="cuda")
    grid = identity[:, :, ::2, ::2, ::2]
    cpu_state = torch.get_rng_state()
    torch.cuda.manual_seed(1)
    points = regularizer_points(identity)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert points.device == identity.device and points.shape == grid.shape
    noise = (points - grid) * identity.shape[-1] / 2
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    torch.cuda.manual_seed(1)
    assert torch.equal(regularizer_points(identity), points)
    cuda_generator = torch.Generator("cuda").manual_seed(2)
    assert regularizer_points(identity, cuda_generator).device == identity.device
    assert torch.equal(torch.get_rng_state(), cpu_state)
    expected = reference_points(identity, 4)
    torch.testing.assert_close(regularizer_points(identity, torch.Generator().manual_seed(4)), expected,
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_points_with_steps_put_each_point_beside_its_steps(layout):
    points = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=layout)
    stepped = points_with_steps(points, 0.25)
    assert stepped.shape == (1, 3, 4, 5, 24) and ops.memory_format_of(stepped) == ops.memory_format_of(points)
    by_step = stepped.unflatten(-1, (6, 4))
    assert torch.equal(by_step[..., 0], points)
    for axis in range(3):
        expected = points.clone()
        expected[:, axis] += 0.25
        assert torch.equal(by_step[..., axis + 1], expected)


def test_regularizer_takes_one_round_trip_and_is_the_difference_quotients():
    """All four point sets go through each map in one call; the penalty is the mean squared
    difference quotient of the inverse-consistency error per axis, values and gradients."""
    identity = ops.identity_map((10, 8, 12), dtype=torch.float64)
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    calls = []

    def map_ab(x):
        calls.append(x.shape)
        return x + 0.1 * torch.sin(torch.einsum("ij,bj...->bi...", weight, x))

    def map_ba(x):
        calls.append(x.shape)
        return x - 0.05 * torch.cos(3 * x) * x.flip(1)

    penalty = gradicon_regularizer(map_ab, map_ba, identity, torch.Generator().manual_seed(7), delta=1e-3)
    assert calls == [(1, 3, 5, 4, 24)] * 2
    grad, = torch.autograd.grad(penalty, weight)

    points = regularizer_points(identity, torch.Generator().manual_seed(7))
    error = points - map_ab(map_ba(points))
    expected = 0.0
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, dtype=torch.float64)
        step[:, axis] = 1e-3
        error_step = points + step - map_ab(map_ba(points + step))
        expected = expected + torch.mean(((error - error_step) / 1e-3) ** 2)
    expected_grad, = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=0)


def test_gaussian_taps_are_made_once_and_can_be_saved_for_backward():
    """LNCC's window is computed once per device and type (on a GPU each copy would wait for
    the queue); made first under inference mode, it still serves a blur that is differentiated."""
    from mgr_engine.losses import gaussian_blur, gaussian_kernel1d

    with torch.inference_mode():
        taps = gaussian_kernel1d(9, 2.0, torch.float64)
    assert not taps.is_inference()
    assert gaussian_kernel1d(9, 2.0, torch.float64, "cpu") is taps
    assert gaussian_kernel1d(9, 2.0, torch.float32) is not taps
    torch.testing.assert_close(taps.sum(), torch.tensor(1.0, dtype=torch.float64))
    volume = torch.rand(2, 1, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: gaussian_blur(v, 9, 2.0), (volume,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("similarity,masked", [("lncc2", False), ("lncc", True), ("mind", False)])
def test_instance_optimization_steps_do_not_wait_for_the_gpu(similarity, masked):
    """IO's steps queue their work without waiting for the GPU (no .item(), no host noise, no
    constants copied to the device): the synchronizations torch reports do not grow with the
    number of steps."""
    import collections
    import warnings

    net = random_network(SHAPE, narrow=True, seed=5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cuda")
    moving, fixed = (image.cuda() for image in images())
    options = dict(similarity=similarity, progress=False)
    if masked:
        options.update(zip(("moving_mask", "fixed_mask"), (mask.cuda() for mask in masks())))

    def synchronizations(iterations):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cuda_sync_debug("warn"):
                engine.instance_optimize(moving, fixed, iterations=iterations, **options)
        # where each was called from: a sync in every step shows as a count that grows
        return collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message))

    engine.instance_optimize(moving, fixed, iterations=1, **options)  # compiles the kernels
    few, more = synchronizations(2), synchronizations(5)
    assert few, "torch reported no synchronization at all: the check itself does not work"
    # growth only: a one-off synchronization inside torch (its first call of something) was
    # seen in the two-step run alone on an H200
    assert not more - few, f"synchronizations in each step: {more - few}"


def _objective_gradients_and_kept_bytes(net, moving, fixed):
    """The parameters' gradients of one IO objective and the bytes its graph keeps for the
    backward pass outside checkpointed regions (each storage once)."""
    from mgr_engine.engine import gradicon_objective

    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    net.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _, _ = gradicon_objective(net, moving, fixed, lncc2_loss, generator=torch.Generator().manual_seed(0))
    loss.backward()
    return [p.grad.clone() for p in net.parameters()], sum(kept.values())


def test_checkpointed_unets_give_the_same_gradients():
    net = random_network(SHAPE, narrow=True, seed=8, displacement_scale=0.3).requires_grad_(True)
    moving, fixed = images()
    grads = []
    for checkpointed in (False, True):
        net.checkpoint_unets = checkpointed
        grads.append(_objective_gradients_and_kept_bytes(net, moving, fixed)[0])
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpoint_unets", [False, True])
def test_recomputed_maps_give_the_same_gradients_and_keep_less(checkpoint_unets):
    """``recompute_maps``: the compositions' and warps' maps recomputed in the backward pass: the
    same gradients, and the maps (3 x 72^3 float32 each) no longer kept; by default (None) on the
    CPU only under ``checkpoint_unets``."""
    net = random_network(SHAPE, narrow=True, seed=8, displacement_scale=0.3).requires_grad_(True)
    net.checkpoint_unets = checkpoint_unets
    moving, fixed = images()
    results = {}
    for recompute in (False, True, None):
        net.recompute_maps = recompute
        results[recompute] = _objective_gradients_and_kept_bytes(net, moving, fixed)
    (grads, kept), (recomputed_grads, recomputed_kept) = results[False], results[True]
    # the default (None) on the CPU: kept, unless the U-Nets are checkpointed (io_checkpointing)
    assert results[None][1] == (recomputed_kept if checkpoint_unets else kept)
    assert any(g.abs().max() > 0 for g in grads)
    for a, b in zip(grads, recomputed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    full_resolution_map = 3 * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]
    assert kept - recomputed_kept >= 18 * full_resolution_map, (kept, recomputed_kept)  # 21.5 here


@pytest.mark.parametrize("recompute_maps", [False, True])
def test_recomputed_finest_levels_give_the_same_gradients_and_keep_less(recompute_maps):
    """``recompute_finest_levels``: each U-Net's finest decoder level and last convolution run
    again in the backward pass: the same gradients, and the finest levels' BatchNorm inputs no
    longer kept; by default (None) only on a GPU."""
    net = random_network(SHAPE, narrow=True, seed=8, displacement_scale=0.3).requires_grad_(True)
    net.recompute_maps = recompute_maps
    moving, fixed = images()
    results = {}
    for recompute in (False, True, None):
        net.recompute_finest_levels = recompute
        results[recompute] = _objective_gradients_and_kept_bytes(net, moving, fixed)
    (grads, kept), (recomputed_grads, recomputed_kept) = results[False], results[True]
    assert results[None][1] == kept  # the CPU's default keeps them
    assert any(g.abs().max() > 0 for g in grads)
    for a, b in zip(grads, recomputed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # BatchNorm's input is the transposed convolution's output, on the grid rounded up to even
    finest_channels = net.unets[0].batchNorms[0].num_features
    full, half, quarter = (4 * finest_channels * math.prod(-(-n // 2) * 2 for n in shape)
                           for shape in net.config.level_shapes())
    # two directions, each Psi3 and Psi4 at full resolution, Psi2 at half, Psi1 at a quarter
    assert kept - recomputed_kept >= 2 * (2 * full + half + quarter), (kept, recomputed_kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attribute", ["recompute_finest_levels", "recompute_maps"])
def test_finest_levels_and_maps_are_recomputed_by_default_on_a_gpu(attribute):
    """On CUDA the default (None) recomputes the finest decoder levels and the maps: its graph
    keeps what ``True`` keeps, less than ``False``."""
    net = random_network(SHAPE, narrow=True, seed=8, displacement_scale=0.3).cuda().requires_grad_(True)
    moving, fixed = (image.cuda() for image in images())
    kept = {}
    for recompute in (None, True, False):
        setattr(net, attribute, recompute)
        kept[recompute] = _objective_gradients_and_kept_bytes(net, moving, fixed)[1]
    assert kept[None] == kept[True] < kept[False], kept


def test_io_gradients_in_tf32x3_are_as_accurate_as_float32s():
    """An IO objective's weight gradients with every convolution, input gradient and weight
    gradient as three TF32 products (precision "tf32x3"; the finest levels recomputed in the
    backward pass, whose convolutions split too) as close to float64's as float32's, where one
    TF32 product each is 10x further or more. (The objective amplifies rounding: float32's are
    2e-3 off here.) On the CPU, float32 products of TF32-rounded operands stand in for tensor
    cores; on CUDA, cuDNN's TF32 through the engine's sections."""
    from mgr_engine import model
    from mgr_engine.engine import _TF32_SWITCHES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = random_network(SHAPE, narrow=True, seed=8, displacement_scale=0.3).to(device).requires_grad_(True)
    net.recompute_finest_levels = True
    moving, fixed = (image.to(device) for image in images())
    rounded = model.round_to_tf32

    def gradients(setting, net=net, moving=moving, fixed=fixed):
        with _TF32_SWITCHES.set_to(setting), pytest.MonkeyPatch.context() as patch:
            if device == "cpu" and setting != "fp32":
                patch.setattr(model, "splits_tf32", lambda x: x.dtype == torch.float32)
                if setting == "tf32x3":  # three products of a tensor core's operands
                    patch.setattr(model, "tf32x3", tensor_core_tf32x3)
                else:  # one
                    patch.setattr(model, "tf32x3", lambda product, a, b, **options: product(rounded(a), rounded(b)))
            grads = _objective_gradients_and_kept_bytes(net, moving, fixed)[0]
        return torch.cat([g.flatten().double() for g in grads])

    exact = gradients("fp32", copy.deepcopy(net).double(), moving.double(), fixed.double())
    errors = {setting: ((gradients(setting) - exact).norm() / exact.norm()).item()
              for setting in ("fp32", "tf32x3", "tf32")}
    assert errors["tf32x3"] < 1.5 * errors["fp32"], errors
    assert errors["tf32"] > 10 * errors["fp32"], errors


def test_threads_sharing_an_engine_get_each_io_as_if_alone():
    """IO adapts the engine's network in place: two threads' IO at once would step on each other's
    weights (torch raised 'modified by an inplace operation' before the lock), and the forward
    without IO, on its own copy, goes on beside them unchanged."""
    import threading

    from mgr_engine.model import GradICONNetwork, NetworkConfig, randomize_weights

    config = NetworkConfig(input_shape=(40, 40, 40), down_channels=(2, 4, 8, 8), up_channels=(4, 8, 8))
    net = randomize_weights(GradICONNetwork(config), 4, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=config, device="cpu")
    moving, fixed = (torch.from_numpy(smooth_volume(config.input_shape, seed))[None, None] for seed in (23, 24))

    def io():
        return engine.instance_optimize(moving, fixed, iterations=3, generator=torch.Generator().manual_seed(0),
                                        progress=False)

    alone, forward = io(), engine.predict_map(moving, fixed)
    assert (alone[0] - forward).abs().max() > 1e-4  # IO moved the map: interleaved steps would show
    outcomes = {}
    start = threading.Barrier(3)

    def run(name, call):
        start.wait()
        try:
            outcomes[name] = [call() for _ in range(2)]
        except Exception as error:  # reported by the assertion below
            outcomes[name] = error

    threads = [threading.Thread(target=run, args=(name, call))
               for name, call in (("io 1", io), ("io 2", io), ("forward", lambda: engine.predict_map(moving, fixed)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("io 1", "io 2"):
        assert isinstance(outcomes[name], list), f"{name}: {outcomes[name]!r}"
        for phi_ab, phi_ba, losses in outcomes[name]:
            assert torch.equal(phi_ab, alone[0]) and torch.equal(phi_ba, alone[1]) and losses == alone[2]
    assert all(torch.equal(phi, forward) for phi in outcomes["forward"])
    assert torch.equal(io()[0], alone[0])  # the checkpoint's weights restored after them all
