"""Triton backward of a decoder level's eval-mode BatchNorm, crop and concatenation
(kernels/norm_crop_concat.py) against its PyTorch reference, the torch path of
mgr_engine.model._EvalNormCropConcat.

On the CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) at small shapes; on
a GPU compiled, and ``test_full_size`` at the full-resolution level of a 175^3 network.
"""

import pytest
import torch

from helpers import INTERPRETED, NARROW, eval_batchnorm, randomize_, require_triton_kernels
from helpers import KERNEL_DEVICE as DEVICE

require_triton_kernels()

from mgr_engine import ops  # noqa: E402
from mgr_engine.kernels import norm_crop_concat as knorm  # noqa: E402
from mgr_engine.model import UNet, _EvalNormCropConcat, norm_crop_concat  # noqa: E402

LAYOUTS = {"planar": torch.contiguous_format, "channels-last": torch.channels_last_3d}
# x's grid, the skip's (the crop's) grid; the last spans two chunks of BLOCK * ROUNDS voxels
GRIDS = [((6, 7, 5), (6, 7, 5)), ((7, 6, 8), (6, 6, 7)), ((21, 20, 22), (20, 19, 22))]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's calls, counted: a test that means the Triton path checks it ran."""
    calls = []
    original = knorm.norm_crop_concat_backward

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(knorm, "norm_crop_concat_backward", counted)
    return calls


def inputs(batch, channels, skip_channels, grid, skip_grid, dtype, layout, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *grid, generator=gen, dtype=dtype)
    skip = torch.randn(batch, skip_channels, *skip_grid, generator=gen, dtype=dtype)
    grad = torch.randn(batch, channels + skip_channels, *skip_grid, generator=gen, dtype=dtype)
    x, skip = (t.to(DEVICE).contiguous(memory_format=layout).requires_grad_() for t in (x, skip))
    return x, skip, grad.to(DEVICE)


def gradients(norm, x, skip, grad, mode):
    with ops.kernel_mode(mode):
        out = norm_crop_concat(norm, x, skip)
        assert isinstance(out.grad_fn, _EvalNormCropConcat._backward_cls)
        return out, torch.autograd.grad(out, (x, skip, norm.weight, norm.bias), grad)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("grid,skip_grid", GRIDS)
@pytest.mark.parametrize("batch,channels", [(1, 1), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_the_reference(layout, grid, skip_grid, batch, channels, dtype, kernel_calls):
    norm = eval_batchnorm(channels, seed=1, dtype=dtype, device=DEVICE)
    x, skip, grad = inputs(batch, channels, 3, grid, skip_grid, dtype, layout)
    expected, expected_grads = gradients(norm, x, skip, grad, "torch")
    assert not kernel_calls
    result, grads = gradients(norm, x, skip, grad, "triton")
    assert kernel_calls == [x.shape]
    assert torch.equal(result, expected)  # the forward is the same PyTorch
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, ours, theirs in zip(("x", "skip", "weight", "bias"), grads, expected_grads):
        torch.testing.assert_close(ours, theirs, **tolerance, msg=lambda m: f"gradient of {name}: {m}")
    assert all(g.is_contiguous(memory_format=layout) for g in grads[:2])  # in the inputs' layout
    if grid != skip_grid:  # the crop's cut-off part of x has no gradient
        d, h, w = skip_grid
        cut = torch.ones(grid, dtype=torch.bool)
        cut[:d, :h, :w] = False
        assert grads[0][..., cut.to(DEVICE)].abs().max() == 0 and grads[0].abs().max() > 0


@pytest.mark.parametrize("needs", ["weight and bias", "x"])
def test_only_the_gradients_asked_for(needs, kernel_calls):
    """x without gradient (the kernel writes no input gradient), or BatchNorm's parameters frozen."""
    norm = eval_batchnorm(3, seed=5, dtype=torch.float64, device=DEVICE)
    x, skip, grad = inputs(2, 3, 2, (7, 6, 8), (6, 6, 7), torch.float64, torch.contiguous_format)
    if needs == "x":
        norm.requires_grad_(False)
        wanted = (x,)
    else:
        x.requires_grad_(False)
        wanted = (norm.weight, norm.bias)
    results = {}
    for mode in ("torch", "triton"):
        with ops.kernel_mode(mode):
            results[mode] = torch.autograd.grad(norm_crop_concat(norm, x, skip), wanted, grad)
    assert len(kernel_calls) == 1
    for ours, theirs in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    """In the interpreter a random projection of the Jacobian (fast_mode; the full one took 190 s
    on 2 cores), whose errors the float64 comparisons above bound; compiled, the full one."""
    norm = eval_batchnorm(3, seed=3, dtype=torch.float64, device=DEVICE)
    x, skip, _ = inputs(2, 3, 2, (4, 5, 4), (3, 5, 4), torch.float64, torch.contiguous_format, seed=4)
    with ops.kernel_mode("triton"):
        torch.autograd.gradcheck(
            lambda x, skip, weight, bias: _EvalNormCropConcat.apply(x, skip, weight, bias, norm.running_mean,
                                                                     norm.running_var, norm.eps),
            (x, skip, norm.weight, norm.bias), fast_mode=INTERPRETED)


def test_unet_gradients_with_the_kernel_equal_the_reference(kernel_calls):
    """The kernel where IO meets it: a U-Net (narrow, eval mode) forward and backward, every
    parameter's gradient as with PyTorch's BatchNorm backward."""
    torch.manual_seed(0)
    unet = randomize_(UNet(NARROW["down_channels"], NARROW["up_channels"]), seed=6).eval().to(DEVICE, torch.float64)
    gen = torch.Generator().manual_seed(7)
    moving, fixed = (torch.rand(1, 1, 35, 34, 33, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    params = list(unet.parameters())
    results = {}
    for mode in ("torch", "triton"):
        with ops.kernel_mode(mode):
            results[mode] = torch.autograd.grad(unet(moving, fixed).square().sum(), params)
    assert len(kernel_calls) == len(unet.upConvs)
    for (name, _), ours, theirs in zip(unet.named_parameters(), results["triton"], results["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(DEVICE != "cuda", reason="the full-resolution level on a GPU")
def test_full_size(kernel_calls):
    """The full-resolution level of a 175^3 network in IO: 16 channels at 176^3, two samples."""
    norm = eval_batchnorm(16, seed=8, dtype=torch.float32, device=DEVICE)
    x, skip, grad = inputs(2, 16, 2, (176, 176, 176), (175, 175, 175), torch.float32, torch.contiguous_format)
    _, expected = gradients(norm, x, skip, grad, "torch")
    _, grads = gradients(norm, x, skip, grad, "triton")
    assert len(kernel_calls) == 1
    for ours, theirs in zip(grads[:2], expected[:2]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads[2:], expected[2:]):  # sums of 11 M products, in another order
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-2)
