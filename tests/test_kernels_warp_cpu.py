"""The C++ trilinear warp (kernels/warp_cpu.py), values and gradients, against the PyTorch
reference of ops.warp, and the dispatch that picks it on the CPU.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import functools
import platform
import re
import shutil
import subprocess

import pytest
import torch

from helpers import require_cpp_extension, with_and_without_corner_pairs
from mgr_engine import ops
from mgr_engine.errors import InvalidOptionError
from mgr_engine.kernels import warp_cpu

require_cpp_extension()

SHAPES = [  # image grid, map grid: odd, non-cubic, map grid unlike the image's
    ((5, 6, 7), (4, 5, 3)),
    ((9, 4, 6), (9, 4, 6)),
    ((3, 8, 5), (2, 3, 7)),
    ((33, 20, 17), (31, 22, 19)),
    ((6, 5, 7), (23, 19, 29)),  # a coarse field at finer points: runs of points in one grid cell
]


def random_map(batch, shape, spread, seed=0):
    """A map around the identity that leaves [0, 1] by up to ``spread`` in places."""
    gen = torch.Generator().manual_seed(seed)
    return ops.identity_map(shape) + spread * (torch.rand(batch, 3, *shape, generator=gen) * 2 - 1)


@pytest.fixture(params=[64, 32], ids=lambda n: f"{n}-byte-backward")
def backward_bytes(request):
    """float32's backward in vectors of this width: both bodies the CPU can run, on one CPU."""
    from mgr_engine import _trilinear_cpu

    if request.param > _trilinear_cpu.backward_simd_bytes(0):
        pytest.skip(f"the backward does not run in {request.param}-byte vectors on this CPU")
    try:
        assert _trilinear_cpu.backward_simd_bytes(request.param) == request.param
        yield request.param
    finally:
        _trilinear_cpu.backward_simd_bytes(0)


def reference_warp(image, coords, padding):
    with ops.kernel_mode("torch"):
        return ops.warp(image, coords, padding)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 1, 1), (2, 3, 2), (3, 2, 1)])
def test_values_match_grid_sample(padding, grid, out, batch, channels, map_batch):
    image = torch.rand(batch, channels, *grid, generator=torch.Generator().manual_seed(1))
    coords = random_map(map_batch, out, spread=0.3)
    expected = reference_warp(image, coords, padding)
    got = warp_cpu.warp_cpu(image, coords, padding)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    if padding == "zeros":
        assert (expected == 0).any()  # the map leaves the domain: the zero padding was exercised


def test_far_outside_nan_and_grid_corners():
    image = torch.rand(1, 2, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    coords = ops.identity_map((4, 5, 6)).clone()
    coords[0, 0, 0, 0, 0] = 7.0       # far outside: zeros gives 0, border the edge value
    coords[0, 1, 1, 1, 1] = -3.0
    coords[0, 2, 2, 2, 2] = float("nan")  # documented: a non-finite coordinate gives 0
    for padding in ("zeros", "border"):
        got = warp_cpu.warp_cpu(image, coords, padding)
        expected = reference_warp(image, coords, padding)
        assert torch.equal(got[..., 2, 2, 2], torch.zeros(1, 2))
        got[..., 2, 2, 2] = expected[..., 2, 2, 2] = 0
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    identity = warp_cpu.warp_cpu(image, ops.identity_map((4, 5, 6)), "zeros")
    torch.testing.assert_close(identity, image, rtol=0, atol=1e-6)  # voxel centres at i / (n - 1)


def test_non_contiguous_inputs_and_thread_counts_agree():
    image = torch.rand(1, 8, 12, 10, 3, generator=torch.Generator().manual_seed(3)).permute(0, 4, 1, 2, 3)
    coords = random_map(1, (9, 11, 7), spread=0.2).transpose(3, 4).contiguous().transpose(3, 4)
    assert not image.is_contiguous() and not coords.is_contiguous()
    expected = reference_warp(image, coords, "zeros")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(warp_cpu.warp_cpu(image, coords, "zeros"))
    finally:
        torch.set_num_threads(threads)
    for result in results:
        assert torch.equal(result, results[0])
    torch.testing.assert_close(results[0], expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("grid,out", SHAPES[:3])
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 1, 1), (2, 3, 2), (3, 2, 1)])
def test_gradcheck_float64(padding, grid, out, batch, channels, map_batch):
    image = torch.rand(batch, channels, *grid, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    coords = random_map(map_batch, out, spread=0.3).double()
    torch.autograd.gradcheck(lambda a, b: warp_cpu.warp_cpu(a, b, padding),
                             (image.requires_grad_(), coords.requires_grad_()))


def reference_gradients(image, coords, padding, grad_out):
    image, coords = image.detach().requires_grad_(), coords.detach().requires_grad_()
    return torch.autograd.grad(reference_warp(image, coords, padding), (image, coords), grad_out)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-4)])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 1, 1), (2, 3, 2), (3, 2, 1)])
def test_gradients_match_grid_sample(dtype, atol, padding, grid, out, batch, channels, map_batch, backward_bytes):
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(batch, channels, *grid, generator=gen).to(dtype).requires_grad_()
    coords = random_map(map_batch, out, spread=0.3).to(dtype).requires_grad_()
    grad_out = torch.randn(batch, channels, *out, generator=gen).to(dtype)
    got = torch.autograd.grad(warp_cpu.warp_cpu(image, coords, padding), (image, coords), grad_out)
    expected = reference_gradients(image, coords, padding, grad_out)
    # Coordinate gradients are voxel-scaled (x (n - 1)): compare them relative to their size.
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=atol)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=atol * float(expected[1].abs().max()))
    assert got[1].abs().max() > 0


@pytest.mark.parametrize("grad_layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 3, 1), (2, 2, 2), (2, 3, 1)])
def test_channels_last_maps_are_read_in_place(batch, channels, map_batch, grad_layout):
    """The engine's maps are channels-last (its network is, identity grid included): the kernel
    reads them in that layout, writes its output in it, and gives the same values and gradients,
    whatever the layout of the incoming gradient."""
    gen = torch.Generator().manual_seed(10)
    grid, out = (9, 7, 11), (8, 10, 6)
    image = torch.rand(batch, channels, *grid, dtype=torch.float64, generator=gen).requires_grad_()
    coords = random_map(map_batch, out, spread=0.3).double().contiguous(memory_format=torch.channels_last_3d)
    assert not coords.is_contiguous()
    coords.requires_grad_()
    got = warp_cpu.warp_cpu(image, coords, "zeros")
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, reference_warp(image, coords, "zeros"), rtol=0, atol=1e-12)
    grad_out = torch.randn(batch, channels, *out, dtype=torch.float64, generator=gen).contiguous(memory_format=grad_layout)
    grads = torch.autograd.grad(got, (image, coords), grad_out)
    assert grads[1].is_contiguous(memory_format=torch.channels_last_3d)
    for a, b in zip(grads, reference_gradients(image, coords, "zeros", grad_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda a, b: warp_cpu.warp_cpu(a, b, "border"), (image, coords))


def test_gradients_at_the_grid_edges_and_outside():
    """The identity map sits on the edges, where torch's border padding zeroes the coordinate
    gradient (the clamp's derivative) and zero padding does not; far-outside and NaN points
    have no gradient."""
    image = torch.rand(2, 2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    coords = ops.identity_map((4, 5, 6), dtype=torch.float64).clone()
    coords[0, 0, 0, 0, 0] = 7.0
    coords[0, 1, 1, 1, 1] = -3.0
    coords[0, 0, 3, 4, 5] = -1.0 / 3  # one voxel outside: a corner inside with weight 0
    grad_out = torch.randn(2, 2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for padding in ("zeros", "border"):
        x, y = image.clone().requires_grad_(), coords.clone().requires_grad_()
        got = torch.autograd.grad(warp_cpu.warp_cpu(x, y, padding), (x, y), grad_out)
        for a, b in zip(got, reference_gradients(image, coords, padding, grad_out)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    coords[0, 2, 2, 2, 2] = float("nan")
    y = coords.clone().requires_grad_()
    grad = torch.autograd.grad(warp_cpu.warp_cpu(image, y, "zeros"), y, grad_out)[0]
    assert torch.equal(grad[..., 2, 2, 2], torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("map_kind", ["near_identity", "flipped", "spread"])
def test_gradients_agree_for_any_thread_count_and_repeat_exactly(map_kind, backward_bytes):
    """The image gradient is scattered by z-slice ownership: each thread adds the corners that
    land in its share of the slices, its own points' at once and the others' after a barrier.
    Right for any team size, even more threads than slices (9 slices, 12 threads) and a map
    that sends every point into another thread's slices (flipped), and bit for bit the same
    when repeated with the same team. The map gradient has no scatter: the same for all."""
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(2, 3, 9, 8, 7, generator=gen).requires_grad_()
    coords = {"near_identity": random_map(1, (12, 9, 10), spread=0.05),
              "flipped": ops.identity_map((12, 9, 10)).flip(2) + 0.05 * random_map(1, (12, 9, 10), spread=0.5),
              "spread": random_map(1, (12, 9, 10), spread=0.4)}[map_kind].requires_grad_()
    grad_out = torch.randn(2, 3, 12, 9, 10, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5, 12):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(warp_cpu.warp_cpu(image, coords, "zeros"), (image, coords), grad_out))
        again = torch.autograd.grad(warp_cpu.warp_cpu(image, coords, "zeros"), (image, coords), grad_out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(again, results[-1]))
    expected = reference_gradients(image, coords, "zeros", grad_out)
    for result in results:
        torch.testing.assert_close(result[0], expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(result[1], expected[1], rtol=0, atol=1e-5 * float(expected[1].abs().max()))
        torch.testing.assert_close(result[1], results[0][1], rtol=0, atol=0)  # no scatter: bit for bit


@pytest.fixture
def prefetch_above_bytes():
    """The extension's setter of the image size above which the warp prefetches corners; the
    default is restored after the test."""
    from mgr_engine import _trilinear_cpu

    default = _trilinear_cpu.prefetch_above_bytes()
    yield _trilinear_cpu.prefetch_above_bytes
    _trilinear_cpu.prefetch_above_bytes(default)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("channels,padding,compose", [(1, "zeros", False), (3, "border", False), (2, "zeros", False),
                                                      (3, "border", True)])
def test_prefetched_corners_give_the_same_bits(prefetch_above_bytes, layout, channels, padding, compose,
                                               backward_bytes):
    """Images above 32 MiB have their points' corners prefetched, the point loops run in chunks
    (kernels/trilinear_cpu.cpp, over_points). Forced at a small size (threshold 0), the values
    and both gradients are the same bits as without, for each kind of compiled layout, over more
    points than a chunk and its look-ahead, a map that leaves the grid in places."""
    assert prefetch_above_bytes() == 32 << 20
    gen = torch.Generator().manual_seed(12)
    image = torch.rand(2, channels, 9, 8, 7, generator=gen).requires_grad_()
    coords = random_map(1, (10, 11, 13), spread=0.3).contiguous(memory_format=layout).requires_grad_()
    grad_out = torch.randn(2, channels, 10, 11, 13, generator=gen)

    def run():
        out = warp_cpu.compose_maps_cpu(image, coords) if compose else warp_cpu.warp_cpu(image, coords, padding)
        return (out, *torch.autograd.grad(out, (image, coords), grad_out))

    prefetch_above_bytes(1 << 62)
    plain = run()
    prefetch_above_bytes(0)
    prefetched = run()
    for a, b in zip(prefetched, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prefetch", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("channels,padding,compose", [(1, "zeros", False), (1, "border", False), (3, "zeros", False),
                                                      (3, "border", False), (2, "zeros", False), (3, "border", True)])
def test_corners_loaded_in_pairs_give_the_same_bits(prefetch_above_bytes, prefetch, layout, channels, padding,
                                                    compose):
    """Where the CPU runs 512-bit vectors whole, the float forward and the AVX-512 backward's map
    gradient load the two corners along x with one 8-byte load (kernels/trilinear_cpu.cpp,
    sample_pairs and map_gradient_pairs; 1 and 3 channels): the same bits as the gathering loops
    they replace (corner_pairs(0)), values and both gradients, for each compiled layout, whole
    and in prefetch chunks, over blocks of points with a partial vector at the end, points with
    one neighbour along x in the grid (the pair's other voxel then unused), outside it and NaN."""
    from mgr_engine import _trilinear_cpu

    if not _trilinear_cpu.corner_pairs(1) or _trilinear_cpu.backward_simd_bytes() != 64:
        pytest.skip("the warp loads corners in pairs only where the CPU runs 512-bit vectors whole")
    gen = torch.Generator().manual_seed(13)
    image = torch.randn(2, channels, 9, 8, 7, generator=gen).requires_grad_()
    coords = random_map(1, (10, 11, 13), spread=0.3).contiguous(memory_format=layout)
    x = coords[0, 2].detach()  # map coordinate along x (width 7: voxel 6 * x)
    x[0, 0, :4] = torch.tensor([1.0, -0.5 / 6, 1.05, float("nan")])
    voxel = 6 * x[x.isfinite()]
    assert ((voxel >= -1) & (voxel < 0)).sum() > 20 and ((voxel >= 6) & (voxel < 7)).sum() > 20
    assert coords.shape[2:].numel() % 16 and coords.shape[2:].numel() > 128  # blocks of 128 points
    coords.requires_grad_()
    grad_out = torch.randn(2, channels, 10, 11, 13, generator=gen)

    def run():
        out = warp_cpu.compose_maps_cpu(image, coords) if compose else warp_cpu.warp_cpu(image, coords, padding)
        return (out, *torch.autograd.grad(out, (image, coords), grad_out))

    prefetch_above_bytes(0 if prefetch else 1 << 62)
    paired, gathered = with_and_without_corner_pairs(_trilinear_cpu, run)
    for a, b in zip(paired, gathered):  # NaN where composed with the NaN coordinate
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert (a != 0).double().mean() > 0.5
    finite = coords.isfinite().all(1, keepdim=True)  # torch's border padding keeps NaN's sample
    with ops.kernel_mode("torch"):
        out = ops.compose_maps(image, coords) if compose else ops.warp(image, coords, padding)
        reference = (out, *torch.autograd.grad(out, (image, coords), grad_out * finite))
    for a, b in ((paired[0], reference[0]), (paired[2], reference[2])):
        mask = finite.expand_as(a)
        torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-4 * float(b[mask].detach().abs().max()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("channels,compose", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("map_kind", ["smooth", "regularizer"])
def test_pair_loops_prefetch_ahead_at_a_coherent_map_with_the_same_bits(prefetch_above_bytes, layout, channels,
                                                                        compose, map_kind):
    """At a map that moves by less than a voxel along z and y from most points to the next (smooth,
    or the regularizer's points, each beside its three steps), the pair loops of an image above
    the prefetch threshold compute the next block's corners and prefetch their rows while they sum
    the current block's (kernels/trilinear_cpu.cpp, over_pair_blocks): the same bits as the
    gathering loops, values and both gradients, over many blocks of 128 points per thread."""
    from mgr_engine import _trilinear_cpu
    from mgr_engine.losses import points_with_steps, regularizer_points

    if not _trilinear_cpu.corner_pairs(1) or _trilinear_cpu.backward_simd_bytes() != 64:
        pytest.skip("the warp loads corners in pairs only where the CPU runs 512-bit vectors whole")
    gen = torch.Generator().manual_seed(14)
    image = torch.randn(1, channels, 12, 11, 10, generator=gen).requires_grad_()
    if map_kind == "smooth":
        shape = (23, 21, 19)
        coords = ops.identity_map(shape) + torch.nn.functional.interpolate(
            0.04 * torch.randn(1, 3, 3, 3, 3, generator=gen), size=shape, mode="trilinear")
    else:
        coords = points_with_steps(regularizer_points(ops.identity_map((24, 22, 20)), gen), 0.001)
    coords = coords.contiguous(memory_format=layout).requires_grad_()
    grad_out = torch.randn(1, channels, *coords.shape[2:], generator=gen)

    def run():
        out = warp_cpu.compose_maps_cpu(image, coords) if compose else warp_cpu.warp_cpu(image, coords, "zeros")
        return (out, *torch.autograd.grad(out, (image, coords), grad_out))

    prefetch_above_bytes(0)
    paired, gathered = with_and_without_corner_pairs(_trilinear_cpu, run)
    for a, b in zip(paired, gathered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_when_only_one_input_wants_a_gradient():
    """The backward skips the gradient nobody asked for (the image's scatter, for images warped
    in the loss): each alone still equals the reference's."""
    image = torch.rand(1, 2, 5, 5, 5, generator=torch.Generator().manual_seed(9))
    coords = random_map(1, (4, 4, 4), spread=0.2)
    grad_out = torch.ones(1, 2, 4, 4, 4)
    expected = reference_gradients(image, coords, "border", grad_out)
    x = image.clone().requires_grad_()
    (grad,) = torch.autograd.grad(warp_cpu.warp_cpu(x, coords, "border"), x, grad_out)
    torch.testing.assert_close(grad, expected[0], rtol=0, atol=1e-6)
    y = coords.clone().requires_grad_()
    (grad,) = torch.autograd.grad(warp_cpu.warp_cpu(image, y, "border"), y, grad_out)
    torch.testing.assert_close(grad, expected[1], rtol=0, atol=1e-5)


def test_gradicon_objective_gradients_equal_pytorch_in_float64():
    """The whole IO objective (TwoStep/DownSample warps and compositions, the regularizer's
    finite differences, both directions) differentiated through the C++ warp equals PyTorch's
    in float64. In float32 the two differ by rounding at voxel boundaries, where trilinear
    gradients jump (RESULTS.md: both equally far from the float64 gradient)."""
    from helpers import random_network, smooth_volume

    from mgr_engine.engine import gradicon_objective
    from mgr_engine.losses import lncc2_loss

    shape = (72, 72, 72)
    net = random_network(shape, narrow=True, seed=4, displacement_scale=0.3).double().requires_grad_(True)
    moving = torch.from_numpy(smooth_volume(shape, 21))[None, None].double()
    fixed = torch.from_numpy(smooth_volume(shape, 22))[None, None].double()
    results = {}
    for mode in ("torch", "cpp"):
        net.zero_grad(set_to_none=True)
        with ops.kernel_mode(mode):
            loss, _, _ = gradicon_objective(net, moving, fixed, lncc2_loss,
                                            generator=torch.Generator().manual_seed(0))
            loss.backward()
        results[mode] = loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(results["cpp"][0], results["torch"][0], rtol=1e-12, atol=0)
    difference = (results["cpp"][1] - results["torch"][1]).norm() / results["torch"][1].norm()
    assert difference < 1e-10


def test_auto_mode_takes_cpp_on_cpu_tensors_outside_tracers(monkeypatch):
    calls = []
    original = warp_cpu.warp_cpu
    monkeypatch.setattr(warp_cpu, "warp_cpu", lambda *args: calls.append(1) or original(*args))
    image = torch.rand(1, 1, 6, 6, 6)
    coords = random_map(1, (5, 5, 5), spread=0.1)
    with ops.kernel_mode("auto"):
        ops.warp(image, coords)
        assert len(calls) == 1
        warped = ops.warp(image.requires_grad_(), coords)  # gradient wanted: C++ backward
        assert len(calls) == 2 and warped.grad_fn is not None
        ops.warp(image.detach().double(), coords.double())
        assert len(calls) == 3
        assert not ops.use_cpp_warp(image.detach().half(), coords.half())  # float16: PyTorch
        traced = torch.jit.trace(lambda a, b: ops.warp(a, b), (image.detach(), coords), check_trace=False)
        assert len(calls) == 3 and "grid_sampler" in str(traced.graph)
    with ops.kernel_mode("torch"):
        ops.warp(image.detach(), coords)
    assert len(calls) == 3
    with ops.kernel_mode("triton"):
        assert not ops.use_cpp_warp(image.detach(), coords)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,map_batch", [(1, 1), (2, 2), (3, 1)])
def test_compose_maps_in_one_pass_equals_pytorch(layout, grid, out, batch, map_batch):
    """compose_maps_cpu = coords + warp(field, coords, "border") in one pass: values and both
    gradients against PyTorch's path in float64, a map batch of 1 shared by the fields."""
    gen = torch.Generator().manual_seed(11)
    field = (0.1 * torch.randn(batch, 3, *grid, generator=gen, dtype=torch.float64)).requires_grad_()
    coords = random_map(map_batch, out, spread=0.3).double().contiguous(memory_format=layout).requires_grad_()
    got = warp_cpu.compose_maps_cpu(field, coords)
    with ops.kernel_mode("torch"):
        expected = ops.compose_maps(field, coords)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (field, coords), grad_out),
                    torch.autograd.grad(expected, (field, coords), grad_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_compose_maps_in_one_pass_gradcheck_and_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    field = (0.1 * torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    coords = random_map(1, (4, 3, 5), spread=0.3).double().requires_grad_()
    torch.autograd.gradcheck(warp_cpu.compose_maps_cpu, (field, coords))
    with pytest.raises(ValueError, match="3 channels"):
        warp_cpu.compose_maps_cpu(field[:, :2], coords)
    calls = []
    original = warp_cpu.compose_maps_cpu
    monkeypatch.setattr(warp_cpu, "compose_maps_cpu", lambda *args: calls.append(1) or original(*args))
    with ops.kernel_mode("auto"):
        ops.compose_maps(field, coords)
    with ops.kernel_mode("torch"):
        ops.compose_maps(field, coords)
    assert len(calls) == 1


def test_images_beyond_32_bit_offsets_are_left_to_pytorch():
    small = torch.zeros(1, 3, 4, 4, 4)
    huge = torch.zeros(1, 3, 1, 1, 1).expand(1, 3, 1291, 1291, 1291)  # just over 2^31 voxels, in no memory
    coords = ops.identity_map((2, 2, 2))
    assert warp_cpu.supports(small, coords)
    assert not warp_cpu.supports(huge, coords)


def test_cpp_mode_without_the_extension_says_how_to_build(monkeypatch):
    from mgr_engine import kernel_modes

    monkeypatch.setattr(warp_cpu, "_trilinear_cpu", None)
    monkeypatch.setattr(kernel_modes, "cpp_extensions_built", lambda: False)
    with ops.kernel_mode("cpp"), pytest.raises(InvalidOptionError, match="pip install"):
        ops.warp(torch.rand(1, 1, 4, 4, 4), ops.identity_map((4, 4, 4)))
    with ops.kernel_mode("auto"):  # auto falls back quietly
        torch.testing.assert_close(ops.warp(torch.ones(1, 1, 4, 4, 4), ops.identity_map((4, 4, 4))),
                                   torch.ones(1, 1, 4, 4, 4))


needs_objdump = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                                   reason="reads x86-64 machine code with objdump")


@functools.lru_cache(maxsize=None)
def disassembly(module) -> str:
    """The built extension ``module``'s machine code, demangled (objdump)."""
    return subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", module.__file__], capture_output=True,
                          text=True, check=True).stdout


@needs_objdump
def test_point_loops_are_built_with_gathers():
    """The warp's and the result resampling's point loops read each corner of a vector of points
    with one gather instruction. GCC's generic tuning emits none unless setup.py's flags turn
    them on, and the loops then load the corners lane by lane (the warp's forward 1.75-2x slower
    on an Intel Xeon): a compiler that names those flags otherwise would fail here, not only
    run slower."""
    from mgr_engine import _resample_cpu, _trilinear_cpu

    for module in (_trilinear_cpu, _resample_cpu):
        assert re.search(r"\svp?gather[dq]", disassembly(module)), f"{module.__name__} has no gather instructions"


def cpu_vendor_and_family():
    """The vendor and family the kernel reads (cpuid), as Linux reports them."""
    info = open("/proc/cpuinfo").read()
    return re.search(r"vendor_id\s*:\s*(\S+)", info).group(1), int(re.search(r"cpu family\s*:\s*(\d+)", info).group(1))


@pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux", reason="x86-64 Linux dispatch")
def test_backward_runs_in_512_bit_vectors_unless_the_cpu_splits_them():
    """float32's backward takes AVX-512 where the CPU has it (as the last convolution reports it)
    and runs 512-bit vectors whole, AVX2 on AMD's Zen 4 (family 25), where it measured slower."""
    from mgr_engine import _trilinear_cpu
    from mgr_engine.kernels import last_conv_cpu

    vendor, family = cpu_vendor_and_family()
    splits = vendor == "AuthenticAMD" and family == 25
    widest = last_conv_cpu.vector_bytes()
    assert _trilinear_cpu.backward_simd_bytes() == (64 if widest == 64 and not splits else min(widest, 32))


@needs_objdump
def test_pair_loops_compute_their_corners_vectorized():
    """The AVX-512 pair loops (sample_pairs, map_gradient_pairs) compute the corners of a block of
    points in a vectorized loop. Inlined into sample_points with the other layouts, GCC left that
    loop scalar (the forward 3x slower than the gathers it replaces): in each loop's ten layouts
    the three coordinates become voxel indices through packed instructions."""
    from mgr_engine import _trilinear_cpu

    bodies = [c for c in re.split(r"\n(?=[0-9a-f]+ <)", disassembly(_trilinear_cpu))
              if re.match(r"[0-9a-f]+ <[^\n]*(sample|map_gradient)_pairs<", c)]
    if not bodies:
        pytest.skip("no AVX-512 pair loops under GCC's name (another compiler, another architecture)")
    assert len(bodies) == 20
    for body in bodies:
        packed = len(re.findall(r"vcvttps2dq\s+%zmm", body))
        assert packed >= 3, f"{body.splitlines()[0]}: coordinates converted in vectors {packed} times"


@needs_objdump
def test_scatter_stencils_are_built_vectorized():
    """The backward's scatter computes its points' stencils in a vectorized loop. GCC once left
    that loop scalar in the built AVX2 code (a 44^3 field's scatter at 175^3 points 63 against
    32 ms, 2 cores), for a store of each point's eight weights together: here each of the ten
    float layouts with a fixed channel count converts its three coordinates to voxel indices
    with packed instructions (that build had 12 in all, this one 120)."""
    from mgr_engine import _trilinear_cpu

    clones = re.split(r"\n(?=[0-9a-f]+ <)", disassembly(_trilinear_cpu))
    scatter = [c for c in clones if re.match(r"[0-9a-f]+ <[^\n]*scatter_points[^\n]*arch_x86_64_v3", c)]
    if not scatter:
        pytest.skip("no AVX2 clone of scatter_points under GCC's name (another compiler)")
    packed = sum(len(re.findall(r"vcvttps2dq\s+%ymm", c)) for c in scatter)
    assert packed >= 3 * 10, f"the scatter's AVX2 clone converts coordinates in vectors only {packed} times"
    wide = [c for c in clones if re.match(r"[0-9a-f]+ <[^\n]*scatter_points_avx512", c)]
    packed = sum(len(re.findall(r"vcvttps2dq\s+%zmm", c)) for c in wide)
    assert wide and packed >= 3 * 10, f"the scatter's AVX-512 body converts coordinates in vectors {packed} times"
