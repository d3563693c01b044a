"""The backward pass of a U-Net decoder level's eval-mode BatchNorm, crop and concatenation (Triton).

Instance optimization runs the U-Nets' BatchNorm in eval mode (running statistics) and
optimizes its weight and bias with the rest of the network. A decoder level's output is
``cat([norm(x)[:, :, :d, :h, :w], skip], 1)`` (:class:`mgr_engine.model._EvalNormCropConcat`,
whose forward stays PyTorch's); from that concatenation's gradient ``G``, with
``invstd = 1 / sqrt(running_var + eps)``:

    grad_x      = G[:, :C] * weight * invstd           (zero where the crop cut)
    grad_bias   = sum of G[:, :C] over samples and voxels
    grad_weight = invstd * sum of G[:, :C] * (x - running_mean)

torch's CUDA BatchNorm backward reduces each channel in a single thread block: a grid of C
blocks, 16 of an H200's 132 SMs at the full-resolution level (16 channels, 176^3 voxels), each
reading its 2 x 5.4 M voxels one block wide. IO's BatchNorm took 0.19 s of the 2.40 s of GPU
time of two fp32 steps on an H200 (RESULTS.md, thirty-fifth session), a larger share once TF32
shrinks the convolutions. This kernel splits every (sample, channel) plane into chunks of
``BLOCK * ROUNDS`` voxels, one program each: it reads ``G``'s first C channels and ``x`` once,
writes ``grad_x`` (zeros outside the crop included) and the chunk's two partial sums, which
torch adds up in float64. The PyTorch reference is the torch path of ``_EvalNormCropConcat``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024  # voxels a program handles at once
ROUNDS = 8  # blocks per program: a chunk of BLOCK * ROUNDS voxels, one pair of partial sums


# Only the W strides are specialized (to 1, contiguous rows): Triton would compile a variant for
# each combination of the sizes' and other strides' divisibility by 16, one per decoder level
# and resolution of the network (up to 15 on an IO call's first step).
@triton.jit(do_not_specialize=["channels", "d", "h", "w", "x_d", "x_h", "x_w", "chunks", "g_sb", "g_sc", "g_sd",
                               "g_sh", "x_sb", "x_sc", "x_sd", "x_sh", "o_sb", "o_sc", "o_sd", "o_sh"])
def norm_grad_kernel(grad_ptr, x_ptr, grad_x_ptr, scale_ptr, mean_ptr, partial_ptr,
                     channels, d, h, w, x_d, x_h, x_w, chunks,
                     g_sb, g_sc, g_sd, g_sh, g_sw, x_sb, x_sc, x_sd, x_sh, x_sw, o_sb, o_sc, o_sd, o_sh, o_sw,
                     INPUT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
    """One chunk of one (sample, channel) plane of ``x`` (grid ``x_d, x_h, x_w``), of which the
    crop keeps ``d, h, w``: ``grad_x = G * scale[c]`` (INPUT_GRAD) and the partial sums of ``G``
    and of ``G * (x - mean[c])`` into ``partial_ptr[plane, 0 or 1, chunk]``. Strides per tensor
    (sample, channel, D, H, W); offsets within a sample are 32-bit."""
    chunk = tl.program_id(0)
    plane = tl.program_id(1)
    b = (plane // channels).to(tl.int64)
    c = (plane % channels).to(tl.int64)
    mean = tl.load(mean_ptr + c).to(ACC)
    scale = tl.load(scale_ptr + c).to(ACC)
    g_base = grad_ptr + b * g_sb + c * g_sc
    x_base = x_ptr + b * x_sb + c * x_sc
    o_base = grad_x_ptr + b * o_sb + c * o_sc
    voxels = x_d * x_h * x_w
    sum_g = tl.zeros((BLOCK,), dtype=ACC)
    sum_gx = tl.zeros((BLOCK,), dtype=ACC)
    for r in range(ROUNDS):
        offs = (chunk * ROUNDS + r) * BLOCK + tl.arange(0, BLOCK)
        m = offs < voxels
        k = offs % x_w
        rows = offs // x_w
        j = rows % x_h
        i = rows // x_h
        inside = m & (i < d) & (j < h) & (k < w)
        g = tl.load(g_base + i * g_sd + j * g_sh + k * g_sw, mask=inside, other=0.0).to(ACC)
        xv = tl.load(x_base + i * x_sd + j * x_sh + k * x_sw, mask=inside, other=0.0).to(ACC)
        sum_g += g
        sum_gx += g * (xv - mean)
        if INPUT_GRAD:
            tl.store(o_base + i * o_sd + j * o_sh + k * o_sw, g * scale, mask=m)
    out = partial_ptr + plane.to(tl.int64) * 2 * chunks + chunk
    tl.store(out, tl.sum(sum_g, axis=0))
    tl.store(out + chunks, tl.sum(sum_gx, axis=0))


def fits(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: float32 or float64, fewer than 2^31 elements a
    sample (its offsets within a sample are 32-bit)."""
    return (x.dtype in (torch.float32, torch.float64) and grad.dtype == x.dtype
            and max(grad[0].numel(), x[0].numel()) < 2**31)


def norm_crop_concat_backward(grad, x, weight, running_mean, running_var, eps: float, input_grad: bool):
    """``(grad_x, grad_weight, grad_bias)`` of ``cat([batch_norm_eval(x)[:, :, :d, :h, :w], skip], 1)``
    from that concatenation's gradient ``grad`` (B, C + Cs, d, h, w); ``grad_x`` in ``x``'s
    layout, None unless ``input_grad``. Any strides; see :func:`fits`."""
    batch, channels = x.shape[:2]
    chunks = triton.cdiv(math.prod(x.shape[2:]), BLOCK * ROUNDS)
    invstd = torch.rsqrt(running_var.double() + eps)
    scale = (weight.double() * invstd).to(x.dtype)
    grad_x = torch.empty_like(x) if input_grad else x  # x: an unused pointer
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    partials = torch.empty((batch * channels, 2, chunks), dtype=x.dtype, device=x.device)
    norm_grad_kernel[(chunks, batch * channels)](
        grad, x, grad_x, scale, running_mean.to(x.dtype), partials, channels, *grad.shape[2:], *x.shape[2:], chunks,
        *grad.stride(), *x.stride(), *grad_x.stride(), INPUT_GRAD=input_grad, ACC=acc, BLOCK=BLOCK, ROUNDS=ROUNDS)
    sums = partials.view(batch, channels, 2, chunks).sum((0, 3), dtype=torch.float64)
    return (grad_x if input_grad else None), (sums[:, 1] * invstd).to(weight.dtype), sums[:, 0].to(weight.dtype)
