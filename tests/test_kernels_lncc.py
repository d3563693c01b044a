"""Triton windowed LNCC / LNCC^2 against the PyTorch reference (mgr_engine.losses).

On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), at small
sizes; on a GPU compiled, and ``test_full_size`` runs at the network's 175^3.
"""

import weakref

import pytest
import torch

from helpers import INTERPRETED, require_triton_kernels
from helpers import KERNEL_DEVICE as DEVICE

require_triton_kernels()

from mgr_engine import losses, ops  # noqa: E402
from mgr_engine.kernels import lncc as klncc  # noqa: E402

# gradcheck's fast mode in the interpreter: see test_kernels_warp.py

FULL_SHAPE = (175, 175, 175) if DEVICE == "cuda" else (23, 11, 25)  # the interpreter is slow
PAIRS = [(klncc.lncc_loss, losses.lncc_loss), (klncc.lncc2_loss, losses.lncc2_loss)]


@pytest.fixture(autouse=True)
def fewer_programs_in_the_interpreter(monkeypatch):
    """The interpreter runs each program in Python, at about the same cost whatever its block size:
    blocks of 1024 voxels (any power of two is valid) instead of 256 cut this file's time 2-3x. The
    (12, 5, 23) volumes and FULL_SHAPE still span several blocks, so block edges and the per-block
    sums of the loss stay tested."""
    if INTERPRETED:
        monkeypatch.setattr(klncc, "BLOCK", 1024)


def volumes(batch, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 1, *shape, generator=gen, dtype=dtype)
    # correlated, partly anticorrelated, with a constant patch (zero local variance)
    other = 0.6 * base - 0.4 * torch.rand(batch, 1, *shape, generator=gen, dtype=dtype)
    other[..., : shape[0] // 3, :, :] = 0.5
    mask = (torch.rand(batch, 1, *shape, generator=gen) > 0.4).to(dtype)
    return base.to(DEVICE), other.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("ours,reference", PAIRS)
@pytest.mark.parametrize("batch,shape", [(1, (6, 7, 5)), (2, (12, 5, 23)), (1, (25, 3, 4)), (1, (7, 4, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gradients_of", ["both", "image", "target"])
def test_lncc_values_and_gradients(ours, reference, batch, shape, dtype, masked, gradients_of):
    """Values and gradients against the PyTorch reference; a gradient for one image alone runs
    the backward pass with three moment gradients (and, for the target, the images swapped)."""
    image, target, mask = volumes(batch, shape, dtype)
    mask = mask if masked else None
    inputs = {"both": (image, target), "image": (image,), "target": (target,)}[gradients_of]
    for tensor in inputs:
        tensor.requires_grad_()
    with ops.kernel_mode("torch"):  # the reference, also on a GPU
        expected = reference(image, target, mask)
    result = ours(image, target, mask)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    if masked and dtype == torch.float64:  # the reference's masked mean sums in float32 whatever the dtype
        tolerance = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result, expected, **tolerance)
    for a, b in zip(torch.autograd.grad(result, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("ours,reference", PAIRS)
@pytest.mark.parametrize("gradients_of", ["both", "image", "target"])
def test_lncc_gradcheck(ours, reference, gradients_of):
    image, target, mask = volumes(1, (4, 5, 3), torch.float64, seed=3)
    image.requires_grad_(gradients_of != "target")
    target.requires_grad_(gradients_of != "image")
    assert torch.autograd.gradcheck(lambda a, b: ours(a, b, mask), (image, target), eps=1e-6, atol=1e-6,
                                    fast_mode=INTERPRETED)


def test_16bit_image_in_float32():
    """A 16-bit image is compared in float32 (16-bit local moments would lose the small
    variances LNCC divides by); its gradient comes back in its own dtype."""
    image, target, _ = volumes(1, (9, 6, 8), torch.float32, seed=4)
    half, half_target = image.to(torch.bfloat16).requires_grad_(), target.to(torch.bfloat16)
    exact = half.detach().float().requires_grad_()
    result = klncc.lncc2_loss(half, half_target)
    with ops.kernel_mode("torch"):
        expected = losses.lncc2_loss(exact, half_target.float())
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(result, half)
    (expected_grad,) = torch.autograd.grad(expected, exact)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected_grad.to(torch.bfloat16))


@pytest.mark.parametrize("masked", [False, True])
def test_full_size(masked):
    """LNCC^2 loss and its gradients at the network's input size, float32."""
    image, target, mask = volumes(1, FULL_SHAPE, torch.float32, seed=9)
    mask = mask if masked else None
    image.requires_grad_()
    target.requires_grad_()
    with ops.kernel_mode("torch"):
        expected = losses.lncc2_loss(image, target, mask)
    result = klncc.lncc2_loss(image, target, mask)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(result, (image, target)), torch.autograd.grad(expected, (image, target))):
        assert float((a - b).norm() / b.norm()) < 1e-4


class CountingTorch:
    """``torch`` as :mod:`kernels.lncc` sees it, its allocations (``empty``, ``empty_like``,
    ``zeros``, ``full``) counted: the bytes alive now and at the most."""

    def __init__(self):
        self.alive = self.peak = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _counted(self, tensor):
        nbytes = tensor.untyped_storage().nbytes()
        self.alive += nbytes
        self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._freed, nbytes)
        return tensor

    def _freed(self, nbytes):
        self.alive -= nbytes

    def empty(self, *args, **kwargs):
        return self._counted(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._counted(torch.empty_like(*args, **kwargs))

    def zeros(self, *args, **kwargs):
        return self._counted(torch.zeros(*args, **kwargs))

    def full(self, *args, **kwargs):
        return self._counted(torch.full(*args, **kwargs))


@pytest.mark.parametrize("gradients_of,volumes_at_peak", [("image", 5), ("both", 7)])
def test_scratch_memory_peak(monkeypatch, gradients_of, volumes_at_peak):
    """The kernel's own buffers over forward and backward, in 5 slabs of 2 slices: the moment
    gradients (3 volumes, 5 with both gradients) with either the first chain's two slab buffers
    (2 volumes) or the input gradients (1 or 2). A whole moment buffer blurred along D took 6
    volumes (with both gradients 7); separate buffers for each pass' output 13, then 10."""
    monkeypatch.setattr(klncc, "SLABS", 5)
    counting = CountingTorch()
    monkeypatch.setattr(klncc, "torch", counting)
    image, target, _ = volumes(2, (10, 7, 5), torch.float32)
    inputs = (image, target) if gradients_of == "both" else (image,)
    for tensor in inputs:
        tensor.requires_grad_()
    grads = torch.autograd.grad(klncc.lncc2_loss(image, target), inputs)
    assert len(grads) == len(inputs)
    volume = image.numel() * image.element_size()
    assert volumes_at_peak * volume <= counting.peak <= volumes_at_peak * volume + 64, counting.peak / volume


@pytest.mark.parametrize("slabs", [1, 3, 100])
def test_slab_counts(monkeypatch, slabs):
    """One slab (the whole volume), slabs of unequal size (7 slices in 3), more slabs than slices."""
    monkeypatch.setattr(klncc, "SLABS", slabs)
    image, target, mask = volumes(2, (7, 6, 5), torch.float64, seed=5)
    image.requires_grad_()
    with ops.kernel_mode("torch"):
        expected = losses.lncc2_loss(image, target, mask)
    result = klncc.lncc2_loss(image, target, mask)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(result, image)[0], torch.autograd.grad(expected, image)[0],
                               rtol=1e-6, atol=1e-7)
