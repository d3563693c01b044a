"""The GradICON registration network of multiGradICON (paper, section 3.1).

    Phi := TS{ TS{ DS{ TS{ DS{Psi1}, Psi2 } }, Psi3 }, Psi4 }

Four U-Nets predict displacement fields: Psi1 on images average-pooled twice
(44^3 for a 175^3 input), Psi2 on images pooled once (88^3), Psi3 and Psi4 at
full resolution. TwoStep (TS) runs its second network on the moving image
warped by the first one's map and composes the two maps; DownSample (DS) runs
its network on pooled images. Spelled out for the moving image A and fixed B:

    d1 = Psi1(A/4, B/4)
    d2 = Psi2(A/2 o (id + d1),            B/2)
    d3 = Psi3(A   o Phi123_partial,       B)        Phi123_partial = d1 o d2 at full res
    d4 = Psi4(A   o Phi123,               B)
    Phi(x) = U1(U2(U3(U4(x))))   with  Uk(x) = x + dk(x)

All maps are absolute coordinates in [0, 1]^3 (see :mod:`mgr_engine.ops`).
Parameter names follow the official checkpoints (``Step_2_final.trch``), so
they load without conversion through :func:`load_official_state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InvalidImageError, InvalidOptionError
from .kernels import decoder_cpu, encoder_cpu, last_conv_cpu, upconv_cpu
from .ops import (compose_maps, identity_map, is_channels_last, memory_format_of, recomputed_in_backward,
                  use_cpp_decoder, use_cpp_encoder_level, use_cpp_last_conv, use_cpp_norm_concat,
                  use_cpp_upconv_backward, use_cpp_upconv_forward, use_cpp_upconv_weight_grad, use_triton,
                  warp)


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a GradICON network. The default is the official uni/multiGradICON one."""

    input_shape: tuple = (175, 175, 175)
    down_channels: tuple = (2, 16, 32, 64, 256, 512)  # first entry: fixed + moving channels
    up_channels: tuple = (16, 32, 64, 128, 256)

    def __post_init__(self):
        # Tuples, whatever sequence was given (a config read from JSON has lists): the config is
        # hashed and compared with the models' own.
        for name in ("input_shape", "down_channels", "up_channels"):
            try:
                object.__setattr__(self, name, tuple(getattr(self, name)))
            except TypeError:  # 64 for (64, 64, 64)
                raise InvalidOptionError(f"network {name} {getattr(self, name)!r}: give a sequence of integers") from None
        shape = self.input_shape
        if len(shape) != 3 or not all(isinstance(n, numbers.Integral) and n > 0 for n in shape):
            raise InvalidOptionError(f"network input shape {shape}: give three positive integers (D, H, W)")
        down, up = self.down_channels, self.up_channels
        if not all(isinstance(n, numbers.Integral) and n > 0 for n in down + up) or not up:
            raise InvalidOptionError(f"network channels down {down}, up {up}: give positive integers, at least one "
                                     "level")
        if len(down) != len(up) + 1 or down[0] != 2:
            raise InvalidOptionError(
                f"network channels down {down}, up {up}: down_channels starts with 2 (the moving and fixed "
                f"images) and has one entry more than up_channels ({len(down)} and {len(up)} given)")
        # The quarter-resolution U-Net (input ceil(n / 4)) average-pools its input once per
        # level, and torch refuses to pool an axis of 1 voxel.
        smallest = self.smallest_input_size()
        if min(shape) < smallest:
            raise InvalidOptionError(
                f"network input shape {shape} is too small for U-Nets {len(self.up_channels)} levels deep: "
                f"each axis needs at least {smallest} voxels (the official networks take 175)")

    def smallest_input_size(self) -> int:
        """The fewest voxels along an axis this network can take: 2^(levels + 1) + 1."""
        return 2 ** (len(self.up_channels) + 1) + 1

    def level_shapes(self):
        """Input shapes of the three resolution levels: full, pooled once, pooled twice."""
        full = tuple(int(n) for n in self.input_shape)
        half = tuple(math.ceil(n / 2) for n in full)
        quarter = tuple(math.ceil(n / 2) for n in half)
        return full, half, quarter


def as_network_config(config) -> NetworkConfig | None:
    """``config`` as a :class:`NetworkConfig`: one already, a dict of its fields (a configuration
    read from JSON), or None; anything else is an :class:`InvalidOptionError` (a dict or a shape
    given for it was an AttributeError deep in the network's construction)."""
    if config is None or isinstance(config, NetworkConfig):
        return config
    if isinstance(config, dict):
        try:
            return NetworkConfig(**config)
        except TypeError as exc:  # a field NetworkConfig lacks
            raise InvalidOptionError(f"network config {config!r}: {exc}; its fields are input_shape, "
                                     "down_channels, up_channels") from None
    raise InvalidOptionError(f"config must be a NetworkConfig (or a dict of its fields), got a {type(config).__name__}"
                             + (": NetworkConfig(input_shape=...) for a shape" if isinstance(config, (tuple, list))
                                else ""))


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of x, or zero-pad in front up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, 0, 0, channels - x.shape[1], 0))


def _upsampled(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A decoder level's upsampled path: ``x`` with ``channels`` channels, 2x trilinear."""
    return F.interpolate(_match_channels(x, channels), scale_factor=2, mode="trilinear", align_corners=False)


def half_resolution(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool3d(x, 2, ceil_mode=True)``, a U-Net encoder level's pooled path. For a
    channels-last float32 CPU tensor with even sizes, as the depthwise convolution it is (weights
    1/8, stride 2): torch's CPU average pooling copies a channels-last input to planar first and
    returns it planar (2 cores, 16 x 88^3: 27 against 1 ms). Odd sizes (a partial window averages
    the voxels it covers) and everything else take ``F.avg_pool3d``."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and is_channels_last(x)
            and all(n % 2 == 0 for n in x.shape[2:]) and not _autocast_enabled("cpu")):
        channels = x.shape[1]
        weight = torch.full((channels, 1, 2, 2, 2), 0.125, dtype=x.dtype)
        return F.conv3d(x, weight, stride=2, groups=channels)
    return F.avg_pool3d(x, 2, ceil_mode=True)


def _cropped_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    d, h, w = skip.shape[2:]
    return torch.cat([x[:, :, :d, :h, :w], skip], 1)


def _uncropped_gradient(grad: torch.Tensor, x_shape, layout) -> torch.Tensor:
    """The gradient of a crop's input ``x`` (shape ``x_shape``) from its concatenation's
    ``grad``: the first channels, zero where the crop cut, in ``layout``."""
    grad_x = torch.empty(x_shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
    d, h, w = grad.shape[2:]
    if (d, h, w) != tuple(x_shape[2:]):
        grad_x.zero_()
    grad_x[:, :, :d, :h, :w] = grad[:, :x_shape[1]]
    return grad_x


class _CropConcat(torch.autograd.Function):
    """``torch.cat([x[:, :, :d, :h, :w], skip], 1)`` with (d, h, w) the skip's grid, each
    gradient in its input's memory layout. Autograd's are strided views into the
    concatenation's gradient and, for the crop, a planar zero tensor; torch's BatchNorm
    backward before the crop takes either on its slow path for a channels-last network
    (2 CPU cores: 141 against 13 ms for the copy and the backward, 32 x 88^3; 490 against
    200 ms for the planar one, 16 x 176^3)."""

    @staticmethod
    def forward(ctx, x, skip):
        ctx.x_shape, ctx.layouts = x.shape, (memory_format_of(x), memory_format_of(skip))
        return _cropped_cat(x, skip)

    @staticmethod
    def backward(ctx, grad):
        channels, grad_x, grad_skip = ctx.x_shape[1], None, None
        if ctx.needs_input_grad[0]:
            grad_x = _uncropped_gradient(grad, ctx.x_shape, ctx.layouts[0])
        if ctx.needs_input_grad[1]:
            grad_skip = grad[:, channels:].contiguous(memory_format=ctx.layouts[1])
        return grad_x, grad_skip


class _EvalNormCropConcat(torch.autograd.Function):
    """``crop_concat(norm(x), skip)`` for an eval-mode BatchNorm ``norm`` (IO's), whose
    backward turns BatchNorm's output gradient into its input gradient in place: autograd's
    chain (:class:`_CropConcat`, then BatchNorm's backward) held both, at 175^3 two 0.33 GiB
    volumes at the peak of IO under io_checkpointing. The forward is
    :func:`_eval_norm_cropped_cat`; the backward, where the ops take Triton kernels
    (:func:`mgr_engine.ops.use_triton`), one pass of :mod:`kernels.norm_crop_concat` (torch's CUDA
    BatchNorm backward reduces each channel in one thread block); for channels-last CPU tensors
    where the C++ kernels run (:func:`mgr_engine.ops.use_cpp_norm_concat`), forward and backward
    one C++ pass each (:func:`mgr_engine.kernels.decoder_cpu.norm_concat_backward`); elsewhere the
    crop's gradient, torch's BatchNorm backward for the weight and bias gradients, and the input
    gradient in place."""

    @staticmethod
    def forward(ctx, x, skip, weight, bias, running_mean, running_var, eps):
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps, ctx.layouts = eps, (memory_format_of(x), memory_format_of(skip))
        ctx.cpp = use_cpp_norm_concat(x, skip)  # then the backward too, whatever grad's layout
        return _eval_norm_cropped_cat(x, skip, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, running_mean, running_var = ctx.saved_tensors
        needs_x, needs_skip, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        grad_x = grad_skip = grad_weight = grad_bias = None
        if (needs_x or needs_weight or needs_bias) and use_triton(grad) and _triton_norm_fits(grad, x):
            from .kernels.norm_crop_concat import norm_crop_concat_backward

            grad_x, grad_weight, grad_bias = norm_crop_concat_backward(grad, x, weight, running_mean, running_var,
                                                                       ctx.eps, needs_x)
        elif ctx.cpp:  # in one pass, the skip's gradient included
            invstd = torch.rsqrt(running_var.double() + ctx.eps)
            grad_x, grad_skip, sums = decoder_cpu.norm_concat_backward(
                grad, x, (weight.double() * invstd).to(grad.dtype), running_mean, need_x=needs_x,
                need_skip=needs_skip, need_sums=needs_weight or needs_bias)
            if sums is not None:
                grad_bias, grad_weight = sums[0].to(grad.dtype), (sums[1] * invstd).to(grad.dtype)
        elif needs_x or needs_weight or needs_bias:
            grad_norm = _uncropped_gradient(grad, x.shape, ctx.layouts[0])  # BatchNorm's output gradient
            if needs_weight or needs_bias:
                _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                    grad_norm, x, weight, running_mean, running_var, None, None, False, ctx.eps,
                    [False, needs_weight, needs_bias])
            if needs_x:  # eval mode: d norm(x) / dx = weight / sqrt(running_var + eps), per channel
                scale = weight.double() * torch.rsqrt(running_var.double() + ctx.eps)
                grad_x = grad_norm.mul_(scale.to(grad.dtype).view(1, -1, 1, 1, 1))
        if needs_skip and not ctx.cpp:
            grad_skip = grad[:, x.shape[1]:].contiguous(memory_format=ctx.layouts[1])
        return (grad_x, grad_skip, grad_weight if needs_weight else None, grad_bias if needs_bias else None,
                None, None, None)


def _eval_norm_cropped_cat(x, skip, weight, bias, running_mean, running_var, eps: float) -> torch.Tensor:
    """``_cropped_cat(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps),
    skip)``, BatchNorm's affine written straight into the concatenation: ``F.batch_norm`` and
    ``torch.cat`` wrote x's size once more and read it back (at 16 x 176^3 on 2 CPU cores 212
    against 123 ms). On the CPU bit for bit torch's, which the IO tests against the reference
    need (Adam's first steps amplify any rounding difference): its eval-mode kernel computes
    ``x * alpha + beta`` as one fused multiply-add, as ``addcmul`` does, with ``alpha =
    rsqrt(var + eps) * weight`` and ``beta`` what it gives a zero input (a test holds it). In
    C++ where it applies (:func:`mgr_engine.ops.use_cpp_norm_concat`): one pass, the same bits
    (at 16 + 2 channels, 175^3, 2 cores: 36 against 62-66 ms)."""
    d, h, w = skip.shape[2:]
    channels = x.shape[1]
    alpha = torch.rsqrt(running_var + eps) * weight
    beta = F.batch_norm(x.new_zeros(1, channels, 1, 1, 1), running_mean, running_var, weight, bias, False, 0.0, eps)
    if use_cpp_norm_concat(x, skip):
        return decoder_cpu.norm_concat(x, alpha, beta.reshape(-1), skip)
    layout = memory_format_of(x) if memory_format_of(skip) == memory_format_of(x) else torch.contiguous_format
    out = torch.empty((x.shape[0], channels + skip.shape[1], d, h, w), dtype=x.dtype, device=x.device,
                      memory_format=layout)
    view = (1, channels, 1, 1, 1)
    torch.addcmul(beta, x[:, :, :d, :h, :w], alpha.view(view), out=out[:, :channels])
    out[:, channels:] = skip
    return out


def _triton_norm_fits(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the Triton kernel of ``_EvalNormCropConcat``'s backward takes these tensors."""
    from .kernels.norm_crop_concat import fits

    return fits(grad, x)


def crop_concat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """A decoder level's output: ``x`` (B, C, D', H', W') cut to the grid of ``skip`` (B, Cs,
    D, H, W), D <= D' and so on, followed by ``skip``'s channels."""
    if torch.is_grad_enabled() and (x.requires_grad or skip.requires_grad) and not torch.jit.is_tracing():
        return _CropConcat.apply(x, skip)
    return _cropped_cat(x, skip)


def _eval_norm_with_gradients(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether a decoder level's ``norm(x)`` runs as in IO: BatchNorm in eval mode (in training
    mode its forward updates the running statistics), with gradients, outside autocast."""
    return not norm.training and torch.is_grad_enabled() and not _autocast_enabled(x.device.type)


def _is_eval_batch_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`norm_crop_concat` computes ``norm(x)`` as :func:`_eval_norm_cropped_cat`
    (with gradients: :class:`_EvalNormCropConcat`): an affine BatchNorm with running statistics,
    in eval mode, outside autocast and tracing."""
    return (isinstance(norm, nn.BatchNorm3d) and norm.affine and norm.track_running_stats and not norm.training
            and not _autocast_enabled(x.device.type) and not torch.jit.is_tracing())


def norm_crop_concat(norm: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """A decoder level's output ``crop_concat(norm(x), skip)``; through an eval-mode BatchNorm
    (IO's), in one pass (:func:`_eval_norm_cropped_cat`), with gradients in one autograd function
    (:class:`_EvalNormCropConcat`). Without gradients too: IO's checkpointed forward and its final
    forward ran BatchNorm and ``torch.cat`` as two more passes at full resolution."""
    if _is_eval_batch_norm(norm, x):
        args = (x, skip, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)
        return _EvalNormCropConcat.apply(*args) if torch.is_grad_enabled() else _eval_norm_cropped_cat(*args)
    return crop_concat(norm(x), skip)


LEAKY_SLOPE = 0.01  # F.leaky_relu's default, the authors' activation


def _conv_input(x: torch.Tensor, activation: bool) -> torch.Tensor:
    """What a U-Net convolution convolves: ``leaky_relu(x)`` (a new tensor) or ``x`` itself."""
    return F.leaky_relu(x, LEAKY_SLOPE) if activation else x


# Process-wide, like torch.backends.cudnn.allow_tf32, which it accompanies: set (with cuDNN's TF32
# switch on) by the engine's TF32 sections for instance optimization in precision "tf32x3".
SPLIT_TF32_CONVOLUTIONS = False


def splits_tf32(x: torch.Tensor) -> bool:
    """Whether :class:`_LowMemoryConv` computes its convolutions of ``x`` as three TF32 products
    (:func:`tf32x3`): float32 on CUDA inside a "tf32x3" section."""
    return SPLIT_TF32_CONVOLUTIONS and x.is_cuda and x.dtype == torch.float32


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) with its mantissa rounded to TF32's 10 bits, to nearest with ties away from
    zero (how cuDNN's TF32 convolutions round their operands, as far as the H200's point
    differences tell: benchmarks/emulate_tf32.py); same strides."""
    bits = t.view(torch.int32) + 0x1000  # half of the 13 dropped bits carries into the kept ones (and the exponent)
    return bits.bitwise_and_(-0x2000).view(torch.float32)  # in place: one copy of t, not two at once


def tf32x3(product, a: torch.Tensor, b: torch.Tensor, *, a_disposable: bool = False) -> torch.Tensor:
    """``product(a, b)`` for a bilinear ``product`` (a convolution, or its input or weight
    gradient) of float32 tensors, as three products of operands that TF32 holds exactly:
    ``a = a_hi + a_lo``, ``b = b_hi + b_lo`` with ``a_hi``, ``b_hi`` rounded to TF32 and the
    remainders 2^-11 of them, and ``a_lo * b_lo`` (2^-22 relative) dropped. On tensor cores, three
    TF32 products give float32's accuracy (benchmarks/RESULTS.md: within float32's own rounding
    of a convolution, where one TF32 product is 3e-4 off) faster than one float32 product on
    CUDA cores. ``a_disposable``: ``a`` may be overwritten (with ``a_lo``).

    Memory beside the operands: one copy of each, two of the smaller where ``a`` is kept. One
    operand's remainder is made first (``a``'s where it may be overwritten, else the smaller's);
    the other's high part becomes its remainder in place after its last product."""
    a_first = a_disposable or a.numel() <= b.numel()
    first, second = (a, b) if a_first else (b, a)
    del a, b  # a caller that holds no name of a disposable one has its memory back after its last product

    def times(first_part, second_part):
        return product(first_part, second_part) if a_first else product(second_part, first_part)

    first_hi, second_hi = round_to_tf32(first), round_to_tf32(second)
    first_lo = first.sub_(first_hi) if a_disposable else first - first_hi
    del first
    out = times(first_lo, second_hi)
    del first_lo
    out += times(first_hi, second_hi)
    second_lo = torch.sub(second, second_hi, out=second_hi)  # exact; one pass, in place of the high part
    del second
    out += times(first_hi, second_lo)
    return out


class _LowMemoryConv(torch.autograd.Function):
    """``conv(leaky_relu(x))``, or ``conv(x)``, for a U-Net's 3-D convolution or transposed
    convolution, keeping the least for the backward pass. Autograd would keep ``x`` (the
    activation's input) and the activation's output (the convolution's input); this keeps ``x``
    alone and recomputes the activation. Given ``recompute_x``, a pair ``(function, tensors)``
    with ``function(*tensors)`` returning ``x`` bit for bit from tensors kept anyway (a decoder
    level's output), it keeps nothing of ``x`` and calls that in the backward pass.

    The tensors go through ``save_for_backward``, so that autograd frees them with the other
    saved tensors once the backward pass has run. A closure holding them lived as long as the
    graph, which IO's ``loss`` holds until the next step's forward has ended: the tensor peak of
    a two-step IO call at 175^3 fell 7.89 -> 5.78 GiB without it
    (``benchmarks/profile_io_memory.py --peak``).

    With ``subpixel`` (a kernel-4, stride-2 transposed convolution where
    :func:`uses_subpixel_upconvs`: CUDA), the forward computes the output in sub-pixel form, as
    the inference network does (cuDNN runs a transposed convolution's forward as its slow dgrad
    kernel); the backward pass stays the transposed convolution's (a strided convolution for the
    input gradient). On the CPU the finest levels' transposed convolutions compute their forward
    and their backward pass in Winograd form (:func:`mgr_engine.ops.use_cpp_upconv_forward`,
    :func:`mgr_engine.ops.use_cpp_upconv_backward`). With ``split_tf32`` (:func:`splits_tf32`),
    the convolution, its input gradient and its weight gradient each as :func:`tf32x3`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, transposed, activation, recompute_x, subpixel, split_tf32):
        ctx.recompute, kept = recompute_x if recompute_x is not None else (None, (x,))
        ctx.save_for_backward(weight, *kept)
        ctx.conv = (bias is not None, stride, padding, transposed, activation, split_tf32)
        out_channels = weight.shape[1] if transposed else weight.shape[0]
        if (transposed and not subpixel and not split_tf32
                and use_cpp_upconv_forward(x, weight, bias, stride, padding)):  # the finest levels on the CPU
            return upconv_cpu.forward(x, weight, bias, LEAKY_SLOPE if activation else None)
        if subpixel:  # the same output; the backward pass below stays the transposed convolution's
            weight, bias = subpixel_weight(weight), None if bias is None else bias.repeat(8)
            conv = functools.partial(F.conv3d, padding=1)
        elif transposed:
            conv = functools.partial(F.conv_transpose3d, stride=stride, padding=padding)
        else:
            conv = functools.partial(F.conv3d, stride=stride, padding=padding)
        if split_tf32:  # leaky_relu's output is ours to overwrite
            y = tf32x3(conv, _conv_input(x, activation), weight, a_disposable=activation)
            if bias is not None:
                y += bias.view(-1, 1, 1, 1)
        else:
            y = conv(_conv_input(x, activation), weight, bias)
        return subpixel_shuffle(y, out_channels) if subpixel else y

    @staticmethod
    def backward(ctx, grad):
        weight, *kept = ctx.saved_tensors
        x = kept[0] if ctx.recompute is None else ctx.recompute(*kept)
        has_bias, stride, padding, transposed, activation, split_tf32 = ctx.conv
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]

        def convolution_backward(grad, conv_input, weight, mask):
            return torch.ops.aten.convolution_backward(
                grad, conv_input, weight, [weight.shape[1 if transposed else 0]] if mask[2] else None,
                [stride] * 3, [padding] * 3, [1, 1, 1], transposed, [0, 0, 0], 1, mask)

        activation_applied = False  # the leaky ReLU's backward, by the C++ backward pass
        if split_tf32:
            grad_input = grad_weight = grad_bias = None
            if needs_weight:  # the convolution's input is ours where made here (the activation's, or recomputed)
                grad_weight = tf32x3(lambda inp, g: convolution_backward(g, inp, weight, [False, True, False])[1],
                                     _conv_input(x, activation), grad,
                                     a_disposable=activation or ctx.recompute is not None)
            if needs_x:  # x gives the input gradient its shape and layout (the values are unused)
                grad_input = tf32x3(lambda g, w: convolution_backward(g, x, w, [True, False, False])[0], grad, weight)
            if needs_bias and has_bias:
                grad_bias = grad.sum((0, 2, 3, 4))
        else:
            # oneDNN's bias gradient of a transposed convolution is its reference loop: 170 ms of the
            # 810 ms backward of the 48 -> 16 channel layer at 88^3 on 2 CPU cores; a sum takes 15 ms
            needs_bias = needs_bias and has_bias
            bias_by_sum = needs_bias and transposed and grad.device.type == "cpu"
            # at the finest levels, its input and weight gradients in Winograd form take fewer
            # products (the activation's forward and backward with them)
            winograd = ((needs_x or needs_weight) and transposed and stride == 2 and padding == 1
                        and use_cpp_upconv_backward(grad, weight, x))
            conv_input = None if winograd else _conv_input(x, activation)
            # else its weight gradient there runs at 60% of its input gradient's rate in oneDNN
            weight_in_cpp = (not winograd and needs_weight and transposed and stride == 2 and padding == 1
                             and use_cpp_upconv_weight_grad(conv_input, grad, weight))
            mask = [needs_x and not winograd, needs_weight and not (winograd or weight_in_cpp),
                    needs_bias and not bias_by_sum]
            grad_input, grad_weight, grad_bias = (convolution_backward(grad, conv_input, weight, mask) if any(mask)
                                                  else (None, None, None))
            if winograd:
                grad_input, grad_weight = upconv_cpu.backward(grad, weight, x, LEAKY_SLOPE if activation else None,
                                                              input_grad=needs_x, weight_grad=needs_weight)
                activation_applied = True
            if weight_in_cpp:
                grad_weight = upconv_cpu.weight_grad(conv_input, grad)
            if bias_by_sum:
                grad_bias = _channel_sums(grad)
        if needs_x and activation and not activation_applied:
            grad_input = torch.ops.aten.leaky_relu_backward(grad_input, x, LEAKY_SLOPE, False)
        return ((grad_input if needs_x else None), grad_weight, grad_bias,
                None, None, None, None, None, None, None)


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """``t.sum((0, 2, 3, 4))``; for a channels-last ``t`` as sums of blocks of 1024 voxels, then of
    those: torch's reduction over the voxels of channels-last data took 50 against 15 ms at 16 x
    176^3 (2 CPU cores), as accurate."""
    if not is_channels_last(t):
        return t.sum((0, 2, 3, 4))
    rows = t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])  # a view: voxels x channels
    whole = rows.shape[0] // 1024 * 1024
    return rows[:whole].view(-1, 1024, t.shape[1]).sum(1).sum(0) + rows[whole:].sum(0)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _plain_geometry(conv: nn.Module) -> bool:
    """Whether ``conv`` is what :class:`_LowMemoryConv` computes: one stride and one zero
    padding on all axes, no dilation, one group, no output padding."""
    return (len(set(conv.stride)) == 1 and isinstance(conv.padding, tuple) and len(set(conv.padding)) == 1
            and set(conv.dilation) == {1} and conv.groups == 1 and conv.padding_mode == "zeros"
            and not any(getattr(conv, "output_padding", ())))


def low_memory_conv(conv: nn.Module, x: torch.Tensor, *, activation: bool = True, recompute_x=None) -> torch.Tensor:
    """``conv(F.leaky_relu(x))`` (``activation``) or ``conv(x)`` for the U-Net's ``nn.Conv3d``
    and ``nn.ConvTranspose3d`` layers. Where gradients flow (instance optimization, training in
    fp32), through :class:`_LowMemoryConv`, which keeps neither the activation's output nor,
    given ``recompute_x``, ``x``: at 175^3 the activations an IO step keeps 8.1 -> 4.8 GiB, its
    peak 9.8 -> 6.9 GiB (freed host memory returned), its time unchanged (2-core AMD EPYC,
    ``benchmarks/bench_low_memory_conv.py``). Under autocast (training with ``--amp``),
    autograd's own path, whose backward casts as the forward did; the same for a layer with
    what :class:`_LowMemoryConv` does not pass on (dilation, groups, output padding, ...). Either
    way, on the CPU the finest levels' transposed convolutions run their forward in Winograd form
    (:func:`mgr_engine.ops.use_cpp_upconv_forward`), not under autocast."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if needs_grad and not _autocast_enabled(x.device.type) and _plain_geometry(conv):
        transposed = isinstance(conv, nn.ConvTranspose3d)
        subpixel = transposed and has_subpixel_form(conv) and uses_subpixel_upconvs(x.device)
        return _LowMemoryConv.apply(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], transposed,
                                    activation, recompute_x, subpixel, splits_tf32(x))
    if (not needs_grad and isinstance(conv, nn.ConvTranspose3d) and _plain_geometry(conv)
            and not _autocast_enabled(x.device.type)
            and use_cpp_upconv_forward(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0])):
        return upconv_cpu.forward(x, conv.weight, conv.bias, LEAKY_SLOPE if activation else None)
    return conv(_conv_input(x, activation))


def decoder_output_recipe(norm: nn.Module, before_norm: torch.Tensor, skip: torch.Tensor):
    """How to recompute a decoder level's output ``crop_concat(norm(before_norm), skip)`` bit
    for bit, for the layer after it to call in its backward pass instead of keeping that
    output: ``(function, (before_norm, skip))``, ``function`` of those two tensors, which
    BatchNorm's backward and the encoder keep anyway. Only as in IO
    (:func:`_eval_norm_with_gradients`); ``None`` elsewhere."""
    if not _eval_norm_with_gradients(norm, before_norm):
        return None
    as_forward = _is_eval_batch_norm(norm, before_norm)  # the forward's arithmetic

    def recompute(before_norm, skip):
        with torch.no_grad():
            if as_forward:
                return _eval_norm_cropped_cat(before_norm, skip, norm.weight, norm.bias, norm.running_mean,
                                              norm.running_var, norm.eps)
            return _cropped_cat(norm(before_norm), skip)

    return recompute, (before_norm, skip)


class UNet(nn.Module):
    """One displacement-predicting U-Net (the authors' ``UNet2``), five levels deep.

    Down: strided 3^3 convolutions, each added to the average-pooled input (a
    residual path). Up: 4^3 transposed convolutions added to the trilinearly
    upsampled input, BatchNorm, concatenation with the skip. The last
    convolution outputs the displacement, divided by 10.
    """

    def __init__(self, down_channels, up_channels):
        super().__init__()
        down = list(down_channels)
        up = list(up_channels)
        levels = len(up)
        if len(down) != levels + 1:
            raise ValueError("down_channels needs exactly one entry more than up_channels")
        up_in = [down[i + 1] + (up[i + 1] if i + 1 < levels else 0) for i in range(levels)]
        self.downConvs = nn.ModuleList(
            nn.Conv3d(down[i], down[i + 1], kernel_size=3, padding=1, stride=2) for i in range(levels)
        )
        self.upConvs = nn.ModuleList(
            nn.ConvTranspose3d(up_in[i], up[i], kernel_size=4, padding=1, stride=2) for i in range(levels)
        )
        self.batchNorms = nn.ModuleList(nn.BatchNorm3d(up[i]) for i in range(levels))
        self.lastConv = nn.Conv3d(down[0] + up[0], 3, kernel_size=3, padding=1)
        # A fresh network outputs the identity map, as the authors' does.
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, *, recompute_finest_level: bool = False
                ) -> torch.Tensor:
        """The displacement field (B, 3, D, H, W). With gradients, the layers after each decoder
        level recompute its output in their backward pass instead of keeping it
        (:func:`decoder_output_recipe`), in activation checkpointing's recomputed forward too.

        ``recompute_finest_level``: with gradients through eval-mode BatchNorm (IO), the finest
        decoder level and the last convolution run under activation checkpointing from the
        level below's BatchNorm input (:meth:`_finest_level`), so that the finest level's
        BatchNorm input (16 x 176^3, 0.33 GiB for a full-resolution U-Net) is not kept for the
        backward pass but recomputed there, at the cost of one more transposed convolution."""
        x = torch.cat([moving, fixed], 1)
        if is_channels_last(self.lastConv.weight):
            # The first skip in the network's layout: planar, it made the last level's
            # concatenation and the last convolution's input planar copies at full resolution
            # (0.79 -> 0.73 s for a full-resolution U-Net forward in IO, 2 CPU cores).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for conv in self.downConvs:
            skips.append(x)
            if use_cpp_encoder_level(x, conv) and not _autocast_enabled("cpu"):  # the two images' level
                x = encoder_cpu.encoder_level(x, conv.weight, conv.bias, LEAKY_SLOPE)
            else:
                y = low_memory_conv(conv, x)
                x = y + _match_channels(half_resolution(x), y.shape[1])
        recompute_x = None  # how to recompute x, the decoder level's output, in the backward pass
        # Each level drops its names for what it no longer needs (del) before the next large
        # allocation: held until reassigned, the full-resolution level's convolution output and
        # the level below's output stayed alive through its BatchNorm, concatenation and the
        # last convolution (0.45 GiB at 175^3, at the peak of IO under io_checkpointing).
        for depth in reversed(range(len(self.upConvs))):
            norm, skip = self.batchNorms[depth], skips[depth]
            if isinstance(norm, FoldedBatchNorm):  # inference
                y = low_memory_conv(self.upConvs[depth], x)
                if use_cpp_decoder(y, x, norm.scale, skip):
                    x = decoder_cpu.upsample_add_concat(y, x, norm.scale, skip)  # the line below in one pass
                else:
                    x = crop_concat(norm(y, _upsampled(x, y.shape[1])), skip)
                del y
                continue
            before_norm = self._before_norm(depth, x, recompute_x)
            del x
            if depth == 1 and recompute_finest_level and _eval_norm_with_gradients(norm, before_norm):
                return recomputed_in_backward(self._finest_level, before_norm, skip, skips[0], recompute=True)
            x, recompute_x = self._level_output(depth, before_norm, skip)
            del before_norm
        return self._last_conv(x, recompute_x)

    def _before_norm(self, depth: int, x: torch.Tensor, recompute_x) -> torch.Tensor:
        """Decoder level ``depth``'s BatchNorm input: its transposed convolution of the level
        below's output ``x`` plus ``x`` upsampled."""
        y = low_memory_conv(self.upConvs[depth], x, recompute_x=recompute_x)
        return decoder_cpu.upsample_add(y, x) if use_cpp_decoder(y, x) else y + _upsampled(x, y.shape[1])

    def _level_output(self, depth: int, before_norm: torch.Tensor, skip: torch.Tensor):
        """Decoder level ``depth``'s output and how to recompute it (:func:`decoder_output_recipe`;
        with gradients it holds ``before_norm``)."""
        norm = self.batchNorms[depth]
        return norm_crop_concat(norm, before_norm, skip), decoder_output_recipe(norm, before_norm, skip)

    def _finest_level(self, before_norm: torch.Tensor, skip: torch.Tensor, first_skip: torch.Tensor) -> torch.Tensor:
        """The rest of :meth:`forward` from the second-finest level's BatchNorm input
        ``before_norm`` and its ``skip``: that level's output, the finest level (``first_skip``,
        the input images, as its skip) and the last convolution."""
        x, recompute_x = self._level_output(1, before_norm, skip)
        finest_before_norm = self._before_norm(0, x, recompute_x)
        del x
        x, recompute_x = self._level_output(0, finest_before_norm, first_skip)
        del finest_before_norm
        return self._last_conv(x, recompute_x)

    def _last_conv(self, x: torch.Tensor, recompute_x) -> torch.Tensor:
        if use_cpp_last_conv(x, self.lastConv):  # planar output
            return last_conv_cpu.last_conv(x, self.lastConv.weight, self.lastConv.bias, recompute_x=recompute_x) / 10
        # Contiguous: the field feeds many warps, which read (B, 3, D, H, W) in that layout (one
        # copy here rather than one saved per warp when the network runs channels-last).
        return (low_memory_conv(self.lastConv, x, activation=False, recompute_x=recompute_x) / 10).contiguous()


class FoldedBatchNorm(nn.Module):
    """What is left of ``BatchNorm(y + up)`` once its affine is folded into the convolution
    that produces ``y``: ``y + scale * up``, one fused multiply-add."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.view(1, -1, 1, 1, 1).clone())

    def forward(self, y: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(y, self.scale, up)


def fold_batchnorm(unet: UNet) -> UNet:
    """An inference copy of ``unet`` with each BatchNorm folded into its transposed convolution.

    BatchNorm follows ``y + up`` (conv output plus the upsampled path), so the
    convolution absorbs scale and shift, and the upsampled path keeps one
    per-channel multiply, fused into an ``addcmul``. Eval-mode semantics.
    """
    folded = copy.deepcopy(unet).eval()
    scales = []
    with torch.no_grad():
        for conv, bn in zip(folded.upConvs, folded.batchNorms):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            conv.weight.mul_(scale.view(1, -1, 1, 1, 1))  # ConvTranspose weight: (in, out, k, k, k)
            conv.bias.mul_(scale).add_(shift)
            scales.append(scale)
    folded.batchNorms = nn.ModuleList(FoldedBatchNorm(scale) for scale in scales)
    return folded.requires_grad_(False)


class SubpixelConvTranspose3d(nn.Module):
    """A U-Net's ``ConvTranspose3d(kernel 4, stride 2, padding 1)`` as one ``conv3d`` of kernel
    2 (padding 1) into 8x the channels, one group per output parity, then a depth-to-space
    shuffle and a crop of one voxel: the same sums of products (float64: equal to 1e-15). cuDNN
    ran the transposed convolutions as a slow dgrad kernel, 54% of a no-IO registration's GPU
    time on an H200 (RESULTS.md, thirty-fifth session), where implicit-GEMM convolutions are its
    fast path: in this form a warm no-IO registration took 35.9 ms against 48.5 ms there
    (thirty-sixth session), so the engine's inference network uses it on CUDA
    (:func:`uses_subpixel_upconvs`). On the CPU, channels-last, it is slower (0.76 s against
    0.32 s for the 48 -> 16 channel layer at 88^3; contiguous 0.57 s against 1.39 s). Inference
    only: built from a layer's weights, which it copies."""

    def __init__(self, conv: nn.ConvTranspose3d):
        super().__init__()
        if not has_subpixel_form(conv):
            raise ValueError(f"only kernel 4, stride 2, padding 1 transposed convolutions have this form, not {conv}")
        self.out_channels = conv.out_channels
        self.register_buffer("weight", subpixel_weight(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().repeat(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return subpixel_shuffle(F.conv3d(x, self.weight, self.bias, padding=1), self.out_channels)


def has_subpixel_form(conv: nn.ConvTranspose3d) -> bool:
    """Whether ``conv`` is what :class:`SubpixelConvTranspose3d` computes: kernel 4, stride 2,
    zero padding 1, no output padding, dilation or groups."""
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation, conv.groups)
    return geometry == ((4, 4, 4), (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1) and conv.padding_mode == "zeros"


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A kernel-4 transposed convolution's weight (in, out, 4, 4, 4) in sub-pixel form
    (8 * out, in, 2, 2, 2), output parities outermost.

    Per axis, the output voxels 2j - 1 and 2j (sub-positions s = 0, 1 after the crop) both sum
    the input voxels j - 1 and j (window taps a = 0, 1) with the transposed kernel's tap
    k = 2 (1 - a) + s: its 4 taps split as (1 - a, s), then flipped. Views and one flip, no
    index tensor (on a GPU, one made per IO step would be a host-to-device copy that waits)."""
    in_channels, out_channels = weight.shape[:2]
    taps = weight.reshape(in_channels, out_channels, 2, 2, 2, 2, 2, 2).flip(2, 4, 6)  # (in, out, a, s per axis)
    return taps.permute(3, 5, 7, 1, 0, 2, 4, 6).reshape(8 * out_channels, in_channels, 2, 2, 2).contiguous()


def subpixel_shuffle(y: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The sub-pixel convolution's output (B, 8 * out, d, h, w) as the transposed convolution's
    (B, out, 2d - 2, 2h - 2, 2w - 2): each parity's channels to its voxels, one voxel cropped."""
    batch, _, d, h, w = y.shape
    y = y.view(batch, 2, 2, 2, out_channels, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return y.reshape(batch, out_channels, 2 * d, 2 * h, 2 * w)[:, :, 1:-1, 1:-1, 1:-1]


def uses_subpixel_upconvs(device) -> bool:
    """Whether the engine's inference network runs its transposed convolutions in sub-pixel
    form (:class:`SubpixelConvTranspose3d`) on ``device``, and IO's forward computes their
    outputs so (:class:`_LowMemoryConv`): on CUDA, where it is faster; not on the CPU, where it
    is slower."""
    return torch.device(device).type == "cuda"


def inference_network(network: "GradICONNetwork", *, subpixel_upconvs: bool) -> "GradICONNetwork":
    """An inference copy of ``network`` (eval mode, no gradients): each U-Net's BatchNorm folded
    (:func:`fold_batchnorm`) and, with ``subpixel_upconvs``, its transposed convolutions in
    sub-pixel form. On ``network``'s device; the caller sets the layout."""
    unets = [fold_batchnorm(unet) for unet in network.unets]
    if subpixel_upconvs:
        for unet in unets:
            unet.upConvs = nn.ModuleList(SubpixelConvTranspose3d(conv) for conv in unet.upConvs)
    copied = GradICONNetwork(network.config, initialize=False)
    copied.unets = nn.ModuleList(unets)
    return copied.eval().to(network.identity_full.device)


class GradICONNetwork(nn.Module):
    """Four U-Nets nested as TS{TS{DS{TS{DS{Psi1}, Psi2}}, Psi3}, Psi4}; see the module docstring."""

    def __init__(self, config: NetworkConfig = NetworkConfig(), initialize: bool = True):
        """``initialize=False``: the U-Nets' parameters and BatchNorm statistics are allocated but
        not set, for a network whose weights are loaded (strictly) or replaced next: the random
        initialization of the official network's 70.7 M parameters takes 0.37 s of a CPU engine's
        start (2 cores), which built two networks. ``config``: a :class:`NetworkConfig` or a dict
        of its fields."""
        super().__init__()
        self.config = config = as_network_config(config) or NetworkConfig()
        # Built on the meta device (no memory, no initialization), then given uninitialized memory;
        # not by to_empty(), whose empty_like of meta tensors imports sympy (0.4 s).
        with contextlib.nullcontext() if initialize else torch.device("meta"):
            self.unets = nn.ModuleList(UNet(config.down_channels, config.up_channels) for _ in range(4))
        if not initialize:
            self.unets._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
        # When set, training recomputes each U-Net's activations in the backward pass instead
        # of keeping them: a fraction of the memory of instance optimization, for one more
        # forward pass of compute.
        self.checkpoint_unets = False
        # Training only. unet_autocast (torch.bfloat16 or None): mixed precision for the U-Nets
        # alone, whose outputs return as float32, so maps, warps and losses stay float32.
        # last_unet: False runs without Psi4 (its displacement is zero), the first stage of the
        # reference's two-stage training; a fresh Psi4 outputs zero as well.
        self.unet_autocast = None
        self.last_unet = True
        # With gradients (IO, training), the maps of the compositions and warps (61 MiB each at
        # 175^3) recomputed in the backward pass instead of kept (recomputed_in_backward): IO's
        # forecast peak at 175^3 5.73 -> 4.70 GiB. None (see recomputes_maps): on a GPU, and under
        # checkpoint_unets (io_checkpointing, the mode that saves memory); not otherwise on the
        # CPU, where the recomputation took 0.67 s of a 10 s IO step at 175^3 (2-core AMD Zen 5).
        self.recompute_maps: bool | None = None
        # With gradients (IO), each U-Net's finest decoder level and last convolution run again in
        # the backward pass (UNet.forward's recompute_finest_level) instead of keeping the finest
        # level's BatchNorm input, 0.33 GiB for each of the four full-resolution U-Net calls of an
        # IO step at 175^3, for one more transposed convolution each: IO's forecast peak at 175^3
        # 4.70 -> 3.63 GiB. None: on a GPU, where memory is scarce and the convolution takes
        # milliseconds; not on the CPU, where memory is plentiful and two IO steps at 175^3 took
        # 19% longer (44.5 -> 53.0 s, 2 cores).
        self.recompute_finest_levels: bool | None = None
        full, half, quarter = config.level_shapes()
        for name, shape in (("identity_full", full), ("identity_half", half)):
            self.register_buffer(name, identity_map(shape), persistent=False)

    def displacement_fields(self, moving: torch.Tensor, fixed: torch.Tensor):
        """Displacements ``[d1, d2, d3, d4]`` of the four U-Nets, each on its own grid.

        ``moving``/``fixed``: (B, C, *config.input_shape), preprocessed to [0, 1].
        The map moving <- fixed is ``Phi(x) = x`` composed through d4, d3, d2, d1
        (see :func:`evaluate_map`).
        """
        expected = tuple(self.config.input_shape)
        if tuple(moving.shape[2:]) != expected or tuple(fixed.shape[2:]) != expected:
            raise InvalidImageError(f"network input must be {expected}, got {tuple(moving.shape[2:])} and "
                                    f"{tuple(fixed.shape[2:])}; Engine.preprocess resizes an image to it")
        psi1, psi2, psi3, psi4 = (functools.partial(self._run_unet, unet) for unet in self.unets)
        moving_half = F.avg_pool3d(moving, 2, ceil_mode=True)
        fixed_half = F.avg_pool3d(fixed, 2, ceil_mode=True)
        d1 = psi1(F.avg_pool3d(moving_half, 2, ceil_mode=True), F.avg_pool3d(fixed_half, 2, ceil_mode=True))

        # Fields are sampled even at grid points (not resized) to round as the reference does:
        # IO's finite differences amplify any rounding difference a thousandfold.
        half_map = compose_maps(d1, self.identity_half)
        d2 = psi2(warp(moving_half, half_map, padding="border"), fixed_half)

        identity = self.identity_full
        recompute = self.recomputes_maps(moving.device)
        d3 = psi3(warp_through(moving, [d1, d2], identity, recompute=recompute), fixed)

        if not self.last_unet:
            return [d1, d2, d3, torch.zeros_like(d3)]
        d4 = psi4(warp_through(moving, [d1, d2], identity, d3, recompute=recompute), fixed)
        return [d1, d2, d3, d4]

    def recomputes_maps(self, device) -> bool:
        """Whether, with gradients, the maps of the compositions and warps are recomputed in the
        backward pass on ``device``: :attr:`recompute_maps`, or where that is None, on CUDA and
        under :attr:`checkpoint_unets`."""
        if self.recompute_maps is not None:
            return self.recompute_maps
        return torch.device(device).type == "cuda" or self.checkpoint_unets

    def _run_unet(self, unet: UNet, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.unet_autocast is not None:
            with torch.autocast(moving.device.type, dtype=self.unet_autocast):
                return self._run_unet_plain(unet, moving, fixed).float()
        return self._run_unet_plain(unet, moving, fixed)

    def _run_unet_plain(self, unet: UNet, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_unets:  # the whole U-Net recomputed, its finest level with it
            return recomputed_in_backward(unet, moving, fixed, recompute=True)
        recompute_finest_level = self.recompute_finest_levels
        if recompute_finest_level is None:
            recompute_finest_level = moving.is_cuda
        if recompute_finest_level and torch.is_grad_enabled():  # the export's U-Nets take no such option
            return unet(moving, fixed, recompute_finest_level=True)
        return unet(moving, fixed)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The map ``Phi[moving, fixed]`` on the full-resolution grid: moving o Phi ~ fixed."""
        fields = self.displacement_fields(moving, fixed)
        return map_on_grid(fields, self.identity_full)


def evaluate_map(fields, coords: torch.Tensor) -> torch.Tensor:
    """``Phi(coords)`` for the displacement fields of :meth:`GradICONNetwork.displacement_fields`,
    applied innermost-last: coords -> + d_last -> ... -> + d_first (fields repeat their border)."""
    for field in reversed(fields):
        coords = compose_maps(field, coords)
    return coords


def map_on_grid(fields, identity: torch.Tensor) -> torch.Tensor:
    """``Phi`` on the full-resolution identity grid: the last field lies on that grid, so it adds directly."""
    return evaluate_map(fields[:-1], identity + fields[-1])


def warp_through(image, fields, identity, displacement=None, *, recompute: bool = False):
    """``image`` warped (border padding) at ``evaluate_map(fields, identity + displacement)``
    (TwoStep's input to its next U-Net); the maps recomputed in the backward pass with
    ``recompute`` (:func:`recomputed_in_backward`)."""
    def warped(image, identity, displacement, *fields):
        coords = identity if displacement is None else identity + displacement
        return warp(image, evaluate_map(fields, coords), padding="border")

    return recomputed_in_backward(warped, image, identity, displacement, *fields, recompute=recompute)


def randomize_weights(network: nn.Module, seed: int, displacement_scale: float = 1.0) -> nn.Module:
    """Fill every parameter and the BatchNorm running statistics of ``network`` with seeded
    random values, in place: for tests, demos and benchmarks, since the official weights
    cannot be fetched everywhere.

    The default init zeroes each U-Net's last convolution, so the network would output the
    identity map; it is redrawn too, then scaled by ``displacement_scale`` to keep the
    displacements at a few voxels.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                weight = module.weight  # Conv: (out, in, k, k, k); ConvTranspose: (in, out, k, k, k)
                fan_in = weight[0].numel() if isinstance(module, nn.Conv3d) else weight[:, 0].numel()
                # This exact arithmetic (the tests' original): the IO tests compare losses with the
                # reference to 2e-5, and a last-bit change of the weights moved them past that.
                bound = 1.0 / fan_in**0.5
                weight.copy_((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound * 1.7)
                module.bias.copy_((torch.rand(module.bias.shape, generator=gen) * 2 - 1) * bound)
                if name.endswith("lastConv"):
                    weight.mul_(displacement_scale)
                    module.bias.mul_(displacement_scale)
            elif isinstance(module, nn.BatchNorm3d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return network


# ---------------------------------------------------------------- checkpoints

# Where each U-Net sits in the official nesting of TwoStep/DownSample modules.
OFFICIAL_PREFIXES = (
    "netPhi.netPhi.net.netPhi.net.net.",  # Psi1: TS.TS.DS.TS.DS.FunctionFromVectorField.UNet
    "netPhi.netPhi.net.netPsi.net.",  # Psi2
    "netPhi.netPsi.net.",  # Psi3
    "netPsi.net.",  # Psi4
)


def official_state_dict(network: GradICONNetwork) -> dict:
    """The network's weights under the official key names (what ``regis_net.state_dict()`` has)."""
    out = {}
    for key, value in network.state_dict().items():
        _, index, rest = key.split(".", 2)
        out[OFFICIAL_PREFIXES[int(index)] + rest] = value
    return out


def _to_internal_key(key: str):
    for index, prefix in enumerate(OFFICIAL_PREFIXES):
        if key.startswith(prefix):
            return f"unets.{index}.{key[len(prefix):]}"
    return None


def load_official_state_dict(network: GradICONNetwork, state_dict: dict) -> None:
    """Load an official ``regis_net`` state dict strictly; raise :class:`CheckpointError` naming
    the first offending keys when keys are missing or unexpected or shapes differ."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError("the checkpoint holds no state dict; expected the regis_net state_dict of Step_2_final.trch")
    if all(k.startswith("regis_net.") for k in state_dict):  # a whole GradientICON module's dict
        state_dict = {k[len("regis_net."):]: v for k, v in state_dict.items()}
    # NumPy arrays (weights read with safetensors.numpy, say) as tensors; anything else is no weight
    state_dict = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in state_dict.items()}
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"the state dict's {', '.join(map(repr, not_tensors[:3]))} "
                              f"{'are' if len(not_tensors) > 1 else 'is'} not a tensor "
                              f"({type(state_dict[not_tensors[0]]).__name__}); expected the regis_net "
                              "state_dict of Step_2_final.trch")
    own = network.state_dict()
    renamed, unexpected = {}, []
    for key, value in state_dict.items():
        internal = _to_internal_key(key)
        if internal is None or internal not in own:
            unexpected.append(key)
        else:
            renamed[internal] = value
    missing = [k for k in official_state_dict(network) if _to_internal_key(k) not in renamed]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, network {tuple(own[_to_internal_key(k)].shape)})"
        for k, v in state_dict.items()
        if _to_internal_key(k) in own and tuple(v.shape) != tuple(own[_to_internal_key(k)].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {', '.join(unexpected[:3])}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys of the wrong shape, first: {'; '.join(wrong_shape[:3])}")
        raise CheckpointError(
            "checkpoint does not match the network architecture: " + "; ".join(parts)
            + ". Pass the Step_2_final.trch of uniGradICON/multiGradICON for the official network, "
            "or the NetworkConfig the checkpoint was trained with."
        )
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:  # the network would map every pair to NaN, written without a word
        raise CheckpointError(
            f"the checkpoint holds NaN or infinite weights in {len(not_finite)} tensors, first: "
            f"{', '.join(not_finite[:3])}; the file is damaged or was saved from a diverged training run.")
    network.load_state_dict(renamed, strict=True)


# ---------------------------------------------------------------- safetensors

SAFETENSORS_FORMAT = "mgr_engine.gradicon"


def save_safetensors(network: GradICONNetwork, path, *, metadata: dict | None = None, half: bool = True) -> Path:
    """Write ``network``'s weights (official key names) as safetensors, atomically.

    The file's metadata holds the :class:`NetworkConfig` (``network_config``, JSON), so
    :func:`read_safetensors` rebuilds the right network, plus ``metadata`` (values must be
    strings). ``half``: convolution weights and biases as float16 (half the size; loading
    returns float32); BatchNorm parameters and statistics stay float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in official_state_dict(network).items():
        value = value.detach().cpu()
        if half and value.is_floating_point() and ".batchNorms." not in key:
            value = value.half()
        tensors[key] = value.contiguous()
    meta = {"format": SAFETENSORS_FORMAT, "network_config": json.dumps(asdict(network.config))}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    # safetensors creates files 0600; give them the mode any other file would get (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)
    return path


def read_safetensors(path):
    """``(state_dict, config, metadata)`` of a safetensors weights file: float32 tensors under
    the official key names, the :class:`NetworkConfig` stored by :func:`save_safetensors`
    (``None`` when the file has none) and the whole metadata. :class:`CheckpointError` when
    the file cannot be read."""
    try:
        from safetensors import safe_open

        state = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                value = handle.get_tensor(key)
                state[key] = value.float() if value.is_floating_point() else value
    except Exception as exc:
        raise CheckpointError(
            f"cannot read safetensors weights {str(path)!r} ({exc.__class__.__name__}: {exc}); expected a file "
            "written by mgr_engine (mgr-engine train)") from exc
    config = None
    if "network_config" in metadata:
        config = as_network_config(json.loads(metadata["network_config"]))  # JSON's lists, kept as tuples
    return state, config, metadata
