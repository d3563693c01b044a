"""Triton MIND-SSC descriptor (kernels/mind_ssc.py) against the PyTorch reference (mgr_engine.losses).

On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), at small
sizes; on a GPU compiled, and ``test_full_size`` runs at the network's 175^3.
"""

import pytest
import torch

from helpers import (INTERPRETED, assert_mind_close, descriptors_and_gradients, image_constant_along_z,
                     image_with_flat_region, require_triton_kernels, smooth_volume)
from helpers import MIND_TOLERANCE as TOLERANCE
from helpers import KERNEL_DEVICE as DEVICE

require_triton_kernels()

from mgr_engine import losses, ops  # noqa: E402
from mgr_engine.kernels import mind_ssc as kmind  # noqa: E402

# Odd and non-cubic grids; axes shorter than the dilation (2) and the patch radius (2), a single
# voxel, where replicate padding reads the edge voxel for most offsets.
SHAPES = [(7, 9, 11), (1, 6, 5), (2, 3, 13), (12, 1, 4)]


@pytest.fixture(autouse=True)
def fewer_programs_in_the_interpreter(monkeypatch):
    """The interpreter runs each program in Python, at about the same cost whatever its block
    size: blocks of 1024 voxels (any power of two is valid) instead of 256. Most grids here then
    take one program a channel; (12, 10, 14) and the 175^3 test on a GPU still span several."""
    if INTERPRETED:
        monkeypatch.setattr(kmind, "BLOCK", 1024)


def reference(image):
    with ops.kernel_mode("torch"):
        return losses.mind_ssc(image)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_values_and_gradients_match_pytorch(dtype, shape, batch):
    image = image_with_flat_region(batch, shape, dtype, seed=0, device=DEVICE).requires_grad_()
    pairs = descriptors_and_gradients(kmind.mind_ssc, reference, image, seed=1)
    (got, expected), (got_grad, expected_grad) = pairs
    assert got.shape == expected.shape == (batch, 12, *shape) and got.is_contiguous()
    assert_mind_close(got, expected, dtype)
    assert float(expected_grad.abs().max()) > 0
    assert_mind_close(got_grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_minima_give_the_gradient_to_the_first(dtype):
    """Exact ties of nonzero patch means (:func:`helpers.image_constant_along_z`): the gradient
    through the minimum goes to the first of the tied channels, as in the PyTorch path."""
    image = image_constant_along_z((6, 9, 8), dtype, seed=6, device=DEVICE).requires_grad_()
    pairs = descriptors_and_gradients(kmind.mind_ssc, reference, image, seed=7)
    (got, expected), (got_grad, expected_grad) = pairs
    assert_mind_close(got, expected, dtype)
    assert_mind_close(got_grad, expected_grad, dtype)


def test_gradcheck_float64():
    image = torch.rand(1, 1, 5, 6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # in the interpreter a random projection of the Jacobian (fast mode), as test_kernels_warp.py
    assert torch.autograd.gradcheck(kmind.mind_ssc, (image.to(DEVICE).requires_grad_(),), fast_mode=INTERPRETED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_distance_loss_and_gradient_match_pytorch(dtype, masked, batch):
    """The MIND-SSC loss against a target's descriptor in one op (no difference or square kept)
    against kernel mode "torch"; one mask for the batch, or one each."""
    shape = (9, 8, 10)
    image = image_with_flat_region(batch, shape, dtype, seed=2, device=DEVICE)
    target_desc = reference(torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(3),
                                       dtype=dtype).to(DEVICE))
    mask = None
    if masked:
        mask = (torch.rand(1 if batch == 2 else batch, 1, *shape, generator=torch.Generator().manual_seed(4))
                > 0.4).to(DEVICE)
    assert losses.fused_distance_applies(image, target_desc, mask)
    moving = image.clone().requires_grad_()
    got = kmind.mind_distance(moving, target_desc, mask)
    got_grad = torch.autograd.grad(got, moving)[0]
    with ops.kernel_mode("torch"):
        expected = losses.mind_distance(moving, target_desc, mask)
        expected_grad = torch.autograd.grad(expected, moving)[0]
    assert got.dtype == expected.dtype == dtype
    assert abs(got.item() - expected.item()) <= TOLERANCE[dtype] * expected.item()
    assert float(expected_grad.abs().max()) > 0
    assert_mind_close(got_grad, expected_grad, dtype)


def test_mind_loss_takes_it_in_kernel_mode_triton(monkeypatch):
    """IO's MIND-SSC loss dispatches here where Triton runs (CUDA, or kernel mode "triton" in the
    interpreter): the target's descriptor once, then one fused loss a call; loss and gradient
    equal kernel mode "torch"'s. A target that wants its gradient gets it through the descriptor op."""
    calls = []
    for function in (kmind.MindSSC, kmind.MindDistance):
        monkeypatch.setattr(function, "apply", lambda *args, _name=function.__name__, _apply=function.apply:
                            calls.append(_name) or _apply(*args))
    shape = (12, 10, 14)
    image = torch.from_numpy(smooth_volume(shape, 1))[None, None].double().to(DEVICE).requires_grad_()
    target = torch.from_numpy(smooth_volume(shape, 2))[None, None].double().to(DEVICE)
    mask = (torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(3)) > 0.3).to(DEVICE)

    def loss_and_gradient():
        similarity = losses.with_constant_targets(losses.similarity_by_name("mind"))
        loss = similarity(image, target, mask)
        return loss.item(), torch.autograd.grad(loss, image)[0]

    mode = "triton" if INTERPRETED else "auto"
    with ops.kernel_mode(mode):
        got = loss_and_gradient()
    assert calls == ["MindSSC", "MindDistance"]
    with ops.kernel_mode("torch"):
        expected = loss_and_gradient()
    assert len(calls) == 2
    assert abs(got[0] - expected[0]) <= 1e-12 * expected[0]
    assert float(expected[1].abs().max()) > 0
    assert_mind_close(got[1], expected[1], torch.float64)
    with ops.kernel_mode(mode):
        target_grad = target.clone().requires_grad_()
        losses.mind_loss(image, target_grad).backward()
    assert calls[2:] == ["MindSSC", "MindSSC"] and float(target_grad.grad.abs().max()) > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="full size on a GPU only (the interpreter is slow)")
def test_full_size():
    image = torch.from_numpy(smooth_volume((175, 175, 175), 1))[None, None].to(DEVICE).requires_grad_()
    got = kmind.mind_ssc(image)
    expected = reference(image)
    exact = reference(image.detach().double())
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got_grad, expected_grad = (torch.autograd.grad(d, image, grad_out)[0] for d in (got, expected))
    # float32 against float64: the descriptor divides by a clamped local variance, tiny in flat
    # regions, so each implementation's rounding shows (about 1e-6 of the value, 1e-4 of the
    # gradient on the CPU); no worse than PyTorch's own float32
    assert (got.double() - exact).abs().max() <= max(2e-6, 2 * (expected.double() - exact).abs().max())
    assert (got_grad - expected_grad).abs().max() <= 5e-4 * expected_grad.abs().max()
