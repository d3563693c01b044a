"""LNCC's Gaussian window on the CPU in C++ with OpenMP: a separable blur with zero padding,
forward and backward.

:func:`mgr_engine.losses.gaussian_blur` (21 taps, sigma 5) takes it on CPU tensors. PyTorch's
fastest CPU form of this blur was three banded matrix products, each output voxel weighing all
voxels of its line (175 multiply-adds at 175^3 where 21 carry weight): 115 ms for the three
volumes LNCC blurs per call (2 cores), and as much again in its backward. The extension
``mgr_engine._gaussian_blur_cpu`` (``kernels/gaussian_blur_cpu.cpp``, built by ``setup.py``)
sums the taps only: 31 ms. The window is symmetric and zero-padded, so the blur is its own
adjoint: the backward blurs the gradient (and is differentiable again).

Reference: :func:`reference` (:func:`mgr_engine.losses.separable_filter` of banded matrices,
the PyTorch path); test: ``tests/test_kernels_gaussian_blur_cpu.py``; benchmark:
``benchmarks/bench_gaussian_blur_cpu.py``.
"""

from __future__ import annotations

import torch

try:
    from mgr_engine import _gaussian_blur_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _gaussian_blur_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _gaussian_blur_cpu is not None


def reference(volume: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The op in PyTorch: ``volume`` (B, C, D, H, W) blurred along each axis by the 1-D ``taps``
    (odd, centred), zero padding, as banded matrix products (the engine's PyTorch path)."""
    from mgr_engine.losses import banded_matrix, separable_filter

    return separable_filter(volume, lambda n: banded_matrix(n, taps))


def supports(volume: torch.Tensor, taps: torch.Tensor) -> bool:
    """Whether :func:`blur` takes these: CPU tensors of one dtype (float32 or float64), ``volume``
    5-D, ``taps`` 1-D, odd and symmetric (the backward relies on it)."""
    if _gaussian_blur_cpu is None or volume.device.type != "cpu" or taps.device.type != "cpu":
        return False
    if volume.dtype not in (torch.float32, torch.float64) or taps.dtype != volume.dtype:
        return False
    return (volume.dim() == 5 and taps.dim() == 1 and taps.numel() % 2 == 1
            and bool(torch.equal(taps, taps.flip(0))))


def _blur(volume: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    volume = volume.detach().contiguous()
    out = torch.empty_like(volume)
    grid = volume.shape[2:]
    _gaussian_blur_cpu.blur(volume.view(-1, *grid).numpy(), taps.detach().contiguous().numpy(),
                            out.view(-1, *grid).numpy(), torch.get_num_threads())
    return out


class GaussianBlurCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume, taps):
        ctx.taps = taps
        return _blur(volume, taps)

    @staticmethod
    def backward(ctx, grad):
        return GaussianBlurCPU.apply(grad, ctx.taps), None  # symmetric taps: the blur is self-adjoint


def blur(volume: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """:func:`reference` in C++ (planar output), differentiable in ``volume``. Needs :func:`supports`."""
    return GaussianBlurCPU.apply(volume, taps)
