"""Fused windowed LNCC and LNCC^2 losses (Triton).

Semantics of :func:`mgr_engine.losses.lncc_loss` / ``lncc2_loss``: the five local
moments (I, J, I^2, J^2, IJ) under a separable 21-tap Gaussian window (sigma 5, zero
padding), the LNCC map from them, and its (masked) mean, as ``1 - mean``.

Three separable passes, one per axis; every pass carries all five moments:

forward:  (I, J) --D--> m1 --H--> m2 --W + epilogue--> per-sample sums of lncc (or lncc^2)
backward: (I, J) --D--> m1 --H--> m2 --W + epilogue--> g (the five dL/d(blurred moment))
          g --W--> g1 --H--> g2 --D + epilogue--> dL/dI, dL/dJ

The first pass forms the moments from I and J on the fly, and the last pass of each
chain consumes the blurred moments in registers: neither the five moment volumes nor
the five blurred volumes are stored. The first chain runs slab by slab (``SLABS`` slabs
of whole D slices) through two buffers of one slab: its D pass reads the images' slices
beyond the slab (the images are whole), its H and W passes stay within the slab's slices,
so no slab needs another's result. Only g, which the D pass of the second chain mixes
across slices, is a whole buffer; its H and W passes run in place slab by slab through a
third slab buffer. So the forward keeps 2 volumes of scratch at ``SLABS`` 5, and the
backward at most g (3 volumes, 5 with both gradients) and either the slab buffers or the
gradients: 5 volumes (7 with both gradients), where a whole D-blurred moment buffer took 6
and separate buffers for each pass' output 10. The Gaussian is symmetric and zero-padded,
so the backward blur is the same blur. Where only one image needs a gradient (the moving
image, in registration), g carries the three moment gradients it depends on (those of
E[I], E[I^2], E[IJ]); LNCC is symmetric in I and J, so a gradient for J alone runs the
same chain with the images swapped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgr_engine.losses import LNCC_SIGMA, LNCC_TAPS, gaussian_kernel1d

BLOCK = 256
# the first chain, and the H and W passes of the second, run in this many slabs of whole D
# slices: their scratch is a slab's
SLABS = 5
W_AXIS, H_AXIS, D_AXIS = 0, 1, 2
# what the last pass of a chain does with the five blurred moments
STORE, LOSS_SUMS, MOMENT_GRADS, INPUT_GRADS = 0, 1, 2, 3


@triton.jit(do_not_specialize=["first"])
def blur_axis_kernel(src_ptr, i_ptr, j_ptr, dst_ptr, dst2_ptr, taps_ptr, mask_ptr, scale_ptr,
                     first, count, size, stride, volume, src_channel_stride, src_sample_stride,
                     dst_channel_stride, dst_sample_stride,
                     FROM_IMAGES: tl.constexpr, EPILOGUE: tl.constexpr, SQUARED: tl.constexpr,
                     HAS_MASK: tl.constexpr, CHANNELS: tl.constexpr, ACC: tl.constexpr, TAPS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Blur five (or three) channels along one axis (``stride``/``size``) over ``count`` voxels
    of each sample (a volume, or a slab of whole D slices from voxel ``first`` on), then apply
    ``EPILOGUE``.

    Sources: the five moments formed from images ``i_ptr``/``j_ptr`` (FROM_IMAGES), or a
    buffer ``src_ptr`` (channels and samples at their strides): five moments for LOSS_SUMS
    and MOMENT_GRADS, else CHANNELS moment gradients. Epilogues: STORE to ``dst_ptr``
    (strided likewise); LOSS_SUMS adds each sample's sum of lncc (or lncc^2) inside the mask
    to ``dst_ptr[b]``; MOMENT_GRADS stores dL/d(blurred moments) given ``scale_ptr[b]`` =
    dL/d(sample's sum), all five or (CHANNELS 3) those of E[I], E[I^2] and E[IJ];
    INPUT_GRADS turns blurred moment gradients into dL/dI (``dst_ptr``) and, from five,
    dL/dJ (``dst2_ptr``). Image-shaped tensors (images, mask, INPUT_GRADS' outputs) hold
    ``volume`` voxels a sample; every pointer points at the launch's first voxel, so the D
    pass of a slab reads the images before and after it at negative and past-the-end offsets.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < count
    pos = ((first + offs) // stride) % size  # along the axis, in the whole volume
    half = TAPS // 2
    img_i = i_ptr + b * volume
    img_j = j_ptr + b * volume
    # the source's channels: five moments, or (STORE, INPUT_GRADS) CHANNELS moment gradients
    src_channels = 5
    if CHANNELS == 3:
        if EPILOGUE == 0 or EPILOGUE == 3:
            src_channels = 3
    src = src_ptr + b * src_sample_stride
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
            m1 += weight * tl.load(src + src_channel_stride + at, mask=valid, other=0.0).to(ACC)
            m2 += weight * tl.load(src + 2 * src_channel_stride + at, mask=valid, other=0.0).to(ACC)
            if src_channels == 5:
                m3 += weight * tl.load(src + 3 * src_channel_stride + at, mask=valid, other=0.0).to(ACC)
                m4 += weight * tl.load(src + 4 * src_channel_stride + at, mask=valid, other=0.0).to(ACC)

    dst = dst_ptr + b * dst_sample_stride
    if EPILOGUE == 0:  # STORE
        tl.store(dst + offs, m0, mask=m)
        tl.store(dst + dst_channel_stride + offs, m1, mask=m)
        tl.store(dst + 2 * dst_channel_stride + offs, m2, mask=m)
        if CHANNELS == 5:
            tl.store(dst + 3 * dst_channel_stride + offs, m3, mask=m)
            tl.store(dst + 4 * dst_channel_stride + offs, m4, mask=m)
    elif EPILOGUE == 3:  # INPUT_GRADS
        vi = tl.load(img_i + offs, mask=m, other=0.0).to(ACC)
        vj = tl.load(img_j + offs, mask=m, other=0.0).to(ACC)
        if CHANNELS == 5:  # m0..m4: the blurred gradients of E[I], E[J], E[I^2], E[J^2], E[IJ]
            tl.store(dst_ptr + b * volume + offs, m0 + 2.0 * vi * m2 + vj * m4, mask=m)
            tl.store(dst2_ptr + b * volume + offs, m1 + 2.0 * vj * m3 + vi * m4, mask=m)
        else:  # m0..m2: the blurred gradients of E[I], E[I^2], E[IJ]
            tl.store(dst_ptr + b * volume + offs, m0 + 2.0 * vi * m1 + vj * m2, mask=m)
    else:
        # m0..m4 = E[I], E[J], E[I^2], E[J^2], E[IJ] under the window
        raw_i = m2 - m0 * m0
        raw_j = m3 - m1 * m1
        var_i = tl.maximum(raw_i, 0.0) + 1e-5
        var_j = tl.maximum(raw_j, 0.0) + 1e-5
        rsq = 1.0 / tl.sqrt(var_i * var_j)
        lncc = (m4 - m0 * m1) * rsq
        if HAS_MASK:
            inside = tl.load(mask_ptr + b * volume + offs, mask=m, other=0.0) != 0
        else:
            inside = m
        inside = inside & m
        if EPILOGUE == 1:  # LOSS_SUMS
            value = lncc * lncc if SQUARED else lncc
            # relaxed: nothing reads the sums before the kernel ends (acq_rel, the default, fences each add)
            tl.atomic_add(dst_ptr + b, tl.sum(tl.where(inside, value, 0.0), axis=0), sem="relaxed")
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
                tl.store(dst + dst_channel_stride + offs, -g_cov * m0 - 2.0 * m1 * g_sjj, mask=m)
                tl.store(dst + 2 * dst_channel_stride + offs, g_sii, mask=m)
                tl.store(dst + 3 * dst_channel_stride + offs, g_sjj, mask=m)
                tl.store(dst + 4 * dst_channel_stride + offs, g_cov, mask=m)
            else:  # what dL/dI needs: the gradients of E[I], E[I^2], E[IJ]
                tl.store(dst + offs, -g_cov * m1 - 2.0 * m0 * g_sii, mask=m)
                tl.store(dst + dst_channel_stride + offs, g_sii, mask=m)
                tl.store(dst + 2 * dst_channel_stride + offs, g_cov, mask=m)


def _passes(shape):
    """(size, stride) of the W, H and D axes of a (D, H, W) volume (W_AXIS, H_AXIS, D_AXIS)."""
    d, h, w = shape
    return [(w, 1), (h, w), (d, h * w)]


def _launch(shape, axis, *, images, src, dst, count, first=0, dst2=None, mask=None, scale=None,
            from_images=False, epilogue=STORE, squared=False, channels=5):
    """One blur pass over ``count`` voxels a sample from voxel ``first`` on. ``images`` and
    ``mask``: (B, volume - first) views starting at the pass' first voxel; ``src``/``dst``:
    (B, channels, voxels) views likewise (their strides passed on), or an image-shaped output
    (INPUT_GRADS), or the sums (LOSS_SUMS)."""
    i, j = images
    size, stride = _passes(shape)[axis]
    batch, volume = i.shape[0], shape[0] * shape[1] * shape[2]
    acc = tl.float64 if i.dtype == torch.float64 else tl.float32
    taps = gaussian_kernel1d(LNCC_TAPS, LNCC_SIGMA, i.dtype, i.device)
    src_strides = (src.stride(1), src.stride(0)) if src is not None else (0, 0)
    dst_strides = (dst.stride(1), dst.stride(0)) if dst.dim() == 3 else (0, 0)
    blur_axis_kernel[(triton.cdiv(count, BLOCK), batch)](
        src if src is not None else i, i, j, dst, dst2 if dst2 is not None else dst, taps,
        mask if mask is not None else i, scale if scale is not None else taps, first, count, size, stride, volume,
        *src_strides, *dst_strides,
        FROM_IMAGES=from_images, EPILOGUE=epilogue, SQUARED=squared, HAS_MASK=mask is not None, CHANNELS=channels,
        ACC=acc, TAPS=LNCC_TAPS, BLOCK=BLOCK)


def _slabs(shape):
    """(start, stop) voxel ranges of ``SLABS`` slabs of whole D slices of a (D, H, W) volume."""
    depth, plane = shape[0], shape[1] * shape[2]
    slices = -(-depth // SLABS)
    return [(first * plane, min(first + slices, depth) * plane) for first in range(0, depth, slices)]


def _slab_buffer(like, channels, slabs):
    """An empty (B, ``channels``, voxels of the longest of ``slabs``) buffer of ``like``'s batch,
    type and device: one slab's scratch."""
    longest = max(stop - start for start, stop in slabs)
    return torch.empty((like.shape[0], channels, longest), dtype=like.dtype, device=like.device)


def _flat(volume):
    """A (B, 1, D, H, W) tensor as (B, D * H * W); None stays None."""
    return None if volume is None else volume.view(volume.shape[0], -1)


def _moment_chain(i, j, mask, *, epilogue, squared, sums=None, grads=None, scale=None, channels=5):
    """The first chain, slab by slab: a slab's moments blurred along D into one slab buffer, then
    along H into another, then along W with ``epilogue``: LOSS_SUMS into ``sums``, or
    MOMENT_GRADS into the slab's part of ``grads`` (B, ``channels``, volume)."""
    shape = tuple(i.shape[2:])
    slabs = _slabs(shape)
    along_d, along_dh = _slab_buffer(i, 5, slabs), _slab_buffer(i, 5, slabs)
    flat_i, flat_j, flat_mask = _flat(i), _flat(j), _flat(mask)
    for start, stop in slabs:
        count, images = stop - start, (flat_i[:, start:], flat_j[:, start:])
        _launch(shape, D_AXIS, images=images, src=None, dst=along_d[:, :, :count], count=count, first=start,
                from_images=True)
        _launch(shape, H_AXIS, images=images, src=along_d[:, :, :count], dst=along_dh[:, :, :count], count=count,
                first=start)
        _launch(shape, W_AXIS, images=images, src=along_dh[:, :, :count],
                dst=sums if epilogue == LOSS_SUMS else grads[:, :, start:stop], count=count, first=start,
                mask=None if mask is None else flat_mask[:, start:], scale=scale, epilogue=epilogue,
                squared=squared, channels=channels)


def _blur_within_slices(grads, images, shape):
    """The W and H passes of the moment gradients ``grads`` (B, channels, volume), in place,
    slab by slab through one slab's scratch."""
    channels = grads.shape[1]
    slabs = _slabs(shape)
    scratch = _slab_buffer(grads, channels, slabs)
    flat_i, flat_j = (_flat(image) for image in images)
    for start, stop in slabs:
        part, slab_images = scratch[:, :, :stop - start], (flat_i[:, start:], flat_j[:, start:])
        _launch(shape, W_AXIS, images=slab_images, src=grads[:, :, start:stop], dst=part, count=stop - start,
                first=start, channels=channels)
        _launch(shape, H_AXIS, images=slab_images, src=part, dst=grads[:, :, start:stop], count=stop - start,
                first=start, channels=channels)


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
        _moment_chain(i, j, mask, epilogue=LOSS_SUMS, sums=sums, squared=squared)
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
        grads = torch.empty((batch, channels, i[0, 0].numel()), dtype=i.dtype, device=i.device)
        _moment_chain(*images, mask, epilogue=MOMENT_GRADS, grads=grads, scale=scale, channels=channels,
                      squared=ctx.squared)
        _blur_within_slices(grads, images, shape)
        first_grad = torch.empty_like(i)
        second_grad = torch.empty_like(j) if channels == 5 else None
        _launch(shape, D_AXIS, images=images, src=grads, dst=first_grad, dst2=second_grad, count=i[0, 0].numel(),
                epilogue=INPUT_GRADS, channels=channels)
        grad_i, grad_j = (first_grad, second_grad) if images[0] is i else (None, first_grad)
        return (grad_i.to(ctx.dtypes[0]) if need_i else None,
                grad_j.to(ctx.dtypes[1]) if need_j else None, None, None)


def lncc_loss(image, target, mask=None):
    """Triton version of :func:`mgr_engine.losses.lncc_loss` (1 - LNCC)."""
    return WindowedLNCCLoss.apply(image, target, mask, False)


def lncc2_loss(image, target, mask=None):
    """Triton version of :func:`mgr_engine.losses.lncc2_loss` (1 - LNCC^2)."""
    return WindowedLNCCLoss.apply(image, target, mask, True)
