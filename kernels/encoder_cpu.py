"""A U-Net's first encoder level on the CPU in C++ with OpenMP, forward and input gradient.

Each encoder level computes ``conv3d(leaky_relu(x), weight, bias, stride=2, padding=1)`` plus
``avg_pool3d(x, 2, ceil_mode=True)`` zero-padded in front to the convolution's channels
(:meth:`mgr_engine.model.UNet.forward`). At the first level ``x`` is the two images at full
resolution: oneDNN, which blocks channels by 16, ran that convolution's input gradient at about
20 GFLOP/s (28 ms at 175^3, 2 cores), and torch's average pooling copies a channels-last input
to planar and back, so the level took 22 ms forward and 50 ms backward of a full-resolution
U-Net. The extension ``mgr_engine._encoder_cpu`` (``kernels/encoder_cpu.cpp``, built by
``setup.py``) computes the forward and the input gradient each in one pass over channels-last
tensors (the engine's layout), in the widest vectors the CPU has (:func:`vector_bytes`); the
weight and bias gradients stay with oneDNN. 2-core AMD EPYC (Zen 5), 175^3: forward 22.0 ->
10.2 ms, backward 50.4 -> 19.4 ms (benchmarks/RESULTS.md, forty-eighth session).

Reference: :func:`reference`; test: ``tests/test_kernels_encoder_cpu.py``; benchmark:
``benchmarks/bench_encoder_cpu.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mgr_engine.ops import is_channels_last

from .warp_cpu import as_kernel_array

try:
    from mgr_engine import _encoder_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _encoder_cpu = None

# Input channels up to which the level runs here: oneDNN blocks channels by 16, and the
# second level's 16 input channels run well there.
MOST_INPUT_CHANNELS = 4
MOST_OUTPUT_CHANNELS = 64


def available() -> bool:
    """Whether the C++ extension was built."""
    return _encoder_cpu is not None


def vector_bytes(cap: int | None = None) -> int:
    """The vector width in bytes the kernels run in: 64 (AVX-512), 32 (AVX2 + FMA) or 16 (SSE2,
    or another architecture's). ``cap`` (16, 32 or 64) caps it from now on, in this process, and
    0 lifts the cap: the tests run every width on one CPU."""
    return _encoder_cpu.simd_bytes(-1 if cap is None else cap)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
    """The op in PyTorch: an encoder level of :class:`mgr_engine.model.UNet`."""
    y = F.conv3d(F.leaky_relu(x, slope), weight, bias, stride=2, padding=1)
    pooled = F.avg_pool3d(x, 2, ceil_mode=True)
    return y + F.pad(pooled, (0, 0, 0, 0, 0, 0, y.shape[1] - x.shape[1], 0))


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`encoder_level` takes these: CPU tensors of one dtype (float32 or float64),
    ``x`` (B, Ci, D, H, W) with 1 to 4 channels, ``weight`` (Co, Ci, 3, 3, 3) with Ci <= Co <= 64,
    and a bias."""
    if _encoder_cpu is None or bias is None:
        return False
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in (x, weight, bias)):
        return False
    return (x.dtype in (torch.float32, torch.float64) and x.dim() == 5 and 1 <= x.shape[1] <= MOST_INPUT_CHANNELS
            and weight.dim() == 5 and tuple(weight.shape[1:]) == (x.shape[1], 3, 3, 3)
            and x.shape[1] <= weight.shape[0] <= MOST_OUTPUT_CHANNELS and bias.numel() == weight.shape[0])


def takes(x: torch.Tensor, conv: torch.nn.Conv3d) -> bool:
    """Whether a U-Net encoder level of ``x`` through ``conv`` runs here: :func:`supports`, ``x``
    channels-last (the network's layout, no copy), and ``conv`` the U-Net's (kernel 3, stride 2,
    padding 1, zero padding, no dilation, one group)."""
    return (supports(x, conv.weight, conv.bias) and (is_channels_last(x) or x.shape[1] == 1)
            and conv.kernel_size == (3, 3, 3) and conv.stride == (2, 2, 2) and conv.padding == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last axis (output channels) zero-padded to 16, 32 or 64: whole vectors at
    every width, and a power of two of them (the counts the kernels are compiled for)."""
    extra = max(16, 1 << (t.shape[-1] - 1).bit_length()) - t.shape[-1]
    return F.pad(t, (0, extra)) if extra else t


def _kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (Co, Ci, 3, 3, 3) weight as the kernels read it: (27, Ci, P), P = Co padded (:func:`_padded`)."""
    return _padded(weight.detach().permute(2, 3, 4, 1, 0).reshape(27, weight.shape[1], weight.shape[0])).contiguous()


class EncoderLevelCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, slope):
        x = x.detach().contiguous(memory_format=torch.channels_last_3d)
        kernel_weight = _kernel_weight(weight)
        out = torch.empty((x.shape[0], weight.shape[0], *((n + 1) // 2 for n in x.shape[2:])), dtype=x.dtype,
                          memory_format=torch.channels_last_3d)
        _encoder_cpu.encoder_level(as_kernel_array(x), kernel_weight.numpy(),
                                   _padded(bias.detach()).contiguous().numpy(), as_kernel_array(out), slope,
                                   torch.get_num_threads())
        ctx.save_for_backward(x, weight, kernel_weight)
        ctx.slope = slope
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, kernel_weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d)
            _encoder_cpu.encoder_level_input_grad(as_kernel_array(x), kernel_weight.numpy(), as_kernel_array(grad),
                                                  as_kernel_array(grad_x), ctx.slope, torch.get_num_threads())
        if need_weight or need_bias:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, F.leaky_relu(x, ctx.slope), weight, [weight.shape[0]] if need_bias else None, [2] * 3, [1] * 3,
                [1] * 3, False, [0] * 3, 1, [False, need_weight, need_bias])
        return grad_x, grad_weight, grad_bias, None


def encoder_level(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
    """:func:`reference` in C++, differentiable in ``x``, ``weight`` and ``bias``; a channels-last
    output. Needs :func:`supports` (an ``x`` not channels-last is copied to it)."""
    return EncoderLevelCPU.apply(x, weight, bias, slope)
