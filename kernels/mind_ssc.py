"""MIND-SSC descriptor (Triton), forward and backward.

Semantics of :func:`mgr_engine.losses.mind_ssc` (radius 2, dilation 2 in IO): for the 12 pairs
(a_k, b_k) of dilated six-neighbours sqrt(2) apart, with replicated edges,

    S_k = (I[x + a_k] - I[x + b_k])^2,  SSD_k = mean of S_k over the (2r + 1)^3 patch,
    M_k = SSD_k - min_j SSD_j,  V = mean_k M_k,  desc_k = exp(-M_k / clamp(V, lo, hi))

with ``lo, hi = mean(V) * (1e-3, 1e3)`` (V's mean over the batch, not differentiated). On a GPU
the PyTorch path is a dozen passes over 12-channel volumes and autograd keeps most of them (1.1
GiB a call at 175^3, twice an IO step); here:

forward:  image --pad--> P --squares--> S --box D, H, W--> SSD --normalize--> M, V; desc = exp(-M / clamp(V))
backward: (recomputed) SSD --normalize'--> dSSD --box' D, H, W--> dS --squares'--> dD --gather--> dP --pad'--> dI

Each box pass sums 2r + 1 gathered voxels along one axis (edge voxels repeated; its adjoint adds
what the edges took back onto them), ping-ponging between two 12-channel buffers; ``normalize'``
forms the gradient through exp, the clamp (inside the bounds only, as ``torch.clamp``), the mean
and the minimum (to the first of equal minima, as ``torch.min``); ``gather`` sums, for each
voxel of the padded image, the 24 pair differences that read it (no atomics); ``pad'`` is
PyTorch's replicate-padding backward. The backward recomputes the patch means instead of keeping
them: the autograd graph keeps the image, the descriptor and the two bounds. The bounds stay a
tensor (no ``.item()``: that would wait for the GPU twice a call).

The CPU twin is :mod:`mgr_engine.kernels.mind_ssc_cpu` (C++, the same passes plane by plane).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mgr_engine.losses import _MIND_PAIRS, mind_variance_bounds

BLOCK = 256


@functools.lru_cache(maxsize=None)
def pair_offsets(dilation: int, device: torch.device) -> torch.Tensor:
    """The 12 pairs of neighbour offsets, (12, 6) int32 (a_z, a_y, a_x, b_z, b_y, b_x) in voxels,
    in the reference's channel order. Kept per device: read-only, and a copy to the GPU each
    forward and backward would be a host-to-device transfer on IO's path."""
    return (torch.tensor(_MIND_PAIRS, dtype=torch.int32) * dilation).reshape(12, 6).to(device)


# Sizes are not specialized (see warp.py): each new grid would compile its own variants.
@triton.jit(do_not_specialize=["D", "H", "W", "pad", "volume"])
def squares_kernel(padded_ptr, offsets_ptr, out_ptr, D, H, W, pad, volume, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """out_k = (P[x + a_k] - P[x + b_k])^2 for the 12 pairs, P the image padded by ``pad``; with
    GRAD, out_k (the patch sums' gradient) becomes 2 (P[x + a_k] - P[x + b_k]) out_k."""
    b = tl.program_id(1).to(tl.int64)
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = v < volume
    x = v % W
    y = (v // W) % H
    z = v // (W * H)
    pw = W + 2 * pad
    pplane = (H + 2 * pad) * pw
    centre = padded_ptr + b * (D + 2 * pad) * pplane + (z + pad) * pplane + (y + pad) * pw + x + pad
    for k in range(12):
        a = (tl.load(offsets_ptr + 6 * k) * pplane + tl.load(offsets_ptr + 6 * k + 1) * pw
             + tl.load(offsets_ptr + 6 * k + 2))
        c = (tl.load(offsets_ptr + 6 * k + 3) * pplane + tl.load(offsets_ptr + 6 * k + 4) * pw
             + tl.load(offsets_ptr + 6 * k + 5))
        d = tl.load(centre + a, mask=m, other=0.0) - tl.load(centre + c, mask=m, other=0.0)
        out = out_ptr + (b * 12 + k) * volume + v
        if GRAD:
            tl.store(out, 2.0 * d * tl.load(out, mask=m, other=0.0), mask=m)
        else:
            tl.store(out, d * d, mask=m)


@triton.jit(do_not_specialize=["volume", "n", "stride"])
def box_axis_kernel(src_ptr, dst_ptr, volume, n, stride, scale, RADIUS: tl.constexpr, ADJOINT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """dst = scale * the sum over t in [-r, r] of src at clamp(i + t) along one axis (index i,
    ``n`` voxels ``stride`` apart) of every voxel of one channel (program axis 1: sample and
    channel; 32-bit indices within it); with ADJOINT its transpose: each voxel's gathered
    neighbours, and at the axis' ends what the clamped taps took (position q counted r - q
    times from either end)."""
    base = tl.program_id(1).to(tl.int64) * volume
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = v < volume
    i = (v // stride) % n
    src_ptr += base
    acc = tl.zeros((BLOCK,), dtype=dst_ptr.dtype.element_ty)
    for t in tl.static_range(2 * RADIUS + 1):
        shift = t - RADIUS
        if ADJOINT:
            inside = (i - shift >= 0) & (i - shift < n)
            acc += tl.load(src_ptr + v - shift * stride, mask=m & inside, other=0.0)
        else:
            j = tl.minimum(tl.maximum(i + shift, 0), n - 1)
            acc += tl.load(src_ptr + v + (j - i) * stride, mask=m, other=0.0)
    if ADJOINT:
        for q in tl.static_range(RADIUS):
            low = m & (i == 0) & (i + q < n)  # position q, inside the axis
            acc += (RADIUS - q) * tl.load(src_ptr + v + q * stride, mask=low, other=0.0)
            high = m & (i == n - 1) & (i - q >= 0)  # position n - 1 - q
            acc += (RADIUS - q) * tl.load(src_ptr + v - q * stride, mask=high, other=0.0)
    tl.store(dst_ptr + base + v, acc * scale, mask=m)


@triton.jit
def _desc_grad(grad_ptr, target_ptr, weight_ptr, scale_ptr, b, e, at, at_voxel, m, FROM_TARGET: tl.constexpr,
               HAS_WEIGHT: tl.constexpr):
    """The descriptor's gradient at ``at``: read from grad_ptr, or for the loss
    scale_b / 2 * sum weight (desc - target)^2 formed from the target (e: desc there)."""
    if FROM_TARGET:
        g = tl.load(scale_ptr + b) * (e - tl.load(target_ptr + at, mask=m, other=0.0))
        if HAS_WEIGHT:
            g = g * tl.load(weight_ptr + at_voxel, mask=m, other=0.0)
        return g
    return tl.load(grad_ptr + at, mask=m, other=0.0)


@triton.jit(do_not_specialize=["volume"])
def normalize_kernel(ssd_ptr, var_ptr, desc_ptr, grad_ptr, target_ptr, weight_ptr, scale_ptr, bounds_ptr, volume,
                     GRAD: tl.constexpr, FROM_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Per voxel over the 12 channels: M_k = SSD_k - min into ssd, V = mean_k M_k into var. With
    GRAD, ssd becomes the gradient in SSD given desc, the bounds and the descriptor's gradient
    (grad, or with FROM_TARGET formed from the target, the voxels' weights and the sample's scale:
    :func:`_desc_grad`)."""
    b = tl.program_id(1).to(tl.int64)
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = v < volume
    base = b * 12 * volume + v
    low = tl.load(ssd_ptr + base, mask=m, other=0.0)
    argmin = tl.zeros((BLOCK,), dtype=tl.int32)
    for k in range(1, 12):
        s = tl.load(ssd_ptr + base + k * volume, mask=m, other=0.0)
        lower = s < low  # the first of equal minima, as torch.min
        argmin = tl.where(lower, k, argmin)
        low = tl.where(lower, s, low)
    var = tl.zeros((BLOCK,), dtype=low.dtype)
    for k in range(12):
        var += tl.load(ssd_ptr + base + k * volume, mask=m, other=0.0) - low
    var = var / 12.0
    if GRAD:
        lo = tl.load(bounds_ptr)
        hi = tl.load(bounds_ptr + 1)
        at_voxel = b * volume + v
        clamped = tl.minimum(tl.maximum(var, lo), hi)
        # desc_k = exp(-M_k / Vc): dM_k = -g_k desc_k / Vc, and through Vc (where V is inside the
        # bounds) dV = sum_k g_k desc_k M_k / Vc^2, shared by the 12 M_k of the mean
        dv = tl.zeros((BLOCK,), dtype=low.dtype)
        for k in range(12):
            at = base + k * volume
            e = tl.load(desc_ptr + at, mask=m, other=0.0)
            g = _desc_grad(grad_ptr, target_ptr, weight_ptr, scale_ptr, b, e, at, at_voxel, m, FROM_TARGET, HAS_WEIGHT)
            dv += g * e * (tl.load(ssd_ptr + at, mask=m, other=0.0) - low)
        dv = tl.where((var >= lo) & (var <= hi), dv / (clamped * clamped) / 12.0, 0.0)
        total = tl.zeros((BLOCK,), dtype=low.dtype)  # sum_k dM_k, which the minimum's channel gives back
        for k in range(12):
            at = base + k * volume
            e = tl.load(desc_ptr + at, mask=m, other=0.0)
            g = _desc_grad(grad_ptr, target_ptr, weight_ptr, scale_ptr, b, e, at, at_voxel, m, FROM_TARGET, HAS_WEIGHT)
            total += -g * e / clamped
        total += 12.0 * dv
        for k in range(12):
            at = base + k * volume
            e = tl.load(desc_ptr + at, mask=m, other=0.0)
            g = _desc_grad(grad_ptr, target_ptr, weight_ptr, scale_ptr, b, e, at, at_voxel, m, FROM_TARGET, HAS_WEIGHT)
            tl.store(ssd_ptr + at, -g * e / clamped + dv - tl.where(argmin == k, total, 0.0), mask=m)
    else:
        for k in range(12):
            at = base + k * volume
            tl.store(ssd_ptr + at, tl.load(ssd_ptr + at, mask=m, other=0.0) - low, mask=m)
        tl.store(var_ptr + b * volume + v, var, mask=m)


@triton.jit(do_not_specialize=["volume"])
def distance_kernel(desc_ptr, target_ptr, weight_ptr, partial_ptr, volume, HAS_WEIGHT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Each program's sum of weight * (desc - target)^2 over its voxels and the 12 channels, into
    partial[sample, program] (summed by the caller: the same order every run)."""
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    v = pid * BLOCK + tl.arange(0, BLOCK)
    m = v < volume
    acc = tl.zeros((BLOCK,), dtype=partial_ptr.dtype.element_ty)
    for k in range(12):
        at = (b * 12 + k) * volume + v
        d = tl.load(desc_ptr + at, mask=m, other=0.0) - tl.load(target_ptr + at, mask=m, other=0.0)
        acc += d * d
    if HAS_WEIGHT:
        acc = acc * tl.load(weight_ptr + b * volume + v, mask=m, other=0.0)
    tl.store(partial_ptr + b * tl.num_programs(0) + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["D", "H", "W", "pad", "volume", "padded_volume"])
def gather_pairs_kernel(diff_grad_ptr, offsets_ptr, out_ptr, D, H, W, pad, volume, padded_volume,
                        BLOCK: tl.constexpr):
    """The gradient of the padded image: at each of its voxels p, the sum over the 12 pairs of
    the difference's gradient at p - a_k minus that at p - b_k (where inside the volume)."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < padded_volume
    pw = W + 2 * pad
    ph = H + 2 * pad
    z0 = p // (pw * ph) - pad
    y0 = (p // pw) % ph - pad
    x0 = p % pw - pad
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for k in range(12):
        channel = diff_grad_ptr + (b * 12 + k) * volume
        for side in tl.static_range(2):
            z = z0 - tl.load(offsets_ptr + 6 * k + 3 * side)
            y = y0 - tl.load(offsets_ptr + 6 * k + 3 * side + 1)
            x = x0 - tl.load(offsets_ptr + 6 * k + 3 * side + 2)
            inside = m & (z >= 0) & (z < D) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            acc += (1.0 - 2.0 * side) * tl.load(channel + (z * H + y) * W + x, mask=inside, other=0.0)
    tl.store(out_ptr + b * padded_volume + p, acc, mask=m)


def _patch_means(padded, offsets, grid, pad, radius):
    """(SSD, scratch): the 12 patch means of the padded image's pair squares, and a buffer of
    their shape."""
    batch = padded.shape[0]
    volume = grid[0] * grid[1] * grid[2]
    squares = torch.empty((batch, 12, *grid), dtype=padded.dtype, device=padded.device)
    squares_kernel[(triton.cdiv(volume, BLOCK), batch)](padded, offsets, squares, *grid, pad, volume, GRAD=False,
                                                        BLOCK=BLOCK)
    return _box(squares, torch.empty_like(squares), radius, adjoint=False)


def _box(data, scratch, radius, adjoint):
    """The patch sum (or its transpose) of ``data``'s 12 channels divided by the patch's size, along
    D, H and W through ``scratch``; returns (result, the other buffer)."""
    depth, height, width = data.shape[2:]
    side = 2 * radius + 1
    volume = depth * height * width
    grid = (triton.cdiv(volume, BLOCK), data.shape[0] * data.shape[1])
    for axis, (n, stride) in enumerate(((depth, height * width), (height, width), (width, 1))):
        scale = 1.0 / side**3 if axis == 2 else 1.0
        box_axis_kernel[grid](data, scratch, volume, n, stride, scale, RADIUS=radius, ADJOINT=adjoint, BLOCK=BLOCK)
        data, scratch = scratch, data
    return data, scratch


def _descriptor(image, radius, dilation):
    """The descriptor of ``image`` (contiguous, detached) and the bounds its variance was clamped to
    (a tensor: no wait for the GPU)."""
    batch, _, *grid = image.shape
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    desc, _ = _patch_means(padded, pair_offsets(dilation, image.device), grid, dilation, radius)
    variance = torch.empty((batch, 1, *grid), dtype=image.dtype, device=image.device)
    volume = variance[0].numel()
    normalize_kernel[(triton.cdiv(volume, BLOCK), batch)](desc, variance, desc, desc, desc, desc, desc, desc, volume,
                                                          GRAD=False, FROM_TARGET=False, HAS_WEIGHT=False, BLOCK=BLOCK)
    bounds = torch.stack(mind_variance_bounds(variance))  # as the reference takes them
    desc.div_(torch.clamp(variance, bounds[0], bounds[1])).neg_().exp_()
    return desc, bounds


def _image_grad(image, desc, bounds, radius, dilation, grad_desc=None, target=None, weights=None, scales=None):
    """The image's gradient, given the descriptor's (``grad_desc``), or for the loss
    ``sum_n scales_n / 2 * sum weights (desc - target)^2`` the target, weights and scales."""
    batch, _, *grid = image.shape
    offsets = pair_offsets(dilation, image.device)
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    work, scratch = _patch_means(padded, offsets, grid, dilation, radius)
    volume = desc[0, 0].numel()
    from_target = grad_desc is None
    normalize_kernel[(triton.cdiv(volume, BLOCK), batch)](
        work, work, desc, desc if from_target else grad_desc, target if from_target else desc,
        desc if weights is None else weights, scales if from_target else desc, bounds, volume,
        GRAD=True, FROM_TARGET=from_target, HAS_WEIGHT=weights is not None, BLOCK=BLOCK)
    work, scratch = _box(work, scratch, radius, adjoint=True)
    del scratch
    squares_kernel[(triton.cdiv(volume, BLOCK), batch)](padded, offsets, work, *grid, dilation, volume, GRAD=True,
                                                        BLOCK=BLOCK)
    grad_padded = torch.empty_like(padded)
    padded_volume = padded[0].numel()
    gather_pairs_kernel[(triton.cdiv(padded_volume, BLOCK), batch)](work, offsets, grad_padded, *grid, dilation,
                                                                   volume, padded_volume, BLOCK=BLOCK)
    return torch.ops.aten.replication_pad3d_backward(grad_padded, image, [dilation] * 6)


class MindSSC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, radius: int, dilation: int):
        image = image.detach().contiguous()
        desc, bounds = _descriptor(image, radius, dilation)
        ctx.save_for_backward(image, desc, bounds)
        ctx.args = (radius, dilation)
        return desc

    @staticmethod
    def backward(ctx, grad_desc):
        image, desc, bounds = ctx.saved_tensors
        grad = _image_grad(image, desc, bounds, *ctx.args, grad_desc=grad_desc.to(desc.dtype).contiguous())
        return grad, None, None


class MindDistance(torch.autograd.Function):
    """``masked_mean((mind_ssc(image) - target_desc) ** 2, mask)`` with the difference, its square
    and the descriptor's gradient computed where used, not stored (12 channels each)."""

    @staticmethod
    def forward(ctx, image, target_desc, included, radius: int, dilation: int):
        image = image.detach().contiguous()
        batch, _, *grid = image.shape
        desc, bounds = _descriptor(image, radius, dilation)
        target_desc = target_desc.detach().expand(batch, *target_desc.shape[1:]).contiguous()
        weights = None if included is None else included.expand(batch, 1, *grid).contiguous()
        volume = desc[0, 0].numel()
        programs = triton.cdiv(volume, BLOCK)
        # masked_mean's sums: in at least float32
        partial = torch.empty((batch, programs), dtype=torch.promote_types(image.dtype, torch.float32),
                              device=image.device)
        distance_kernel[(programs, batch)](desc, target_desc, desc if weights is None else weights, partial, volume,
                                           HAS_WEIGHT=weights is not None, BLOCK=BLOCK)
        # masked_mean's divisors: the included values of each sample (12 per voxel), at least 1
        counts = (torch.full((batch,), float(volume), dtype=partial.dtype, device=image.device) if weights is None
                  else weights.flatten(1).sum(1, dtype=partial.dtype)) * 12
        counts = counts.clamp_min(1)
        ctx.save_for_backward(image, desc, bounds, target_desc, weights, counts)
        ctx.args = (radius, dilation)
        return (partial.sum(1) / counts).mean().to(image.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        image, desc, bounds, target_desc, weights, counts = ctx.saved_tensors
        scales = (2 * grad_loss / (image.shape[0] * counts)).to(image.dtype)
        grad = _image_grad(image, desc, bounds, *ctx.args, target=target_desc, weights=weights, scales=scales)
        return grad, None, None, None, None


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """Triton version of :func:`mgr_engine.losses.mind_ssc` ((B, 1, D, H, W) images, float32 or float64)."""
    return MindSSC.apply(image, radius, dilation)


def mind_distance(image: torch.Tensor, target_desc: torch.Tensor, mask: torch.Tensor | None = None,
                  radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """Triton version of ``masked_mean((mind_ssc(image) - target_desc) ** 2, mask)``, differentiable
    in ``image`` (see :func:`mgr_engine.losses.mind_distance`, which checks the inputs fit)."""
    included = None if mask is None else (mask != 0).to(image.dtype)
    return MindDistance.apply(image, target_desc, included, radius, dilation)
