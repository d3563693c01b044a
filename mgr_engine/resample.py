"""The registration's transform evaluated at every voxel of the fixed image, on the engine's device.

:func:`mgr_engine.itk_io.map_to_transform` builds ITK's transform of a network map: fixed
physical point -> network voxel -> plus the map's displacement -> moving physical point.
Resampling the moving image through it with ITK's ``ResampleImageFilter``, or rasterizing it with
``TransformToDisplacementFieldFilter``, evaluates that composite transform point by point on the
host: 0.3 s each at 160x192x160 on a 2-core CPU, more than the whole network on a GPU. Here
the same arithmetic runs in C++ on the CPU (:mod:`mgr_engine.kernels.resample_cpu`) and as
whole-volume tensor operations elsewhere (the PyTorch path below, the reference of the C++ one).

ITK's rules, reproduced: a point is inside an image when its continuous index lies in
``[-0.5, size - 0.5)`` on every axis; linear interpolation then clamps the eight corners into
the image (the half voxel beyond the edge repeats the edge) and interpolates an image in ITK's
order of operations (exact between equal voxels, which an integer image's truncation needs),
nearest neighbour rounds halves up.
Outside the network grid the map adds no displacement; outside the image the value is 0.
Coordinates are computed in float64, as ITK computes them.

Affine maps are ``(3, 4)`` float64 arrays ``[matrix | offset]`` in ITK's (x, y, z) order; a
map ``phi`` is ``(3, D, H, W)`` in [0, 1], channels indexing (D, H, W) (see :mod:`mgr_engine.ops`).

Reference: ITK (:func:`mgr_engine.itk_io.resample`, ``itk.transform_to_displacement_field_filter``,
``itk.displacement_field_jacobian_determinant_filter``);
test: ``tests/test_resample.py``; benchmark: ``benchmarks/bench_resample.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import ops
from .errors import InvalidOptionError

INTERPOLATIONS = ("linear", "nearest")


def check_interpolation(interpolation: str) -> None:
    """Raise :class:`InvalidOptionError` unless ``interpolation`` is one of :data:`INTERPOLATIONS`."""
    if interpolation not in INTERPOLATIONS:
        raise InvalidOptionError(f"unknown interpolation {interpolation!r}: use 'linear' or 'nearest'")


def compose_affines(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The (3, 4) affine ``outer o inner`` (``inner`` applied first)."""
    return np.concatenate([outer[:, :3] @ inner[:, :3], (outer[:, :3] @ inner[:, 3] + outer[:, 3])[:, None]], axis=1)


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """The inverse of a (3, 4) affine."""
    inverse = np.linalg.inv(affine[:, :3])
    return np.concatenate([inverse, (-inverse @ affine[:, 3])[:, None]], axis=1)


def resampled_image(phi: torch.Tensor, fixed_to_network, fixed_shape, volume: torch.Tensor, network_to_index,
                    interpolation: str = "linear") -> torch.Tensor:
    """``volume`` (Z, Y, X), an image in moving space, at the moving point of each voxel of the
    (Z, Y, X) ``fixed_shape`` grid: (Z, Y, X) float64 on ``phi``'s device, 0 outside the image.

    ``fixed_to_network``: fixed voxel index -> network voxel; ``network_to_index``: network voxel
    -> ``volume``'s continuous index (through the moving image's physical space)."""
    check_interpolation(interpolation)
    if ops.use_cpp_resample(phi, volume):
        from .kernels import resample_cpu

        volume = volume if volume.dtype in (torch.float32, torch.float64) else volume.double()
        return resample_cpu.resample(phi, fixed_to_network, fixed_shape, volume, network_to_index,
                                     interpolation == "nearest")
    index = _apply_affine(network_to_index, network_points(phi, fixed_to_network, fixed_shape))
    volume = volume.to(phi.device, torch.float64)
    if interpolation == "nearest":
        rounded = [torch.floor(index[axis] + 0.5).long().clamp_(0, volume.shape[2 - axis] - 1) for axis in range(3)]
        values = volume[rounded[2], rounded[1], rounded[0]]
    else:
        values = _interpolate_like_itk(volume, index)
    return torch.where(_inside(index, volume.shape), values, torch.zeros((), dtype=values.dtype, device=values.device))


def displacement_field(phi: torch.Tensor, fixed_to_network, fixed_shape, network_to_physical,
                       fixed_to_physical, out=None) -> torch.Tensor:
    """The transform's displacement at each voxel of the fixed grid in mm, ``moving point - fixed
    point``: (Z, Y, X, 3) float32 (x, y, z) on ``phi``'s device. ``network_to_physical``: network
    voxel -> moving physical point; ``fixed_to_physical``: fixed voxel index -> physical point.
    ``out``: a (Z, Y, X, 3) float32 CPU tensor to write the field into (and return)."""
    if ops.use_cpp_resample(phi):
        from .kernels import resample_cpu

        return resample_cpu.displacement_field(phi, fixed_to_network, fixed_shape, network_to_physical,
                                               fixed_to_physical, out)
    points = network_points(phi, fixed_to_network, fixed_shape)
    moved = _apply_affine(network_to_physical, points) - _affine_grid(fixed_to_physical, fixed_shape, phi.device)
    field = moved.permute(1, 2, 3, 0).float()
    return field if out is None else out.copy_(field)


def half_derivative_weights(spacing) -> np.ndarray:
    """The weights of the central differences along x, y, z, ``0.5 / spacing`` as ITK's filter
    rounds them: float32 (x, y, z)."""
    return np.array([np.float32(1.0 / np.float32(s)) * np.float32(0.5) for s in spacing], dtype=np.float32)


def jacobian_determinant(displacement: torch.Tensor, spacing, direction=None, out=None) -> torch.Tensor:
    """``det(I + du/dx)`` of a (Z, Y, X, 3) displacement field (mm, components x, y, z) with
    ``spacing`` (x, y, z): (Z, Y, X) float32 on the field's device.

    Without ``direction``, as ITK's ``DisplacementFieldJacobianDeterminantFilter`` computes it
    (and so ``unigradicon-jacobian``), operation for operation in float32: central differences
    along the image's index axes weighted by ``0.5 / spacing``, the edge voxel repeated beyond the
    edge, 1 added on the diagonal, vnl_det's expansion; the image's direction is not applied, so
    on an oblique grid this is not the determinant of the transform's Jacobian. With
    ``direction`` (the image's 3x3 direction matrix) the same differences are turned into
    derivatives along the physical axes: the physical Jacobian's determinant (the volume change),
    equal to ITK's on an axis-aligned grid.

    On CPU tensors the C++ kernel computes it (:mod:`mgr_engine.kernels.jacobian_cpu`, the same
    operations); this tensor form is its reference, and the GPU's path. ``out``: a (Z, Y, X)
    float32 CPU tensor to write the result into (and return)."""
    weights = half_derivative_weights(spacing)
    inverse = None if direction is None else np.linalg.inv(np.asarray(direction, dtype=np.float64))
    if ops.use_cpp_jacobian(displacement):
        from .kernels import jacobian_cpu

        return jacobian_cpu.jacobian_determinant(displacement, weights, inverse, out)
    u = displacement.permute(3, 0, 1, 2).float()  # (3, Z, Y, X)

    def derivative(axis: int) -> torch.Tensor:  # of the three components along index axis x, y or z
        dim, n = 3 - axis, u.shape[3 - axis]
        ahead = torch.cat([u.narrow(dim, 1, n - 1), u.narrow(dim, n - 1, 1)], dim)
        behind = torch.cat([u.narrow(dim, 0, 1), u.narrow(dim, 0, n - 1)], dim)
        return float(weights[axis]) * (ahead - behind)

    rows = [derivative(axis) for axis in range(3)]  # rows[j][i] = d u_i / d index_j (in mm)
    if inverse is not None:
        # index_j = sum_k inverse[j, k] * (physical_k - origin_k) / spacing_j, so
        # d u_i / d physical_k = sum_j d u_i / d index_j (mm) * inverse[j, k]
        inverse = inverse.astype(np.float32)
        rows = [rows[0] * float(inverse[0, k]) + rows[1] * float(inverse[1, k]) + rows[2] * float(inverse[2, k])
                for k in range(3)]
    r = [[rows[k][i] + 1 if i == k else rows[k][i] for i in range(3)] for k in range(3)]
    determinant = (r[0][0] * r[1][1] * r[2][2] - r[0][0] * r[2][1] * r[1][2] - r[1][0] * r[0][1] * r[2][2]
                   + r[1][0] * r[2][1] * r[0][2] + r[2][0] * r[0][1] * r[1][2] - r[2][0] * r[1][1] * r[0][2])
    return determinant if out is None else out.copy_(determinant)


# ---------------- the PyTorch path of resampled_image and displacement_field (the GPU's, the C++ reference)


def network_points(phi: torch.Tensor, fixed_to_network, fixed_shape) -> torch.Tensor:
    """Where each voxel of the fixed grid lands on the network grid through the map: (3, Z, Y, X)
    float64 network voxels (x, y, z), ``q + displacement(q)`` with ``q`` the voxel's own network
    position (no displacement where ``q`` is outside the network grid)."""
    grid_zyx = phi.shape[1:]
    q = _affine_grid(fixed_to_network, fixed_shape, phi.device)
    steps = torch.tensor([n - 1 for n in grid_zyx], dtype=torch.float64, device=phi.device).reshape(3, 1, 1, 1)
    displacement = (phi.double() - ops.identity_map(grid_zyx, dtype=torch.float64, device=phi.device)[0]) * steps
    sampled = _sample_linear(displacement, q).flip(0)  # channels (z, y, x) -> (x, y, z)
    return q + sampled * _inside(q, grid_zyx)


def _affine_grid(affine, shape, device) -> torch.Tensor:
    """``affine`` applied to the index of every voxel of a (Z, Y, X) grid: (3, Z, Y, X) float64 (x, y, z)."""
    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=device)[:, :, None, None, None]
    z, y, x = (torch.arange(n, dtype=torch.float64, device=device) for n in shape)
    return affine[:, 3] + affine[:, 0] * x + affine[:, 1] * y[:, None] + affine[:, 2] * z[:, None, None]


def _apply_affine(affine, points: torch.Tensor) -> torch.Tensor:
    """``affine`` applied to (3, ...) points (x, y, z)."""
    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=points.device)
    return torch.einsum("ij,j...->i...", affine[:, :3], points) + affine[:, 3].reshape(3, *([1] * (points.dim() - 1)))


def _inside(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Where (3, ...) continuous indices (x, y, z) lie inside a (Z, Y, X) grid, by ITK's rule."""
    size = torch.tensor(list(reversed(shape_zyx)), dtype=index.dtype, device=index.device)
    size = size.reshape(3, *([1] * (index.dim() - 1)))
    return ((index >= -0.5) & (index < size - 0.5)).all(0)


def _interpolate_like_itk(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``volume`` (Z, Y, X) at (3, ...) continuous indices (x, y, z) as ITK's
    ``LinearInterpolateImageFunction`` computes it: the corners clamped into the volume, then
    interpolated along x, then y, then z, each step as ``a + (b - a) * t``. Between equal voxels
    the value comes out exact, where a weighted sum of the eight corners lands a rounding below
    it as often as not (and an integer image's truncation then takes 1 off)."""
    corners = []
    for axis in range(3):
        n = volume.shape[2 - axis]
        clamped = index[axis].clamp(0, n - 1)
        lower = clamped.floor()
        corners.append((lower.long(), (lower + 1).clamp(max=n - 1).long(), clamped - lower))
    (x0, x1, fx), (y0, y1, fy), (z0, z1, fz) = corners

    def along_x(z, y):
        a = volume[z, y, x0]
        return a + (volume[z, y, x1] - a) * fx

    def along_xy(z):
        a = along_x(z, y0)
        return a + (along_x(z, y1) - a) * fy

    a = along_xy(z0)
    return a + (along_xy(z1) - a) * fz


def _sample_linear(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``volume`` (C, Z, Y, X) at (3, ...) continuous indices (x, y, z): (C, ...) trilinear with
    the corners clamped into the volume."""
    steps = torch.tensor([max(n - 1, 1) for n in volume.shape[1:]], dtype=index.dtype, device=index.device)
    coords = index.flip(0) / steps.reshape(3, *([1] * (index.dim() - 1)))
    return ops.warp(volume[None], coords[None].to(volume.dtype), padding="border")[0]
