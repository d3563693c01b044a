"""Losses of instance optimization: image similarities and the GradICON regularizer.

Similarities take ``(warped_moving, fixed, mask=None)`` tensors (B, 1, D, H, W) and
return a scalar loss; a mask restricts the mean to its nonzero voxels (per sample,
then averaged over samples).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import InvalidOptionError
from .ops import memory_format_of, recomputed_in_backward, use_cpp_blur, use_cpp_mind, use_triton

LNCC_SIGMA = 5
LNCC_TAPS = 4 * LNCC_SIGMA + 1


def gaussian_kernel1d(taps: int = LNCC_TAPS, sigma: float = LNCC_SIGMA, dtype=torch.float32, device=None):
    """Normalized 1-D Gaussian of ``taps`` samples centred on the middle tap; shared between
    calls (read only). Computed on the CPU once per device and type: copying it to a GPU at
    every blur would make the host wait for the GPU's queue several times in each IO step."""
    return _gaussian_kernel1d(int(taps), float(sigma), dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=None)
def _gaussian_kernel1d(taps: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a tensor made in inference mode could not be saved for backward
        half = (taps - 1) * 0.5
        x = torch.linspace(-half, half, steps=taps)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        return (pdf / pdf.sum()).to(device=device, dtype=dtype)


def banded_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix of the 1-D filter ``kernel`` (odd, centred) with zero padding ("same" size):
    row i weighs the input voxels of output voxel i."""
    taps = kernel.numel()
    index = torch.arange(n, device=kernel.device)
    tap = index[None, :] - index[:, None] + taps // 2
    inside = (tap >= 0) & (tap < taps)
    return torch.where(inside, kernel[tap.clamp(0, taps - 1)], torch.zeros((), dtype=kernel.dtype, device=kernel.device))


def separable_filter(volume: torch.Tensor, matrix) -> torch.Tensor:
    """``volume`` (B, C, D, H, W) filtered along each axis by ``matrix(n)``, an (n, n) matrix
    whose row i weighs the input voxels of output voxel i.

    Banded matrix products, not convolutions or pooling: the same sums, but BLAS runs them
    several times faster on the CPU (Gaussian: 0.36 s against 1.98 s of a 21-tap ``conv3d``
    for five 175^3 channels, 2 cores), and the padding lives in the matrix's edge rows.
    """
    b, c, d, h, w = volume.shape
    volume = volume @ matrix(w).T
    volume = matrix(h) @ volume
    return (matrix(d) @ volume.reshape(b, c, d, h * w)).reshape(b, c, d, h, w)


def gaussian_blur(volume: torch.Tensor, taps: int = LNCC_TAPS, sigma: float = LNCC_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W), zero padding ("same" size), the window of
    LNCC: made a depthwise ``conv3d``, it was the slowest part of an IO step on the CPU. In C++
    on CPU tensors where built (:mod:`mgr_engine.kernels.gaussian_blur_cpu`, 3.7x faster)."""
    kernel = gaussian_kernel1d(taps, sigma, dtype=volume.dtype, device=volume.device)
    if use_cpp_blur(volume, kernel):
        from .kernels import gaussian_blur_cpu

        return gaussian_blur_cpu.blur(volume, kernel)
    # Banded matrices, symmetric as the window is: v @ M blurs the last axis of v.
    return separable_filter(volume, lambda n: banded_matrix(n, kernel))


def box_matrix(n: int, radius: int, dtype=torch.float32, device=None):
    """(n, n) matrix of the mean over ``2 radius + 1`` neighbours with the edge voxel repeated
    (replicate padding): row i counts how often each input voxel falls in i's window."""
    window = torch.arange(n, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None, :]
    counts = torch.zeros(n, n, dtype=dtype, device=device)
    counts.scatter_add_(1, window.clamp(0, n - 1), torch.ones(window.shape, dtype=dtype, device=device))
    return counts / (2 * radius + 1)


def target_moments(target: torch.Tensor):
    """The window means of ``target`` and ``target^2`` that :func:`lncc_map` needs of it."""
    return gaussian_blur(torch.cat([target, target * target], dim=1)).chunk(2, dim=1)


def lncc_map(image: torch.Tensor, target: torch.Tensor, moments_of_target=None) -> torch.Tensor:
    """Local normalized cross-correlation under a Gaussian window (sigma 5, 21 taps).

    ``moments_of_target``: :func:`target_moments` of ``target`` where the caller has them
    (IO compares with the same target at every step): three window means to compute, not five.
    """
    if moments_of_target is None:
        moments = gaussian_blur(torch.cat([image, target, image * image, target * target, image * target], dim=1))
        mean_i, mean_j, mean_ii, mean_jj, mean_ij = moments.chunk(5, dim=1)
    else:
        mean_j, mean_jj = moments_of_target
        mean_i, mean_ii, mean_ij = gaussian_blur(torch.cat([image, image * image, image * target], dim=1)).chunk(3, dim=1)
    var_i = torch.relu(mean_ii - mean_i**2) + 1e-5
    var_j = torch.relu(mean_jj - mean_j**2) + 1e-5
    return (mean_ij - mean_i * mean_j) / torch.sqrt(var_i * var_j)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values``; with a mask, the mean over its nonzero voxels per sample, then over samples."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values)
    dims = tuple(range(1, values.dim()))
    counts = included.sum(dims).clamp_min(1)
    # at least float32 (a float16 sum of a volume would overflow), float64 kept
    totals = (values * included).sum(dims, dtype=torch.promote_types(values.dtype, torch.float32))
    return (totals / counts).mean().to(values.dtype)


def lncc_loss(image, target, mask=None, *, moments_of_target=None):
    """1 - LNCC (uniGradICON's similarity: assumes locally positive correlation).
    ``moments_of_target``: see :func:`lncc_map` (the Triton kernel computes its own)."""
    if use_triton(image):
        from .kernels.lncc import lncc_loss as triton_lncc

        return triton_lncc(image, target, mask)
    return 1 - masked_mean(lncc_map(image, target, moments_of_target), mask)


def lncc2_loss(image, target, mask=None, *, moments_of_target=None):
    """1 - LNCC^2 (multiGradICON's similarity: indifferent to the sign of the correlation).
    ``moments_of_target``: see :func:`lncc_map` (the Triton kernel computes its own)."""
    if use_triton(image):
        from .kernels.lncc import lncc2_loss as triton_lncc2

        return triton_lncc2(image, target, mask)
    return 1 - masked_mean(lncc_map(image, target, moments_of_target) ** 2, mask)


# MIND-SSC: the six face neighbours (offsets in voxels, times the dilation) ...
_SIX_NEIGHBOURS = ((-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0))
# ... and the 12 pairs of them that are sqrt(2) apart: the self-similarity context.
_MIND_PAIRS = [
    (a, b)
    for i, a in enumerate(_SIX_NEIGHBOURS)
    for j, b in enumerate(_SIX_NEIGHBOURS)
    if i > j and sum((p - q) ** 2 for p, q in zip(a, b)) == 2
]


def _shifted(padded: torch.Tensor, offset, pad: int, shape) -> torch.Tensor:
    starts = [pad + o for o in offset]
    return padded[:, :, starts[0]: starts[0] + shape[0], starts[1]: starts[1] + shape[1], starts[2]: starts[2] + shape[2]]


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013): 12 channels per voxel.

    Squared differences between the pairs of dilated six-neighbours, averaged
    over a (2 radius + 1)^3 patch (edges replicated), normalized by their
    minimum and mean, then ``exp(-.)``. Channel order is that of ``_MIND_PAIRS``
    (the loss, a mean over channels, does not depend on it). In Triton on CUDA tensors
    (:mod:`mgr_engine.kernels.mind_ssc`), in C++ on CPU tensors where built
    (:mod:`mgr_engine.kernels.mind_ssc_cpu`).
    """
    if use_triton(image) and mind_kernels_take(image):
        from .kernels.mind_ssc import mind_ssc as triton_mind_ssc

        return triton_mind_ssc(image, radius, dilation)
    if use_cpp_mind(image):
        from .kernels import mind_ssc_cpu

        return mind_ssc_cpu.mind_ssc(image, radius, dilation)
    shape = image.shape[2:]
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    diffs = torch.cat(
        [
            _shifted(padded, [o * dilation for o in a], dilation, shape)
            - _shifted(padded, [o * dilation for o in b], dilation, shape)
            for a, b in _MIND_PAIRS
        ],
        dim=1,
    )
    # the patch mean with replicated edges: avg_pool3d of the padded volume, as matrix products
    # (an IO step with MIND-SSC at 175^3 spent a third of its time in avg_pool3d on the CPU)
    ssd = separable_filter(diffs**2, functools.partial(box_matrix, radius=radius, dtype=diffs.dtype, device=diffs.device))
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    return torch.exp(-mind / torch.clamp(variance, *mind_variance_bounds(variance)))


def mind_variance_bounds(variance: torch.Tensor):
    """The bounds (lo, hi) MIND-SSC clamps its local variance into: 1e-3 and 1e3 times its mean
    over the batch, constants (not differentiated). Tensors, not ``.item()``: on a GPU that would
    wait for the queue twice per descriptor."""
    level = variance.mean().detach()
    return level * 0.001, level * 1000


def mind_kernels_take(image: torch.Tensor) -> bool:
    """Whether the MIND-SSC kernels (Triton, C++) compute on ``image``'s shape and dtype: (B, 1, D,
    H, W), float32 or float64; each kernel module checks its device."""
    return image.dim() == 5 and image.shape[1] == 1 and image.dtype in (torch.float32, torch.float64)


def fused_distance_applies(image, target_descriptor, mask=None) -> bool:
    """Whether :func:`mind_distance`'s inputs fit its fused kernels (Triton, C++): an image they
    take (:func:`mind_kernels_take`), a target descriptor of its grid, dtype and device that
    needs no gradient, with one sample or B, and a mask (B or 1, 1, D, H, W) of its grid or none."""
    if not mind_kernels_take(image):
        return False
    batch, grid = image.shape[0], tuple(image.shape[2:])
    if target_descriptor.requires_grad and torch.is_grad_enabled():
        return False
    if (target_descriptor.device != image.device or target_descriptor.dtype != image.dtype
            or target_descriptor.dim() != 5 or target_descriptor.shape[0] not in (1, batch)
            or tuple(target_descriptor.shape[1:]) != (12, *grid)):
        return False
    return mask is None or (mask.device == image.device and mask.dim() == 5 and mask.shape[0] in (1, batch)
                            and mask.shape[1] == 1 and tuple(mask.shape[2:]) == grid)


def mind_distance(image, target_descriptor, mask=None):
    """Mean squared difference between ``image``'s MIND-SSC descriptor and ``target_descriptor``
    (:func:`mind_ssc` of the target). Where the target's descriptor needs no gradient (IO's case),
    one op that keeps neither the difference nor its square: in Triton on CUDA tensors
    (:func:`mgr_engine.kernels.mind_ssc.mind_distance`), in C++ on CPU tensors where built
    (:func:`mgr_engine.kernels.mind_ssc_cpu.mind_distance`)."""
    if fused_distance_applies(image, target_descriptor, mask):
        if use_triton(image):
            from .kernels.mind_ssc import mind_distance as triton_mind_distance

            return triton_mind_distance(image, target_descriptor, mask)
        if use_cpp_mind(image):
            from .kernels import mind_ssc_cpu

            return mind_ssc_cpu.mind_distance(image, target_descriptor, mask)
    return masked_mean((mind_ssc(image) - target_descriptor) ** 2, mask)


def mind_loss(image, target, mask=None):
    """Mean squared difference of MIND-SSC descriptors (radius 2, dilation 2)."""
    return mind_distance(image, mind_ssc(target), mask)


def with_constant_targets(similarity):
    """``similarity`` for a run whose targets do not change (IO's steps compare with the same two
    images): what it computes of the target alone is computed once per target tensor, for as long
    as the returned function lives. MIND-SSC: the target's descriptor (0.7 s at 175^3 on the
    CPU, twice a step); LNCC and LNCC^2 on the PyTorch path: the target's two window means."""
    cached = {}  # id(target) -> (target, what was computed); the target is held, so its id stays its own

    def of_target(compute, target):
        if id(target) not in cached:
            with torch.no_grad():
                cached[id(target)] = (target, compute(target))
        return cached[id(target)][1]

    if similarity is mind_loss:
        return lambda image, target, mask=None: mind_distance(image, of_target(mind_ssc, target), mask)
    if similarity in (lncc_loss, lncc2_loss):
        return lambda image, target, mask=None: similarity(
            image, target, mask, moments_of_target=None if use_triton(image) else of_target(target_moments, target))
    return similarity


SIMILARITIES = {"lncc": lncc_loss, "lncc2": lncc2_loss, "mind": mind_loss}


def similarity_by_name(name: str):
    """The similarity loss called ``name`` (``lncc``, ``lncc2`` or ``mind``, in any case, as
    modalities are)."""
    try:
        return SIMILARITIES[name.lower()]
    except (KeyError, AttributeError):  # AttributeError: not a string
        raise InvalidOptionError(
            f"unknown similarity {name!r}: choose one of {', '.join(SIMILARITIES)}"
        ) from None


def regularizer_points(identity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The jittered grid of the GradICON regularizer: every second voxel of ``identity`` plus
    ``2 randn / n`` (n: the last axis's size).

    With a CPU generator, or none on the CPU, the noise is drawn on the CPU at full size and
    subsampled, as the reference draws it, so a seeded run reproduces its losses; only the eighth
    used travels to the device. Otherwise (no generator on a GPU, or a GPU's generator) only
    that eighth is drawn, on the device: no host work and no host-to-device copy, which
    synchronizes, in each IO step.
    """
    grid = identity[:, :, ::2, ::2, ::2]
    on_device = identity.device.type != "cpu" and (generator is None or generator.device.type != "cpu")
    if on_device:
        noise = torch.randn(grid.shape, generator=generator, device=identity.device, dtype=identity.dtype)
    else:
        noise = torch.randn(identity.shape, generator=generator)[:, :, ::2, ::2, ::2]
        noise = noise.to(identity.device, identity.dtype)
    return grid + 2 * noise / identity.shape[-1]


def gradicon_regularizer(map_ab, map_ba, identity: torch.Tensor, generator: torch.Generator | None = None,
                         delta: float = 0.001, recompute: bool = False) -> torch.Tensor:
    """GradICON's penalty ``|| grad(Phi_AB o Phi_BA) - I ||_F^2`` by finite differences.

    ``map_ab``/``map_ba`` evaluate a map at arbitrary coordinates. The penalty is
    taken at a jittered identity grid (:func:`regularizer_points`): for each axis, the mean
    squared difference quotient (step ``delta``) of the inverse-consistency error
    ``x - Phi_AB(Phi_BA(x))``. ``recompute``: the round trip's intermediate maps are recomputed
    in the backward pass instead of kept (:func:`mgr_engine.ops.recomputed_in_backward`).

    The grid and its three stepped copies make one round trip, each point beside its steps
    (:func:`points_with_steps`): each composition then reads its field once where four round trips
    read it four times (a 175^3 field at the 88^3 points is 64 MiB streamed from memory per read
    on a CPU), and its backward scatters into one field gradient, not four summed.
    """
    def round_trip(points):
        return map_ab(map_ba(points))

    points = points_with_steps(regularizer_points(identity, generator), delta)
    errors = (points - recomputed_in_backward(round_trip, points, recompute=recompute)).unflatten(-1, (-1, 4))
    error = errors[..., 0]
    total = 0.0
    for axis in range(3):
        total = total + torch.mean(((error - errors[..., axis + 1]) / delta) ** 2)
    return total


def points_with_steps(points: torch.Tensor, delta: float) -> torch.Tensor:
    """``points`` (N, 3, D, H, W) and its copies stepped by ``delta`` along each coordinate, as one
    (N, 3, D, H, 4 W) grid in the layout of ``points``: at x index ``4 i + k``, point ``i``
    (``k = 0``) or point ``i`` plus ``delta`` in coordinate ``k - 1``."""
    steps = torch.eye(3, 4, dtype=points.dtype, device=points.device).roll(1, 1) * delta  # (coordinate, k)
    stepped = (points.unsqueeze(-1) + steps.view(1, 3, 1, 1, 1, 4)).flatten(-2)
    return stepped.contiguous(memory_format=memory_format_of(points))
