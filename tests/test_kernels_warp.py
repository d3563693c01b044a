"""Triton warp and compose kernels against the PyTorch reference (mgr_engine.ops).

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the
shapes stay small; on a GPU compiled, and ``test_full_size`` runs at the network's 175^3.
"""

import pytest
import torch

from helpers import INTERPRETED, require_triton_kernels
from helpers import KERNEL_DEVICE as DEVICE

require_triton_kernels()

from mgr_engine import ops  # noqa: E402
from mgr_engine.errors import InvalidImageError  # noqa: E402
from mgr_engine.kernels import compose as kcompose  # noqa: E402
from mgr_engine.kernels import warp as kwarp  # noqa: E402

# In the interpreter gradcheck compares a random projection of the Jacobian (fast_mode: 1-3 s
# per op against 50-78 s for the full one on the 2-core CI machine). It catches a wrong axis or
# sign, not a 1% error in one element: the float64 comparisons with the reference's gradients
# (rtol 1e-9 or tighter) catch those. Compiled, the full Jacobian.

SHAPES = [  # image grid, map grid
    ((5, 6, 7), (4, 5, 3)),
    ((9, 4, 6), (9, 4, 6)),
    ((3, 8, 5), (2, 3, 7)),
]
FULL_SHAPE = (175, 175, 175) if DEVICE == "cuda" else (11, 13, 12)  # the interpreter is slow


def random_map(batch, shape, dtype, spread=0.25, seed=0):
    """A map around the identity that leaves [0, 1] in places (spread in [0, 1] units)."""
    gen = torch.Generator().manual_seed(seed)
    identity = ops.identity_map(shape, dtype=dtype)
    return (identity + spread * (torch.rand(batch, 3, *shape, generator=gen, dtype=dtype) * 2 - 1)).to(DEVICE)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 1, 1), (2, 3, 2), (2, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_values_and_gradients(padding, grid, out, batch, channels, map_batch, dtype):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(batch, channels, *grid, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
    coords = random_map(map_batch, out, dtype).requires_grad_()
    with ops.kernel_mode("torch"):  # the reference, also on a GPU
        expected = ops.warp(image, coords, padding)
    result = kwarp.warp(image, coords, padding)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result, expected, **tolerance)
    grad_out = torch.rand(expected.shape, generator=gen, dtype=dtype).to(DEVICE)
    expected_grads = torch.autograd.grad(expected, (image, coords), grad_out)
    grads = torch.autograd.grad(result, (image, coords), grad_out)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_warp_gradcheck():
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 2, 4, 5, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    coords = random_map(1, (3, 2, 3), torch.float64, seed=3).requires_grad_()
    for padding in ("zeros", "border"):
        assert torch.autograd.gradcheck(lambda i, c: kwarp.warp(i, c, padding), (image, coords), eps=1e-6, atol=1e-5,
                                        fast_mode=INTERPRETED)


@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,map_batch", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compose_values_and_gradients(grid, out, batch, map_batch, dtype):
    gen = torch.Generator().manual_seed(4)
    field = (0.1 * torch.randn(batch, 3, *grid, generator=gen, dtype=dtype)).to(DEVICE).requires_grad_()
    coords = random_map(map_batch, out, dtype, spread=0.3, seed=5).requires_grad_()
    with ops.kernel_mode("torch"):
        expected = ops.compose_maps(field, coords)
    result = kcompose.compose_maps(field, coords)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result, expected, **tolerance)
    grad_out = torch.rand(expected.shape, generator=gen, dtype=dtype).to(DEVICE)
    for ours, theirs in zip(torch.autograd.grad(result, (field, coords), grad_out),
                            torch.autograd.grad(expected, (field, coords), grad_out)):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_compose_gradcheck():
    gen = torch.Generator().manual_seed(6)
    field = (0.1 * torch.randn(1, 3, 4, 3, 5, generator=gen, dtype=torch.float64)).to(DEVICE).requires_grad_()
    coords = random_map(1, (2, 3, 2), torch.float64, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(kcompose.compose_maps, (field, coords), eps=1e-6, atol=1e-5, fast_mode=INTERPRETED)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["warp", "compose"])
def test_16bit_input_is_sampled_in_float32(half, op):
    """Under bf16 autocast a U-Net hands the ops a 16-bit field and a float32 map: the kernels
    compute and return float32, as grid_sample promotes under autocast (the map in bfloat16
    would be a third of a voxel off at 175^3), and give the 16-bit input its gradient in its dtype."""
    gen = torch.Generator().manual_seed(9)
    volume = (0.1 * torch.randn(2, 3, 6, 7, 5, generator=gen)).to(half).to(DEVICE).requires_grad_()
    coords = random_map(1, (5, 4, 6), torch.float32, seed=10).requires_grad_()
    exact = volume.detach().float().requires_grad_()  # the same values, in float32
    if op == "warp":
        result = kwarp.warp(volume, coords, "zeros")
        with ops.kernel_mode("torch"):
            expected = ops.warp(exact, coords, "zeros")
    else:
        result = kcompose.compose_maps(volume, coords)
        with ops.kernel_mode("torch"):
            expected = ops.compose_maps(exact, coords)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.rand(expected.shape, generator=gen).to(DEVICE)
    grad_volume, grad_coords = torch.autograd.grad(result, (volume, coords), grad_out)
    expected_volume, expected_coords = torch.autograd.grad(expected, (exact, coords), grad_out)
    assert grad_volume.dtype == half and grad_coords.dtype == torch.float32
    torch.testing.assert_close(grad_volume, expected_volume.to(half))
    torch.testing.assert_close(grad_coords, expected_coords, rtol=1e-5, atol=1e-5)


def relative_l2(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm())


def test_full_size():
    """Warp and composition at the network's input size, float32, as IO uses them (a field of a
    few voxels, maps leaving the domain at the edges). Map gradients are compared in relative
    L2: a trilinear gradient jumps at voxel boundaries, and float32 rounding puts a few of the
    5 M points on the other side of one than PyTorch does (a wrong term gives O(1)). Values are
    held to float64: at 175^3 one float32 ulp of a map value moves a sample of this white-noise
    image by up to 4.8e-5 and PyTorch's own float32 warp is 1.2e-5 from float64, so two float32
    warps that round the index apart (a fused multiply-add) differ by more than 1e-5, as they
    did on an H200."""
    gen = torch.Generator().manual_seed(8)
    voxel = 1.0 / (max(FULL_SHAPE) - 1)
    image = torch.rand(1, 1, *FULL_SHAPE, generator=gen).to(DEVICE).requires_grad_()
    field = (3 * voxel * torch.randn(1, 3, *FULL_SHAPE, generator=gen)).to(DEVICE).requires_grad_()
    coords = (ops.identity_map(FULL_SHAPE) + 3 * voxel * torch.randn(1, 3, *FULL_SHAPE, generator=gen)).to(DEVICE)
    coords.requires_grad_()
    for name, op, inputs in (("warp", lambda: kwarp.warp(image, coords, "zeros"), (image, coords)),
                             ("compose", lambda: kcompose.compose_maps(field, coords), (field, coords))):
        result = op()
        with ops.kernel_mode("torch"):
            expected = (ops.warp(image, coords, "zeros") if name == "warp" else ops.compose_maps(field, coords))
            exact = (ops.warp(image.double(), coords.double(), "zeros") if name == "warp"
                     else ops.compose_maps(field.double(), coords.double()))
        ours_error, torchs_error = ((r.double() - exact).abs().max().item() for r in (result, expected))
        assert ours_error < 1e-4, f"{name}: {ours_error:.2e} from float64 (PyTorch's float32: {torchs_error:.2e})"
        grad_out = torch.rand(expected.shape, generator=gen).to(DEVICE)
        ours = torch.autograd.grad(result, inputs, grad_out)
        theirs = torch.autograd.grad(expected, inputs, grad_out)
        assert relative_l2(ours[0], theirs[0]) < 1e-5, name   # image / field: a sum, no jumps
        assert relative_l2(ours[1], theirs[1]) < 5e-3, name   # map


@pytest.mark.parametrize("interpreted,triton_version,numpy_version,refused", [
    (True, "3.6.0", "2.4.6", True), (True, "3.6.0", "2.3.5", False), (True, "3.7.0", "2.4.6", False),
    (True, "3.10.1", "2.10.0", False), (False, "3.6.0", "2.5.2", False)])
def test_interpreter_that_cannot_run_the_kernels_is_named(interpreted, triton_version, numpy_version, refused):
    """Triton's interpreter before 3.7 fails inside the warp kernels with NumPy 2.4+ (a TypeError
    that names neither); compiled kernels (the GPU image: Triton 3.6, NumPy 2.5) do not."""
    problem = kwarp.interpreter_problem(interpreted, triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert "triton>=3.7 or numpy<2.4" in problem


def test_kernels_refuse_an_interpreter_that_cannot_run_them(monkeypatch):
    image, coords = torch.rand(1, 1, 4, 4, 4), torch.rand(1, 3, 3, 3, 3)
    monkeypatch.setattr(kwarp, "INTERPRETER_PROBLEM", "the reason")
    for call in (lambda: kwarp.warp(image, coords), lambda: kcompose.compose_maps(coords, coords)):
        with pytest.raises(RuntimeError, match="the reason"):
            call()


@pytest.mark.parametrize("too_large", ["image", "coords"])
def test_volumes_beyond_32_bit_indices_are_refused(too_large):
    """The kernels index within a volume in 32 bits: 2^31 voxels (an expanded tensor here,
    no memory behind it) would wrap around to other voxels, so they are refused up front."""
    huge = torch.zeros(1, 3, 1, 1, 1).expand(1, 3, 2048, 1024, 1024)
    small_image, small_coords = torch.zeros(1, 1, 4, 4, 4), random_map(1, (4, 4, 4), torch.float32).cpu()
    image, coords = (huge[:, :1], small_coords) if too_large == "image" else (small_image, huge)
    with pytest.raises(InvalidImageError, match="2\\^31 voxels.*MGR_ENGINE_KERNELS=torch"):
        kwarp.warp_forward(image, coords, zero_pad=True, add_coords=False)
