"""Fused trilinear warp: sample an image at a map in [0, 1] coordinates (Triton).

Semantics of :func:`mgr_engine.ops.warp` (``grid_sample``, ``align_corners=True``):
a map value ``c`` on an axis of ``n`` voxels lands on voxel ``c * (n - 1)``; with
``zeros`` padding the corners outside the volume contribute 0, with ``border``
padding the coordinate is clamped into the volume first. The kernel reads each
map voxel once and writes every channel of the output, instead of ``grid_sample``'s
channel-reversed, permuted copy of the map plus the sampling pass.

With ``ADD_COORDS`` the kernel returns ``coords + sample`` (map composition, see
:mod:`kernels.compose`), saving a pass over the map.

Backward: the image gradient is scattered with atomic adds (float32, relaxed: nothing reads
it before the kernel ends, and Triton's default acquire-release order fences every add), the
map gradient is computed in the same pass from the eight corners. Indices within a volume are
32-bit (8 per map point: 64-bit products cost), so a volume holds fewer than 2^31 voxels.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from mgr_engine.errors import InvalidImageError

# map points per program: 128 gave the fastest forward+backward of 128, 256 and 512 on an H200,
# and again of 64, 128 and 256 with relaxed atomics (benchmarks/RESULTS.md, thirty-fifth session)
BLOCK = 128
# warps (of 32 threads) per program, Triton's default: 2 and 8 were no faster on an H200 (thirty-sixth session)
NUM_WARPS = 4


@triton.jit
def _axis_setup(c, size, BORDER: tl.constexpr):
    """Continuous voxel index of map value ``c`` on an axis of ``size`` voxels, as grid_sample
    computes it; with BORDER the index is clamped and ``inside`` says where it was not."""
    g = c * 2.0 - 1.0
    x = ((g + 1.0) * 0.5) * (size - 1)
    inside = (x > 0.0) & (x < size - 1)
    if BORDER:
        x = tl.minimum(tl.maximum(x, 0.0), (size - 1) * 1.0)
    x0f = tl.floor(x)
    frac = x - x0f
    x0 = x0f.to(tl.int32)
    return x0, frac, inside


@triton.jit
def _axis_corners(c, size, stride, BORDER: tl.constexpr):
    """One axis of the interpolation: the lower and upper neighbours' offsets (index times
    ``stride``), their weights and whether each lies in the volume, and ``inside`` (see
    :func:`_axis_setup`). Computed once per axis; the eight corners combine them."""
    x0, frac, inside = _axis_setup(c, size, BORDER)
    lower = x0 * stride
    return (lower, lower + stride, 1.0 - frac, frac,
            (x0 >= 0) & (x0 < size), (x0 >= -1) & (x0 < size - 1), inside)


@triton.jit
def _load_map(coords_ptr, b, offs, n_out, m):
    """The three coordinates of sample ``b`` at output voxels ``offs``."""
    base = coords_ptr + b * 3 * n_out
    ci = tl.load(base + offs, mask=m, other=0.0)
    cj = tl.load(base + n_out + offs, mask=m, other=0.0)
    ck = tl.load(base + 2 * n_out + offs, mask=m, other=0.0)
    return ci, cj, ck


@triton.jit
def _corner_rows(i_lo, i_hi, j_lo, j_hi, ok_i_lo, ok_i_hi, ok_j_lo, ok_j_hi, m):
    """The four (D, H) corner rows (offsets of their first W-neighbour, then whether each lies in
    the volume), shared by both W-neighbours and every channel."""
    return (i_lo + j_lo, i_lo + j_hi, i_hi + j_lo, i_hi + j_hi,
            m & ok_i_lo & ok_j_lo, m & ok_i_lo & ok_j_hi, m & ok_i_hi & ok_j_lo, m & ok_i_hi & ok_j_hi)


@triton.jit
def _row_pair(row_ptr, row_ok, k_lo, k_hi, ok_k_lo, ok_k_hi):
    """The two W-neighbours of one (D, H) corner row, 0 outside the volume."""
    lower = tl.load(row_ptr + k_lo, mask=row_ok & ok_k_lo, other=0.0)
    upper = tl.load(row_ptr + k_hi, mask=row_ok & ok_k_hi, other=0.0)
    return lower, upper


# The sizes are not specialized: Triton would compile a variant for each combination of their
# divisibility by 16, so volumes of other sizes (a registration's half-resolution level, a new
# image's grid) would each compile anew on their first call.
@triton.jit(do_not_specialize=["D", "H", "W", "n_out"])
def warp_fwd_kernel(img_ptr, coords_ptr, out_ptr, C, D, H, W, n_out,
                    ZERO_PAD: tl.constexpr, ADD_COORDS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_out
    ci, cj, ck = _load_map(coords_ptr, b, offs, n_out, m)
    i_lo, i_hi, wi_lo, wi_hi, ok_i_lo, ok_i_hi, _ = _axis_corners(ci, D, H * W, not ZERO_PAD)
    j_lo, j_hi, wj_lo, wj_hi, ok_j_lo, ok_j_hi, _ = _axis_corners(cj, H, W, not ZERO_PAD)
    k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, _ = _axis_corners(ck, W, 1, not ZERO_PAD)
    row00, row01, row10, row11, ok00, ok01, ok10, ok11 = _corner_rows(i_lo, i_hi, j_lo, j_hi, ok_i_lo, ok_i_hi,
                                                                      ok_j_lo, ok_j_hi, m)
    w00, w01, w10, w11 = wi_lo * wj_lo, wi_lo * wj_hi, wi_hi * wj_lo, wi_hi * wj_hi
    for c in range(C):
        base = img_ptr + (b * C + c) * D * H * W
        lo, hi = _row_pair(base + row00, ok00, k_lo, k_hi, ok_k_lo, ok_k_hi)
        acc = w00 * (lo * wk_lo + hi * wk_hi)
        lo, hi = _row_pair(base + row01, ok01, k_lo, k_hi, ok_k_lo, ok_k_hi)
        acc += w01 * (lo * wk_lo + hi * wk_hi)
        lo, hi = _row_pair(base + row10, ok10, k_lo, k_hi, ok_k_lo, ok_k_hi)
        acc += w10 * (lo * wk_lo + hi * wk_hi)
        lo, hi = _row_pair(base + row11, ok11, k_lo, k_hi, ok_k_lo, ok_k_hi)
        acc += w11 * (lo * wk_lo + hi * wk_hi)
        if ADD_COORDS:  # channel c's coordinate, held since the start, not loaded again (C == 3)
            acc += tl.where(c == 0, ci, tl.where(c == 1, cj, ck))
        tl.store(out_ptr + (b * C + c) * n_out + offs, acc, mask=m)


@triton.jit
def _row_backward(img_base, grad_img_base, row, row_ok, wi, wj, si, sj, go, k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi,
                  NEED_IMG_GRAD: tl.constexpr):
    """One (D, H) corner row of the backward pass: its contributions to the map gradient's three
    components (``si``/``sj``: +1 for the upper neighbour of an axis, -1 for the lower), and,
    with NEED_IMG_GRAD, the image gradient scattered to its two W-neighbours."""
    lo, hi = _row_pair(img_base + row, row_ok, k_lo, k_hi, ok_k_lo, ok_k_hi)
    along_w = lo * wk_lo + hi * wk_hi
    gi = go * (si * wj) * along_w
    gj = go * (wi * sj) * along_w
    gk = go * (wi * wj) * (hi - lo)
    if NEED_IMG_GRAD:
        weight = go * (wi * wj)
        ptr = grad_img_base + row
        element = grad_img_base.dtype.element_ty
        tl.atomic_add(ptr + k_lo, (weight * wk_lo).to(element), mask=row_ok & ok_k_lo, sem="relaxed")
        tl.atomic_add(ptr + k_hi, (weight * wk_hi).to(element), mask=row_ok & ok_k_hi, sem="relaxed")
    return gi, gj, gk


@triton.jit(do_not_specialize=["D", "H", "W", "n_out"])
def warp_bwd_kernel(img_ptr, coords_ptr, grad_out_ptr, grad_img_ptr, grad_coords_ptr, C, D, H, W, n_out,
                    ZERO_PAD: tl.constexpr, ADD_COORDS: tl.constexpr, NEED_IMG_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_out
    gbase = grad_coords_ptr + b * 3 * n_out
    ci, cj, ck = _load_map(coords_ptr, b, offs, n_out, m)
    i_lo, i_hi, wi_lo, wi_hi, ok_i_lo, ok_i_hi, in_i = _axis_corners(ci, D, H * W, not ZERO_PAD)
    j_lo, j_hi, wj_lo, wj_hi, ok_j_lo, ok_j_hi, in_j = _axis_corners(cj, H, W, not ZERO_PAD)
    k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, in_k = _axis_corners(ck, W, 1, not ZERO_PAD)
    row00, row01, row10, row11, ok00, ok01, ok10, ok11 = _corner_rows(i_lo, i_hi, j_lo, j_hi, ok_i_lo, ok_i_hi,
                                                                      ok_j_lo, ok_j_hi, m)
    gi = tl.zeros_like(wi_lo)
    gj = tl.zeros_like(wi_lo)
    gk = tl.zeros_like(wi_lo)
    # with ADD_COORDS, the output gradient's three channels, kept from the loop for the identity term
    go_i = tl.zeros_like(wi_lo)
    go_j = tl.zeros_like(wi_lo)
    go_k = tl.zeros_like(wi_lo)
    for c in range(C):
        base = img_ptr + (b * C + c) * D * H * W
        grad_base = grad_img_ptr + (b * C + c) * D * H * W
        go = tl.load(grad_out_ptr + (b * C + c) * n_out + offs, mask=m, other=0.0)
        if ADD_COORDS:
            go_i = tl.where(c == 0, go, go_i)
            go_j = tl.where(c == 1, go, go_j)
            go_k = tl.where(c == 2, go, go_k)
        di, dj, dk = _row_backward(base, grad_base, row00, ok00, wi_lo, wj_lo, -1.0, -1.0, go,
                                   k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, NEED_IMG_GRAD)
        gi, gj, gk = gi + di, gj + dj, gk + dk
        di, dj, dk = _row_backward(base, grad_base, row01, ok01, wi_lo, wj_hi, -1.0, 1.0, go,
                                   k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, NEED_IMG_GRAD)
        gi, gj, gk = gi + di, gj + dj, gk + dk
        di, dj, dk = _row_backward(base, grad_base, row10, ok10, wi_hi, wj_lo, 1.0, -1.0, go,
                                   k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, NEED_IMG_GRAD)
        gi, gj, gk = gi + di, gj + dj, gk + dk
        di, dj, dk = _row_backward(base, grad_base, row11, ok11, wi_hi, wj_hi, 1.0, 1.0, go,
                                   k_lo, k_hi, wk_lo, wk_hi, ok_k_lo, ok_k_hi, NEED_IMG_GRAD)
        gi, gj, gk = gi + di, gj + dj, gk + dk
    # chain rule through the index c -> ((2c - 1 + 1) / 2)(n - 1); a clamped (border) index has no gradient
    gi = gi * (D - 1)
    gj = gj * (H - 1)
    gk = gk * (W - 1)
    if not ZERO_PAD:
        gi = tl.where(in_i, gi, 0.0)
        gj = tl.where(in_j, gj, 0.0)
        gk = tl.where(in_k, gk, 0.0)
    if ADD_COORDS:  # d(coords + sample)/d coords has the identity too (C == 3)
        gi += go_i
        gj += go_j
        gk += go_k
    tl.store(gbase + offs, gi, mask=m)
    tl.store(gbase + n_out + offs, gj, mask=m)
    tl.store(gbase + 2 * n_out + offs, gk, mask=m)


def _prepare(image: torch.Tensor, coords: torch.Tensor):
    if image.dim() != 5 or coords.dim() != 5 or coords.shape[1] != 3:
        raise ValueError(f"expected image (B, C, D, H, W) and coords (B, 3, ...), got {tuple(image.shape)}, {tuple(coords.shape)}")
    batch = image.shape[0]
    if coords.shape[0] not in (1, batch):
        raise ValueError(f"coords batch {coords.shape[0]} does not match image batch {batch}")
    if math.prod(image.shape[2:]) >= 2**31 or math.prod(coords.shape[2:]) >= 2**31:
        raise InvalidImageError(f"volumes of 2^31 voxels or more are beyond the warp kernel's 32-bit indices "
                                f"(image {tuple(image.shape)}, coords {tuple(coords.shape)}): run PyTorch's ops "
                                "for them (MGR_ENGINE_KERNELS=torch, or mgr_engine.ops.kernel_mode('torch'))")
    # Both in the wider type, at least float32, as grid_sample under autocast promotes: a map
    # cast to an autocast U-Net's bfloat16 would be a third of a voxel off at 175^3.
    dtype = torch.promote_types(torch.promote_types(image.dtype, coords.dtype), torch.float32)
    coords = coords.expand(batch, *coords.shape[1:]).to(dtype).contiguous()
    return image.to(dtype).contiguous(), coords


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split(".")[:2])


def interpreter_problem(interpreted: bool, triton_version: str, numpy_version: str) -> str | None:
    """Why these kernels cannot run, or None. Triton's interpreter before 3.7 reads their channel
    count (a loop bound) with ``int()`` of a 1-element array, an error since NumPy 2.4, raised
    from inside Triton as a TypeError that names neither. Compiled kernels are unaffected."""
    if interpreted and _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run the warp kernels with "
                f"NumPy {numpy_version}: install triton>=3.7 or numpy<2.4, or run them compiled on a GPU")
    return None


# Read when the kernels are decorated, as Triton reads TRITON_INTERPRET.
INTERPRETER_PROBLEM = interpreter_problem(os.environ.get("TRITON_INTERPRET") == "1", triton.__version__, np.__version__)


def warp_forward(image, coords, zero_pad: bool, add_coords: bool):
    if INTERPRETER_PROBLEM:
        raise RuntimeError(INTERPRETER_PROBLEM)
    image, coords = _prepare(image, coords)
    batch, channels, d, h, w = image.shape
    n_out = coords[0, 0].numel()
    out = torch.empty((batch, channels, *coords.shape[2:]), dtype=image.dtype, device=image.device)
    grid = (triton.cdiv(n_out, BLOCK), batch)
    warp_fwd_kernel[grid](image, coords, out, channels, d, h, w, n_out,
                          ZERO_PAD=zero_pad, ADD_COORDS=add_coords, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def warp_backward(image, coords, grad_out, zero_pad: bool, add_coords: bool, need_image_grad: bool):
    coords_batch = coords.shape[0]
    image, coords = _prepare(image, coords)
    batch, channels, d, h, w = image.shape
    n_out = coords[0, 0].numel()
    # atomics accumulate in float32 (float64 for float64 images, for gradcheck)
    accumulate = torch.float64 if image.dtype == torch.float64 else torch.float32
    grad_image = torch.zeros(image.shape, dtype=accumulate, device=image.device) if need_image_grad else image
    grad_coords = torch.empty_like(coords)
    grid = (triton.cdiv(n_out, BLOCK), batch)
    warp_bwd_kernel[grid](image, coords, grad_out.contiguous(), grad_image, grad_coords, channels, d, h, w, n_out,
                          ZERO_PAD=zero_pad, ADD_COORDS=add_coords, NEED_IMG_GRAD=need_image_grad, BLOCK=BLOCK,
                          num_warps=NUM_WARPS)
    if coords_batch == 1 and batch != 1:  # a broadcast map gathers the gradient of every sample
        grad_coords = grad_coords.sum(0, keepdim=True)
    return (grad_image.to(image.dtype) if need_image_grad else None), grad_coords


def _like(grad, tensor):
    """``grad`` in ``tensor``'s dtype (the kernels compute 16-bit inputs in float32); None stays None."""
    return None if grad is None else grad.to(tensor.dtype)


class TrilinearWarp(torch.autograd.Function):
    """``warp(image, coords, padding)`` with a fused Triton forward and backward."""

    @staticmethod
    def forward(ctx, image, coords, padding: str):
        ctx.zero_pad = padding == "zeros"
        ctx.save_for_backward(image, coords)
        return warp_forward(image, coords, ctx.zero_pad, add_coords=False)

    @staticmethod
    def backward(ctx, grad_out):
        image, coords = ctx.saved_tensors
        grad_image, grad_coords = warp_backward(image, coords, grad_out, ctx.zero_pad, False, ctx.needs_input_grad[0])
        return _like(grad_image, image), grad_coords.to(coords.dtype), None


def warp(image: torch.Tensor, coords: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Triton version of :func:`mgr_engine.ops.warp`."""
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', not {padding!r}")
    return TrilinearWarp.apply(image, coords, padding)
