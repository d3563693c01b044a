"""The MIND-SSC descriptor on the CPU in C++ with OpenMP, forward and backward.

:func:`mgr_engine.losses.mind_ssc` takes it on CPU tensors. In PyTorch the descriptor is a dozen
passes over 12-channel volumes and autograd's backward as many again: one MIND-SSC loss, forward
and backward, took 3.3 s at 175^3 on 2 cores, and an IO step with MIND-SSC computes two (one per
direction). The extension ``mgr_engine._mind_ssc_cpu`` (``kernels/mind_ssc_cpu.cpp``, built by
``setup.py``) computes the patch means and their normalization in one pass each, and its backward
recomputes the patch means from the image instead of keeping them. The variance's clamp bounds
(from its mean over the batch) and the final ``exp`` are computed as the reference computes them.

Reference: :func:`reference` (:func:`mgr_engine.losses.mind_ssc`'s PyTorch path); test:
``tests/test_kernels_mind_ssc_cpu.py``; benchmark: ``benchmarks/bench_mind_ssc_cpu.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

try:
    from mgr_engine import _mind_ssc_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _mind_ssc_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _mind_ssc_cpu is not None


def reference(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """The op in PyTorch: :func:`mgr_engine.losses.mind_ssc` with the C++ kernels off."""
    from mgr_engine.losses import mind_ssc
    from mgr_engine.ops import kernel_mode

    with kernel_mode("torch"):
        return mind_ssc(image, radius, dilation)


def supports(image: torch.Tensor) -> bool:
    """Whether :func:`mind_ssc` takes ``image``: a CPU tensor (B, 1, D, H, W) of float32 or float64."""
    from mgr_engine.losses import mind_kernels_take

    return _mind_ssc_cpu is not None and image.device.type == "cpu" and mind_kernels_take(image)


def pair_offsets(dilation: int) -> np.ndarray:
    """The 12 pairs of neighbour offsets (12, 2, 3) in voxels (z, y, x), in the reference's channel order."""
    from mgr_engine.losses import _MIND_PAIRS

    return np.ascontiguousarray(np.array(_MIND_PAIRS, dtype=np.int64) * dilation)


def _descriptor(image: torch.Tensor, radius: int, dilation: int):
    """The descriptor of ``image`` (contiguous, detached) and the bounds its variance was clamped to."""
    from mgr_engine.losses import mind_variance_bounds

    batch, _, *grid = image.shape
    desc = torch.empty((batch, 12, *grid), dtype=image.dtype)
    variance = torch.empty((batch, 1, *grid), dtype=image.dtype)
    _mind_ssc_cpu.forward(image.view(batch, *grid).numpy(), pair_offsets(dilation), radius, desc.numpy(),
                          variance.numpy(), torch.get_num_threads())
    lo, hi = mind_variance_bounds(variance)  # as the reference takes them
    desc.div_(torch.clamp(variance, lo, hi)).neg_().exp_()
    return desc, lo.item(), hi.item()


class MindSSCCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, radius: int, dilation: int):
        image = image.detach().contiguous()
        desc, lo, hi = _descriptor(image, radius, dilation)
        ctx.save_for_backward(image, desc)
        ctx.args = (radius, dilation, lo, hi)
        return desc

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_desc):
        image, desc = ctx.saved_tensors
        radius, dilation, lo, hi = ctx.args
        batch, _, *grid = image.shape
        grad_image = torch.empty_like(image)
        work = torch.empty((12, *grid), dtype=image.dtype)  # the extension's scratch
        _mind_ssc_cpu.backward(image.view(batch, *grid).numpy(), pair_offsets(dilation), radius, desc.numpy(),
                               grad_desc.to(image.dtype).contiguous().numpy(), lo, hi,
                               grad_image.view(batch, *grid).numpy(), work.numpy(), torch.get_num_threads())
        return grad_image, None, None


class MindDistanceCPU(torch.autograd.Function):
    """``masked_mean((mind_ssc(image) - target_desc) ** 2, mask)`` with the difference, its square
    and the descriptor's gradient computed where used, not stored (12 channels each)."""

    @staticmethod
    def forward(ctx, image, target_desc, included, radius: int, dilation: int):
        image = image.detach().contiguous()
        batch, _, *grid = image.shape
        desc, lo, hi = _descriptor(image, radius, dilation)
        target_desc = target_desc.detach().expand(batch, *target_desc.shape[1:]).contiguous()
        weights = None if included is None else included.expand(batch, 1, *grid).reshape(batch, *grid).contiguous()
        sums = _mind_ssc_cpu.squared_distance(desc.numpy(), target_desc.numpy(),
                                              None if weights is None else weights.numpy(), torch.get_num_threads())
        # masked_mean's divisors: the included values of each sample (12 per voxel), at least 1
        counts = [max(12 * (math.prod(grid) if weights is None else weights[n].sum().item()), 1) for n in range(batch)]
        ctx.save_for_backward(image, desc, target_desc, weights)
        ctx.args = (radius, dilation, lo, hi, counts)
        return torch.tensor(sum(total / count for total, count in zip(sums, counts)) / batch, dtype=image.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        image, desc, target_desc, weights = ctx.saved_tensors
        radius, dilation, lo, hi, counts = ctx.args
        batch, _, *grid = image.shape
        scales = torch.tensor([2 * grad_loss.item() / (batch * count) for count in counts], dtype=image.dtype)
        grad_image = torch.empty_like(image)
        work = torch.empty((12, *grid), dtype=image.dtype)  # the extension's scratch
        _mind_ssc_cpu.distance_backward(image.view(batch, *grid).numpy(), pair_offsets(dilation), radius,
                                        desc.numpy(), target_desc.numpy(), None if weights is None else weights.numpy(),
                                        scales.numpy(), lo, hi, grad_image.view(batch, *grid).numpy(), work.numpy(),
                                        torch.get_num_threads())
        return grad_image, None, None, None, None


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """:func:`reference` in C++, differentiable (once) in ``image``. Needs :func:`supports`."""
    return MindSSCCPU.apply(image, radius, dilation)


def mind_distance(image: torch.Tensor, target_desc: torch.Tensor, mask: torch.Tensor | None = None,
                  radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """``masked_mean((reference(image) - target_desc) ** 2, mask)`` in C++, differentiable (once) in
    ``image``. Needs :func:`supports` and :func:`mgr_engine.losses.fused_distance_applies`."""
    included = None if mask is None else (mask != 0).to(image.dtype)
    return MindDistanceCPU.apply(image, target_desc, included, radius, dilation)
