"""Fused windowed LNCC and LNCC^2 losses (Triton).

Semantics of :func:`mgr_engine.losses.lncc_loss` / ``lncc2_loss``: the five local
moments (I, J, I^2, J^2, IJ) under a separable 21-tap Gaussian window (sigma 5, zero
padding), the LNCC map from them, and its (masked) mean, as ``1 - mean``.

Three separable passes, one per axis; every pass carries all five moments:

forward:  (I, J) --W--> m1 --H--> m2 --D + epilogue--> per-sample sums of lncc (or lncc^2)
backward: (I, J) --W--> m1 --H--> m2 --D + epilogue--> g (the five dL/d(blurred moment))
          g --W--> g1 --H--> g2 --D + epilogue--> dL/dI, dL/dJ

The first pass forms the moments from I and J on the fly, and the last pass of each
chain consumes the blurred moments in registers: neither the five moment volumes nor
the five blurred volumes are stored, only two partially blurred 5-channel buffers at a
time (10 volumes at the peak, in the first chain). The Gaussian is symmetric and
zero-padded, so the backward blur is the same blur. Where only one image needs a gradient
(the moving image, in registration), g carries the three moment gradients it depends on
(those of E[I], E[I^2], E[IJ]); LNCC is symmetric in I and J, so a gradient for J alone
runs the same chain with the images swapped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgr_engine.losses import LNCC_SIGMA, LNCC_TAPS, gaussian_kernel1d

BLOCK = 256
EPS = 1e-5
# what the last pass of a chain does with the five blurred moments
STORE, LOSS_SUMS, MOMENT_GRADS, INPUT_GRADS = 0, 1, 2, 3


@triton.jit
def blur_axis_kernel(src_ptr, i_ptr, j_ptr, dst_ptr, dst2_ptr, taps_ptr, mask_ptr, scale_ptr,
                     n_vox, size, stride,
                     FROM_IMAGES: tl.constexpr, EPILOGUE: tl.constexpr, SQUARED: tl.constexpr,
                     HAS_MASK: tl.constexpr, CHANNELS: tl.constexpr, ACC: tl.constexpr, TAPS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Blur five (or three) channels along one axis (``stride``/``size``), then apply ``EPILOGUE``.

    Sources: the five moments formed from images ``i_ptr``/``j_ptr`` (FROM_IMAGES), or a
    buffer ``src_ptr`` (B, channels, n_vox): five moments for LOSS_SUMS and MOMENT_GRADS, else
    CHANNELS moment gradients. Epilogues: STORE to ``dst_ptr``; LOSS_SUMS adds each sample's
    sum of lncc (or lncc^2) inside the mask to ``dst_ptr[b]``; MOMENT_GRADS stores
    dL/d(blurred moments) given ``scale_ptr[b]`` = dL/d(sample's sum), all five or (CHANNELS
    3) those of E[I], E[I^2] and E[IJ]; INPUT_GRADS turns blurred moment gradients into dL/dI
    (``dst_ptr``) and, from five, dL/dJ (``dst2_ptr``).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_vox
    pos = (offs // stride) % size
    half = TAPS // 2
    img_i = i_ptr + b * n_vox
    img_j = j_ptr + b * n_vox
    # the source's channels: five moments, or (STORE, INPUT_GRADS) CHANNELS moment gradients
    src_channels = 5
    if CHANNELS == 3:
        if EPILOGUE == 0 or EPILOGUE == 3:
            src_channels = 3
    src = src_ptr + b * src_channels * n_vox
    m0 = tl.zeros((BLOCK,), dtype=ACC)
    m1 = tl.zeros((BLOCK,), dtype=ACC)
    m2 = tl.zeros((BLOCK,), dtype=ACC)
    m3 = tl.zeros((BLOCK,), dtype=ACC)
    m4 = tl.zeros((BLOCK,), dtype=ACC)
    for t in range(TAPS):
        weight = tl.load(taps_ptr + t).to(ACC)
        neighbour = pos + (t - half)
        valid = m & (neighbour >= 0) & (neighbour < size)
        at = offs + (t - half) * stride
        if FROM_IMAGES:
            vi = tl.load(img_i + at, mask=valid, other=0.0).to(ACC)
            vj = tl.load(img_j + at, mask=valid, other=0.0).to(ACC)
            m0 += weight * vi
            m1 += weight * vj
            m2 += weight * (vi * vi)
            m3 += weight * (vj * vj)
            m4 += weight * (vi * vj)
        else:
            m0 += weight * tl.load(src + at, mask=valid, other=0.0).to(ACC)
            m1 += weight * tl.load(src + n_vox + at, mask=valid, other=0.0).to(ACC)
            m2 += weight * tl.load(src + 2 * n_vox + at, mask=valid, other=0.0).to(ACC)
            if src_channels == 5:
                m3 += weight * tl.load(src + 3 * n_vox + at, mask=valid, other=0.0).to(ACC)
                m4 += weight * tl.load(src + 4 * n_vox + at, mask=valid, other=0.0).to(ACC)

    dst = dst_ptr + b * CHANNELS * n_vox
    if EPILOGUE == 0:  # STORE
        tl.store(dst + offs, m0, mask=m)
        tl.store(dst + n_vox + offs, m1, mask=m)
        tl.store(dst + 2 * n_vox + offs, m2, mask=m)
        if CHANNELS == 5:
            tl.store(dst + 3 * n_vox + offs, m3, mask=m)
            tl.store(dst + 4 * n_vox + offs, m4, mask=m)
    elif EPILOGUE == 3:  # INPUT_GRADS
        vi = tl.load(img_i + offs, mask=m, other=0.0).to(ACC)
        vj = tl.load(img_j + offs, mask=m, other=0.0).to(ACC)
        if CHANNELS == 5:  # m0..m4: the blurred gradients of E[I], E[J], E[I^2], E[J^2], E[IJ]
            tl.store(dst_ptr + b * n_vox + offs, m0 + 2.0 * vi * m2 + vj * m4, mask=m)
            tl.store(dst2_ptr + b * n_vox + offs, m1 + 2.0 * vj * m3 + vi * m4, mask=m)
        else:  # m0..m2: the blurred gradients of E[I], E[I^2], E[IJ]
            tl.store(dst_ptr + b * n_vox + offs, m0 + 2.0 * vi * m1 + vj * m2, mask=m)
    else:
        # m0..m4 = E[I], E[J], E[I^2], E[J^2], E[IJ] under the window
        raw_i = m2 - m0 * m0
        raw_j = m3 - m1 * m1
        var_i = tl.maximum(raw_i, 0.0) + 1e-5
        var_j = tl.maximum(raw_j, 0.0) + 1e-5
        rsq = 1.0 / tl.sqrt(var_i * var_j)
        lncc = (m4 - m0 * m1) * rsq
        if HAS_MASK:
            inside = tl.load(mask_ptr + b * n_vox + offs, mask=m, other=0.0) != 0
        else:
            inside = m
        inside = inside & m
        if EPILOGUE == 1:  # LOSS_SUMS
            value = lncc * lncc if SQUARED else lncc
            tl.atomic_add(dst_ptr + b, tl.sum(tl.where(inside, value, 0.0), axis=0))
        else:  # MOMENT_GRADS
            scale = tl.load(scale_ptr + b).to(ACC)
            if SQUARED:
                a = scale * 2.0 * lncc
            else:
                a = scale + tl.zeros((BLOCK,), dtype=ACC)
            a = tl.where(inside, a, 0.0)  # dL/dlncc
            g_cov = a * rsq
            g_sii = tl.where(raw_i > 0.0, -0.5 * a * lncc / var_i, 0.0)
            g_sjj = tl.where(raw_j > 0.0, -0.5 * a * lncc / var_j, 0.0)
            if CHANNELS == 5:
                tl.store(dst + offs, -g_cov * m1 - 2.0 * m0 * g_sii, mask=m)
                tl.store(dst + n_vox + offs, -g_cov * m0 - 2.0 * m1 * g_sjj, mask=m)
                tl.store(dst + 2 * n_vox + offs, g_sii, mask=m)
                tl.store(dst + 3 * n_vox + offs, g_sjj, mask=m)
                tl.store(dst + 4 * n_vox + offs, g_cov, mask=m)
            else:  # what dL/dI needs: the gradients of E[I], E[I^2], E[IJ]
                tl.store(dst + offs, -g_cov * m1 - 2.0 * m0 * g_sii, mask=m)
                tl.store(dst + n_vox + offs, g_sii, mask=m)
                tl.store(dst + 2 * n_vox + offs, g_cov, mask=m)


def _passes(shape):
    """(size, stride) of the W, H and D axes of a (D, H, W) volume, in pass order."""
    d, h, w = shape
    return [(w, 1), (h, w), (d, h * w)]


def _launch(shape, batch, *, src, images, dst, dst2=None, mask=None, scale=None, axis, from_images=False,
            epilogue=STORE, squared=False, channels=5):
    i, j = images
    size, stride = _passes(shape)[axis]
    n_vox = shape[0] * shape[1] * shape[2]
    acc = tl.float64 if i.dtype == torch.float64 else tl.float32
    taps = gaussian_kernel1d(LNCC_TAPS, LNCC_SIGMA, i.dtype, i.device)
    blur_axis_kernel[(triton.cdiv(n_vox, BLOCK), batch)](
        src if src is not None else i, i, j, dst, dst2 if dst2 is not None else dst, taps,
        mask if mask is not None else i, scale if scale is not None else taps, n_vox, size, stride,
        FROM_IMAGES=from_images, EPILOGUE=epilogue, SQUARED=squared, HAS_MASK=mask is not None, CHANNELS=channels,
        ACC=acc, TAPS=LNCC_TAPS, BLOCK=BLOCK)


def _blurred_moments(i, j, mask, *, last_epilogue, squared, last_dst=None, scale=None, channels=5):
    """Passes W and H into two 5-channel scratch buffers, each freed once read, then pass D with
    ``last_epilogue`` into ``last_dst``; without one, into a (B, ``channels``, n_vox) buffer
    allocated once the first scratch buffer is freed (the moment gradients), returned."""
    batch, shape = i.shape[0], tuple(i.shape[2:])
    n_vox = i[0, 0].numel()
    common = dict(images=(i, j), mask=mask, squared=squared)
    first = torch.empty((batch, 5, n_vox), dtype=i.dtype, device=i.device)
    _launch(shape, batch, src=None, dst=first, axis=0, from_images=True, **common)
    second = torch.empty_like(first)
    _launch(shape, batch, src=first, dst=second, axis=1, **common)
    del first
    if last_dst is None:
        last_dst = torch.empty((batch, channels, n_vox), dtype=i.dtype, device=i.device)
    _launch(shape, batch, src=second, dst=last_dst, axis=2, epilogue=last_epilogue, scale=scale,
            channels=channels, **common)
    return last_dst


def _prepare(image, target, mask):
    if image.shape != target.shape or image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, D, H, W) volumes of one shape, got {tuple(image.shape)}, {tuple(target.shape)}")
    # at least float32: 16-bit moments would lose the small variances LNCC divides by
    dtype = torch.promote_types(torch.promote_types(image.dtype, target.dtype), torch.float32)
    if mask is not None:
        if mask.shape[0] != image.shape[0] or tuple(mask.shape[2:]) != tuple(image.shape[2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match the images {tuple(image.shape)}")
        mask = mask.to(dtype).contiguous()
    return image.to(dtype).contiguous(), target.to(dtype).contiguous(), mask


class WindowedLNCCLoss(torch.autograd.Function):
    """``1 - masked_mean(lncc)`` (or of ``lncc^2``) with fused Triton passes, forward and backward."""

    @staticmethod
    def forward(ctx, image, target, mask, squared: bool):
        i, j, mask = _prepare(image, target, mask)
        batch = i.shape[0]
        sums = torch.zeros(batch, dtype=i.dtype, device=i.device)
        _blurred_moments(i, j, mask, last_epilogue=LOSS_SUMS, last_dst=sums, squared=squared)
        if mask is None:
            counts = torch.full((batch,), i[0, 0].numel(), dtype=i.dtype, device=i.device)
        else:
            counts = (mask != 0).flatten(1).sum(1).clamp_min(1).to(i.dtype)
        ctx.save_for_backward(i, j, mask, counts)
        ctx.squared = squared
        ctx.dtypes = (image.dtype, target.dtype)
        return 1 - (sums / counts).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        i, j, mask, counts = ctx.saved_tensors
        need_i, need_j = ctx.needs_input_grad[:2]
        batch, shape = i.shape[0], tuple(i.shape[2:])
        scale = (-grad_loss / (counts * batch)).to(i.dtype).contiguous()  # dL / d(sample's sum)
        # one image's gradient needs three moment gradients; LNCC is symmetric in its images
        channels = 5 if need_i and need_j else 3
        images = (j, i) if need_j and not need_i else (i, j)
        common = dict(images=images, squared=ctx.squared)
        grads = _blurred_moments(*images, mask, last_epilogue=MOMENT_GRADS, scale=scale, channels=channels,
                                 squared=ctx.squared)
        spare = torch.empty_like(grads)
        _launch(shape, batch, src=grads, dst=spare, axis=0, channels=channels, **common)
        _launch(shape, batch, src=spare, dst=grads, axis=1, channels=channels, **common)
        del spare
        first_grad = torch.empty_like(i)
        second_grad = torch.empty_like(j) if channels == 5 else None
        _launch(shape, batch, src=grads, dst=first_grad, dst2=second_grad, axis=2, epilogue=INPUT_GRADS,
                channels=channels, **common)
        grad_i, grad_j = (first_grad, second_grad) if images[0] is i else (None, first_grad)
        return (grad_i.to(ctx.dtypes[0]) if need_i else None,
                grad_j.to(ctx.dtypes[1]) if need_j else None, None, None)


def lncc_loss(image, target, mask=None):
    """Triton version of :func:`mgr_engine.losses.lncc_loss` (1 - LNCC)."""
    return WindowedLNCCLoss.apply(image, target, mask, False)


def lncc2_loss(image, target, mask=None):
    """Triton version of :func:`mgr_engine.losses.lncc2_loss` (1 - LNCC^2)."""
    return WindowedLNCCLoss.apply(image, target, mask, True)
