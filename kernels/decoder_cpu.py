"""The U-Net decoder on the CPU in C++ with OpenMP: trilinear 2x upsampling, the folded
BatchNorm's multiply-add, the crop and the concatenation with the skip in one pass.

At each decoder level the inference network (BatchNorm folded, channels-last) computes
``cat([(y + scale * F.interpolate(x[:, :C], scale_factor=2, mode="trilinear"))[crop], skip], 1)``
(:func:`reference`). On the CPU these were three passes over the largest tensors of the forward
(at 175^3, 16 channels at 176^3): torch's upsampling alone took 0.3 s per full-resolution U-Net.
The extension ``mgr_engine._trilinear_cpu`` (``kernels/trilinear_cpu.cpp``, built by
``setup.py``) computes it in one, parallel over output rows (:func:`upsample_add_concat`, no
autograd). Instance optimization and training, whose BatchNorm is not folded, take the part
before it, ``y + upsample(x)`` (:func:`upsample_add`), with gradients (the upsampling's adjoint
in C++ too: torch's took 100 ms at 16 x 176^3), and the level's eval-mode BatchNorm, crop and
concatenation (:func:`norm_concat`, :func:`norm_concat_backward`: one pass each where torch's
path took two and four). Test:
``tests/test_kernels_decoder_cpu.py``; benchmark: ``benchmarks/bench_decoder_cpu.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mgr_engine.ops import is_channels_last, memory_format_of
from .warp_cpu import _trilinear_cpu, as_kernel_array

CHANNELS_LAST = torch.channels_last_3d


def reference(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The epilogue in PyTorch ops: ``y`` (B, C, 2d, 2h, 2w) from the transposed convolution,
    ``x`` (B, Cx >= C, d, h, w) its input, ``scale`` (C elements), ``skip`` (B, Cs, D, H, W)."""
    up = F.interpolate(x[:, : y.shape[1]], scale_factor=2, mode="trilinear", align_corners=False)
    out = torch.addcmul(y, scale.reshape(1, -1, 1, 1, 1), up)
    return torch.cat([out[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]], skip], 1)


def supports_upsample_add(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`upsample_add` takes these: CPU float32/float64 tensors of one dtype, ``y``
    on the grid twice ``x``'s, ``x`` with at least ``y``'s channels (fewer: torch zero-pads)."""
    if _trilinear_cpu is None or y.device.type != "cpu" or x.device.type != "cpu" or x.dtype != y.dtype:
        return False
    fits = all(y.shape[a] == 2 * x.shape[a] for a in (2, 3, 4)) and y.shape[0] == x.shape[0]
    return y.dtype in (torch.float32, torch.float64) and x.shape[1] >= y.shape[1] and fits


def supports(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether :func:`upsample_add_concat` takes these: as :func:`supports_upsample_add`, and
    ``scale`` and ``skip`` as :func:`reference` wants them, nothing to differentiate."""
    if not supports_upsample_add(y, x) or any(t.device.type != "cpu" or t.dtype != y.dtype for t in (scale, skip)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, x, scale, skip)):
        return False
    return scale.numel() == y.shape[1] and skip.shape[0] == y.shape[0] and all(
        skip.shape[a] <= y.shape[a] for a in (2, 3, 4))


def upsample_add_concat(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """:func:`reference` in one C++ pass; channels-last output. Needs :func:`supports`.

    Inputs not channels-last are copied to it first: the transposed convolution's output ``y``
    is, but torch's small-channel convolutions of the encoder (its first, 2 -> 16) return
    planar tensors, which reach here as ``x`` or ``skip``."""
    out = torch.empty((y.shape[0], y.shape[1] + skip.shape[1], *skip.shape[2:]), dtype=y.dtype,
                      memory_format=CHANNELS_LAST)
    _trilinear_cpu.upsample_add_concat(as_kernel_array(x), as_kernel_array(y), _per_channel(scale, y.dtype),
                                       as_kernel_array(skip), as_kernel_array(out), torch.get_num_threads())
    return out


class UpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x):
        ctx.x_shape = x.shape
        ctx.x_layout = memory_format_of(x)
        no_skip = y.new_empty((y.shape[0], 0, *y.shape[2:]))
        return upsample_add_concat(y.detach(), x.detach(), y.new_ones(y.shape[1]), no_skip)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[1]:
            # The kernel writes 0 into the channels the upsampling does not read. In x's layout:
            # autograd adds this to the transposed convolution's gradient for x, and adding a
            # planar tensor to a channels-last one took 70 ms per call at 48 x 88^3 in an IO
            # profile (16 against 3 ms alone).
            grad_x = torch.empty(ctx.x_shape, dtype=grad.dtype, memory_format=CHANNELS_LAST)
            _trilinear_cpu.upsample2x_backward(as_kernel_array(grad), as_kernel_array(grad_x), torch.get_num_threads())
            grad_x = grad_x.contiguous(memory_format=ctx.x_layout)
        return (grad if ctx.needs_input_grad[0] else None), grad_x


def upsample_add(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y + F.interpolate(x[:, :C], scale_factor=2, mode="trilinear")`` (C: ``y``'s channels)
    in one C++ pass (channels-last output), differentiable in both: the decoder step of the
    network IO and training run. Needs :func:`supports_upsample_add`."""
    return UpsampleAdd.apply(y, x)


def supports_norm_concat(x: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether :func:`norm_concat` and :func:`norm_concat_backward` take these: channels-last CPU
    float32/float64 tensors of one dtype and batch, ``skip``'s grid within ``x``'s."""
    if _trilinear_cpu is None or x.dim() != 5 or skip.dim() != 5 or x.dtype != skip.dtype:
        return False
    if x.device.type != "cpu" or skip.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    fits = x.shape[0] == skip.shape[0] and all(skip.shape[a] <= x.shape[a] for a in (2, 3, 4))
    return fits and is_channels_last(x) and is_channels_last(skip)


def norm_concat(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """IO's decoder level output through an eval-mode BatchNorm in one C++ pass, channels-last:
    ``torch.cat([torch.addcmul(beta, x, alpha)[crop], skip], 1)`` (``alpha``, ``beta``: one value
    per channel of ``x``; the crop: ``skip``'s grid), the same bits, no autograd. Needs
    :func:`supports_norm_concat`."""
    out = torch.empty((x.shape[0], x.shape[1] + skip.shape[1], *skip.shape[2:]), dtype=x.dtype,
                      memory_format=CHANNELS_LAST)
    _trilinear_cpu.norm_concat(as_kernel_array(x), _per_channel(alpha, x.dtype), _per_channel(beta, x.dtype),
                               as_kernel_array(skip), as_kernel_array(out), torch.get_num_threads())
    return out


def norm_concat_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, *,
                         need_x: bool, need_skip: bool, need_sums: bool):
    """:func:`norm_concat`'s backward from the concatenation's gradient ``grad`` in one C++ pass:
    ``(grad_x, grad_skip, sums)``, each ``None`` unless asked for. ``grad_x`` (``x``'s shape,
    channels-last) is ``grad[:, :C] * scale`` on ``grad``'s grid and 0 beyond it; ``grad_skip``
    (channels-last) is ``grad[:, C:]``; ``sums`` (2, C), float64, the sums of ``grad[:, :C]`` and
    of ``grad[:, :C] * (x - mean)``: BatchNorm's bias gradient and, times ``invstd``, its weight
    gradient. Needs :func:`supports_norm_concat` of ``x`` and the forward's ``skip``; ``grad``
    not channels-last is copied to it."""
    channels, skip_channels = x.shape[1], grad.shape[1] - x.shape[1]
    grad_x = torch.empty_like(x, memory_format=CHANNELS_LAST) if need_x else None
    grad_skip = (torch.empty((grad.shape[0], skip_channels, *grad.shape[2:]), dtype=grad.dtype,
                             memory_format=CHANNELS_LAST) if need_skip else None)
    sums = torch.empty((2, channels), dtype=torch.float64) if need_sums else None
    nothing = x.new_empty((0,) * 5).numpy()  # an output not asked for
    _trilinear_cpu.norm_concat_backward(
        as_kernel_array(grad), as_kernel_array(x), _per_channel(scale, x.dtype), _per_channel(mean, torch.float64),
        nothing if grad_x is None else as_kernel_array(grad_x), nothing if grad_skip is None else as_kernel_array(grad_skip),
        np.empty((0, 0)) if sums is None else sums.numpy(), need_x, need_skip, need_sums, torch.get_num_threads())
    return grad_x, grad_skip, sums


def _per_channel(values: torch.Tensor, dtype: torch.dtype):
    """``values`` (one per channel) as the 1-D array of ``dtype`` a kernel reads."""
    return values.detach().to(dtype).reshape(-1).contiguous().numpy()
