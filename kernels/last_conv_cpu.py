"""The U-Net's last convolution on the CPU in C++ with OpenMP, forward and backward.

Each U-Net ends in ``Conv3d(Cin, 3, kernel_size=3, padding=1)``: the displacement. oneDNN,
torch's CPU convolution, blocks output channels by 16, so with 3 it does about five times the
arithmetic; at 175^3 this one layer took 0.24 s forward and 0.52 s backward of a
full-resolution U-Net (2 cores), as much as the rest of its forward. The extension
``mgr_engine._last_conv_cpu`` (``kernels/last_conv_cpu.cpp``, built by ``setup.py``) computes
it vectorized along x, for a channels-last input (the engine's layout), with a planar output
(the layout the warps read the field in, so the network's last ``.contiguous()`` has nothing
left to do), and its gradients with respect to the input and the weight, in the widest vectors
the CPU has (:func:`vector_bytes`).

Reference: :func:`reference` (``F.conv3d``); test: ``tests/test_kernels_last_conv_cpu.py``;
benchmark: ``benchmarks/bench_last_conv_cpu.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .warp_cpu import as_kernel_array

try:
    from mgr_engine import _last_conv_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _last_conv_cpu = None

CHANNELS_LAST = torch.channels_last_3d


def available() -> bool:
    """Whether the C++ extension was built."""
    return _last_conv_cpu is not None


def vector_bytes(cap: int | None = None) -> int:
    """The vector width in bytes the C++ passes run in: 64 (AVX-512), 32 (AVX2 + FMA) or 16
    (SSE2, or another architecture's). ``cap`` (16, 32 or 64) caps it from now on, in this
    process, and 0 lifts the cap: the tests run every width on one CPU."""
    return _last_conv_cpu.simd_bytes(-1 if cap is None else cap)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op in PyTorch: ``F.conv3d(x, weight, bias, padding=1)``."""
    return F.conv3d(x, weight, bias, padding=1)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`last_conv` takes these: CPU tensors of one dtype (float32 or float64),
    ``x`` (B, Cin, D, H, W), ``weight`` (3, Cin, 3, 3, 3) and a bias."""
    if _last_conv_cpu is None or bias is None:
        return False
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in (x, weight, bias)):
        return False
    return (x.dtype in (torch.float32, torch.float64) and x.dim() == 5
            and tuple(weight.shape) == (3, x.shape[1], 3, 3, 3) and bias.numel() == 3)


class LastConvCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recompute_x):
        x = x.detach().contiguous(memory_format=CHANNELS_LAST)
        weight = weight.detach().contiguous()
        out = torch.empty((x.shape[0], 3, *x.shape[2:]), dtype=x.dtype)
        _last_conv_cpu.last_conv(as_kernel_array(x), weight.numpy(), bias.detach().contiguous().numpy(),
                                 out.numpy(), torch.get_num_threads())
        # As mgr_engine.model._LowMemoryConv: recompute_x's tensors are saved, not held by ctx.
        ctx.recompute, kept = recompute_x if recompute_x is not None else (None, (x,))
        ctx.save_for_backward(weight, *kept)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weight, *kept = ctx.saved_tensors
        x = kept[0] if ctx.recompute is None else ctx.recompute(*kept).contiguous(memory_format=CHANNELS_LAST)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x, memory_format=CHANNELS_LAST) if need_x else x.new_empty((0,) * 5)
        grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty((0,) * 5)
        if need_x or need_weight:
            _last_conv_cpu.last_conv_backward(
                as_kernel_array(x), weight.numpy(), grad_out.numpy(),
                as_kernel_array(grad_x) if need_x else grad_x.numpy(), grad_weight.numpy(),
                need_x, need_weight, torch.get_num_threads())
        grad_bias = grad_out.sum((0, 2, 3, 4)) if need_bias else None
        return (grad_x if need_x else None), (grad_weight if need_weight else None), grad_bias, None


def last_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, recompute_x=None) -> torch.Tensor:
    """:func:`reference` in C++, differentiable in all three; planar (contiguous) output.
    ``recompute_x``: ``(function, tensors)``, ``function(*tensors)`` returning ``x`` bit for
    bit, called in the backward pass instead of keeping ``x`` (see
    :func:`mgr_engine.model.decoder_output_recipe`). Needs
    :func:`supports`."""
    return LastConvCPU.apply(x, weight, bias, recompute_x)
