"""A registration's transform evaluated at every voxel of the fixed image, on the engine's device.

:func:`mgr_engine.itk_io.map_to_transform` builds ITK's transform of a network map: fixed
physical point -> network voxel -> plus the map's displacement -> moving physical point; a
:class:`GridTransform` holds the same three parts as arrays, taken from that transform or from a
transform file of that form (:func:`mgr_engine.itk_io.grid_transform`). Resampling the moving image through it
with ITK's ``ResampleImageFilter``, or rasterizing it with ``TransformToDisplacementFieldFilter``,
evaluates that composite transform point by point on the host: 0.3 s each at 160x192x160 on a
2-core CPU, more than the whole network on a GPU. Here the same arithmetic runs in C++ on the
CPU (:mod:`mgr_engine.kernels.resample_cpu`) and as whole-volume tensor operations elsewhere
(the PyTorch path below, the reference of the C++ one). The functions take numpy arrays
(``mgr-engine warp`` and ``jacobian`` pass ITK's voxel arrays, and then import no torch) or
tensors, and return the caller's kind.

ITK's rules, reproduced: a point is inside an image when its continuous index lies in
``[-0.5, size - 0.5)`` on every axis; linear interpolation then clamps the eight corners into
the image (the half voxel beyond the edge repeats the edge) and interpolates an image in ITK's
order of operations (exact between equal voxels, which an integer image's truncation needs),
nearest neighbour rounds halves up.
Outside the displacement's grid the transform adds no displacement; outside the image the value
is 0. Coordinates are computed in float64, as ITK computes them.

Affine maps are ``(3, 4)`` float64 arrays ``[matrix | offset]`` in ITK's (x, y, z) order; a
map ``phi`` is ``(3, D, H, W)`` in [0, 1], channels indexing (D, H, W) (see :mod:`mgr_engine.ops`);
a displacement is ``(D, H, W, 3)`` float64 in grid voxels, components (x, y, z), as ITK's
displacement field image holds it.

Reference: ITK (:func:`mgr_engine.itk_io.resample`, ``itk.transform_to_displacement_field_filter``,
``itk.displacement_field_jacobian_determinant_filter``);
test: ``tests/test_resample.py``; benchmark: ``benchmarks/bench_resample.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidOptionError
from .kernel_modes import cpp_kernels_allowed

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class GridTransform:
    """A transform of ITK's form ``affine o displacement field o affine``: an input physical
    point -> ``to_grid`` -> grid index q -> ``q + displacement(q)`` (trilinear, none outside the
    grid) -> ``from_grid`` -> output physical point (mm).

    ``displacement``: (D, H, W, 3) float64 numpy array in grid voxels, components (x, y, z);
    ``to_grid`` and ``from_grid``: (3, 4) float64 affines. A registration's transform (fixed point
    -> moving point) is one on the network grid, its displacement :func:`map_displacement` of the
    map."""

    displacement: np.ndarray
    to_grid: np.ndarray
    from_grid: np.ndarray


def map_displacement(phi: np.ndarray, out=None) -> np.ndarray:
    """The displacement of a (3, D, H, W) map in [0, 1] in network voxels, ``(phi - identity) *
    (n - 1)`` per axis in float64: (D, H, W, 3), components (x, y, z); the field of the result's
    ITK transform (:func:`mgr_engine.itk_io.displacement_transform`). ``out``: a (D, H, W, 3)
    float64 array to write it into (and return). In numpy: 70 ms at 175^3, torch's strided
    writes took 110-160 ms."""
    shape = phi.shape[1:]
    out = np.empty((*shape, 3), dtype=np.float64) if out is None else out
    for channel, n in enumerate(shape):
        identity = (np.arange(n, dtype=np.float64) / (n - 1)).reshape([-1 if axis == channel else 1 for axis in range(3)])
        component = out[..., 2 - channel]  # channel 0 indexes D, the z axis
        np.subtract(phi[channel], identity, out=component)  # float32 promoted: float64 arithmetic
        component *= n - 1
    return out


def transformed_points(grid: GridTransform, points: np.ndarray) -> np.ndarray:
    """``grid`` applied to (N, 3) physical points (x, y, z, mm): (N, 3) float64, what ITK's
    ``TransformPoint`` gives point by point through the same transform (the displacement
    interpolated linearly with the corners clamped into its grid, none where the point's grid
    position lies outside the grid by ITK's rule), in numpy: a few hundred landmarks or a
    mesh's vertices at once, without a Python call per point."""
    q = _grid_positions(grid, points)
    size = _grid_size(grid)
    nx, ny = size[:2]
    clamped = np.clip(q, 0, size - 1)
    lower = np.floor(clamped)
    fraction = clamped - lower
    # the corners' offsets in the flattened grid along each axis: gathering rows of a (N, 3) view
    # took a third of the time of indexing the 4-D array with three index arrays
    strides = np.array([1, nx, nx * ny])
    lower_offsets = lower.astype(np.intp) * strides
    upper_offsets = np.minimum(lower.astype(np.intp) + 1, size - 1) * strides
    rows = grid.displacement.reshape(-1, 3)
    sampled = np.zeros_like(q)
    for corner in range(8):
        upper = [(corner >> axis) & 1 for axis in range(3)]  # along x, y, z: the upper corner?
        offset = sum((upper_offsets if upper[axis] else lower_offsets)[:, axis] for axis in range(3))
        weight = np.prod([fraction[:, axis] if upper[axis] else 1 - fraction[:, axis] for axis in range(3)], axis=0)
        sampled += weight[:, None] * rows.take(offset, axis=0)
    moved = q + sampled * _inside_field(q, size)[:, None]
    return moved @ grid.from_grid[:, :3].T + grid.from_grid[:, 3]


def points_outside_field(grid: GridTransform, points: np.ndarray) -> np.ndarray:
    """Which of (N, 3) physical points lie outside ``grid``'s displacement field (ITK's rule: half
    a grid voxel beyond its first and last positions), where :func:`transformed_points`, as ITK's
    ``TransformPoint``, moves them by the affines alone: an (N,) bool array."""
    return ~_inside_field(_grid_positions(grid, points), _grid_size(grid))


def _grid_positions(grid: GridTransform, points: np.ndarray) -> np.ndarray:
    return points @ grid.to_grid[:, :3].T + grid.to_grid[:, 3]  # (x, y, z) in grid voxels


def _grid_size(grid: GridTransform) -> np.ndarray:
    nz, ny, nx = grid.displacement.shape[:3]
    return np.array([nx, ny, nz])


def _inside_field(q: np.ndarray, size: np.ndarray) -> np.ndarray:
    return ((q >= -0.5) & (q < size - 0.5)).all(axis=1)


def _cpp_takes(*arrays) -> bool:
    """Whether the current kernel mode lets a C++ kernel take ``arrays``: numpy arrays, or CPU
    tensors outside any tracer (numpy arrays never load torch)."""
    if not cpp_kernels_allowed():
        return False
    tensors = [a for a in arrays if not isinstance(a, np.ndarray)]
    if not tensors:
        return True
    from . import ops

    return ops.is_eager(*tensors) and all(t.device.type == "cpu" for t in tensors)


def use_cpp_resample(*arrays) -> bool:
    """Whether :func:`resampled_image` and :func:`displacement_field` of ``arrays`` (the
    displacement, the image) run in C++ under the current mode (:mod:`mgr_engine.kernels.resample_cpu`)."""
    from .kernels import resample_cpu

    return _cpp_takes(*arrays) and resample_cpu.supports(*arrays)


def use_cpp_jacobian(*arrays) -> bool:
    """Whether :func:`jacobian_determinant` of ``arrays`` (the displacement; none: a numpy array)
    runs in C++ under the current mode (:mod:`mgr_engine.kernels.jacobian_cpu`)."""
    from .kernels import jacobian_cpu

    return _cpp_takes(*arrays) and jacobian_cpu.available()


def _numpy(array) -> np.ndarray:
    """A numpy array, or a CPU tensor's memory as one."""
    return array if isinstance(array, np.ndarray) else array.detach().numpy()


def _tensor(array):
    """A tensor, or a numpy array's memory as one."""
    import torch

    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array


def _returned(values, like, out):
    """``values`` written into ``out`` where given (and ``out`` returned), else as a numpy array
    where ``like`` is one, else as a tensor: the caller's kind of array."""
    if out is None:
        if isinstance(like, np.ndarray):
            return values if isinstance(values, np.ndarray) else values.cpu().numpy()
        return _tensor(values)
    if isinstance(out, np.ndarray):
        np.copyto(out, values if isinstance(values, np.ndarray) else values.cpu().numpy())
    else:
        out.copy_(_tensor(values))
    return out


def resampled_image(displacement, fixed_to_grid, fixed_shape, volume, grid_to_index, interpolation: str = "linear",
                    out=None, slab_voxels: int = 2**22):
    """``volume`` (Z, Y, X), an image in moving space, at the moving point of each voxel of the
    (Z, Y, X) ``fixed_shape`` grid: (Z, Y, X) of ``volume``'s dtype, 0 outside the image, cast as
    ITK's ``ResampleImageFilter`` casts (an integer type clamped to its range, then truncated
    toward 0).

    ``displacement``: a :class:`GridTransform`'s; ``fixed_to_grid``: fixed voxel index -> grid
    index; ``grid_to_index``: grid index plus displacement -> ``volume``'s continuous index
    (through the moving image's physical space). ``displacement`` and ``volume``: numpy arrays
    (the result one too, computed on the CPU) or tensors on one device (the result a tensor
    there). ``out``: a (Z, Y, X) CPU array or tensor of ``volume``'s dtype to write the result
    into (and return). The PyTorch path goes through slabs of about ``slab_voxels`` fixed voxels
    (see :func:`_slabs`)."""
    check_interpolation(interpolation)
    if use_cpp_resample(displacement, volume):
        from .kernels import resample_cpu

        values = resample_cpu.resample(_numpy(displacement), fixed_to_grid, fixed_shape, _numpy(volume), grid_to_index,
                                       interpolation == "nearest", None if out is None else _numpy(out))
        return out if out is not None else _returned(values, displacement, None)
    import torch

    tensor = _tensor(displacement)
    # the image's torch dtype; None for a numpy uint16 or uint32 image before torch 2.3 (no such dtype)
    dtype = getattr(torch, str(volume.dtype), None) if isinstance(volume, np.ndarray) else volume.dtype
    # moved in its own type, then widened there: 4x fewer bytes over PCIe for an int16 image
    pixels = _tensor(volume if dtype is not None else volume.astype(np.int64)).to(tensor.device).to(torch.float64)
    if dtype is None:
        result = out if out is not None else np.empty(fixed_shape, volume.dtype)
    else:  # out itself where given, on the host: a GPU holds one slab of the result at a time
        result = _tensor(out) if out is not None else torch.empty(fixed_shape, dtype=dtype, device=tensor.device)
    for start, stop in _slabs(fixed_shape, slab_voxels):
        slab_shape = (stop - start, *fixed_shape[1:])
        index = _apply_affine(grid_to_index, grid_points(tensor, fixed_to_grid, slab_shape, start))
        if interpolation == "nearest":
            rounded = [torch.floor(index[axis] + 0.5).long().clamp_(0, pixels.shape[2 - axis] - 1) for axis in range(3)]
            values = pixels[rounded[2], rounded[1], rounded[0]]
        else:
            values = _interpolate_like_itk(pixels, index)
        values = torch.where(_inside(index, pixels.shape), values,
                             torch.zeros((), dtype=values.dtype, device=values.device))
        if dtype is None:  # between the image's values, within its range: truncated toward 0
            result[start:stop] = values.cpu().numpy().astype(volume.dtype)
            continue
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            values.clamp_(info.min, info.max)
        result[start:stop] = values.to(dtype)  # an integer type: truncated toward 0
    return out if out is not None else _returned(result, displacement, None)


def displacement_field(displacement, fixed_to_grid, fixed_shape, grid_to_physical, fixed_to_physical, out=None,
                       first_z: int = 0, slab_voxels: int = 2**22):
    """The transform's displacement at each voxel of the fixed grid in mm, ``moving point - fixed
    point``: (Z, Y, X, 3) float32 (x, y, z), a numpy array where ``displacement`` is one, else a
    tensor on its device. ``grid_to_physical``: grid index plus displacement -> moving physical
    point; ``fixed_to_physical``: fixed voxel index -> physical point. ``out``: a (Z, Y, X, 3)
    float32 CPU array or tensor to write the field into (and return). ``first_z``: the fixed
    slice of the first of the Z slices, for a slab of the field (the whole field's values there,
    bit for bit). The PyTorch path goes through slabs of about ``slab_voxels`` fixed voxels (see
    :func:`_slabs`)."""
    if use_cpp_resample(displacement):
        from .kernels import resample_cpu

        values = resample_cpu.displacement_field(_numpy(displacement), fixed_to_grid, fixed_shape, grid_to_physical,
                                                 fixed_to_physical, None if out is None else _numpy(out), first_z)
        return out if out is not None else _returned(values, displacement, None)
    import torch

    tensor = _tensor(displacement)
    result = (_tensor(out) if out is not None  # as in resampled_image
              else torch.empty((*fixed_shape, 3), dtype=torch.float32, device=tensor.device))
    for start, stop in _slabs(fixed_shape, slab_voxels):
        slab_shape, slab_z = (stop - start, *fixed_shape[1:]), first_z + start
        moved = (_apply_affine(grid_to_physical, grid_points(tensor, fixed_to_grid, slab_shape, slab_z))
                 - _affine_grid(fixed_to_physical, slab_shape, tensor.device, slab_z))
        result[start:stop] = moved.permute(1, 2, 3, 0)  # rounded to float32
    return out if out is not None else _returned(result, displacement, None)


def _slabs(shape, slab_voxels: int):
    """(start, stop) of the slabs of about ``slab_voxels`` voxels (whole slices) of a (Z, Y, X)
    grid, through which the PyTorch paths go to bound their temporaries: the same bits slab by
    slab. :func:`resampled_image` and :func:`displacement_field` compute each voxel on its own,
    in float64 temporaries of about 280 bytes a voxel (21 GiB for a whole 512x512x300 image, 1.1
    GiB for a slab of 4 M voxels)."""
    slices = max(1, slab_voxels // max(1, shape[1] * shape[2]))
    return [(start, min(start + slices, shape[0])) for start in range(0, shape[0], slices)]


def half_derivative_weights(spacing) -> np.ndarray:
    """The weights of the central differences along x, y, z, ``0.5 / spacing`` as ITK's filter
    rounds them: float32 (x, y, z)."""
    return np.array([np.float32(1.0 / np.float32(s)) * np.float32(0.5) for s in spacing], dtype=np.float32)


def jacobian_determinant(displacement, spacing, direction=None, out=None, slab_voxels: int = 2**23):
    """``det(I + du/dx)`` of a (Z, Y, X, 3) displacement field (mm, components x, y, z) with
    ``spacing`` (x, y, z): (Z, Y, X) float32, a numpy array where ``displacement`` is one (computed
    on the CPU), else a tensor on its device.

    Without ``direction``, as ITK's ``DisplacementFieldJacobianDeterminantFilter`` computes it
    (and so ``unigradicon-jacobian``), operation for operation in float32: central differences
    along the image's index axes weighted by ``0.5 / spacing``, the edge voxel repeated beyond the
    edge, 1 added on the diagonal, vnl_det's expansion; the image's direction is not applied, so
    on an oblique grid this is not the determinant of the transform's Jacobian. With
    ``direction`` (the image's 3x3 direction matrix) the same differences are turned into
    derivatives along the physical axes: the physical Jacobian's determinant (the volume change),
    equal to ITK's on an axis-aligned grid.

    On the CPU the C++ kernel computes it (:mod:`mgr_engine.kernels.jacobian_cpu`, the same
    operations); this tensor form is its reference, and the GPU's path. ``out``: a (Z, Y, X)
    float32 CPU array or tensor to write the result into (and return). The tensor form goes
    through slabs of about ``slab_voxels`` voxels (and the slice on either side that the central
    differences read): its temporaries take about 80 bytes a voxel, 6 GiB for a whole
    512x512x300 field."""
    weights = half_derivative_weights(spacing)
    inverse = None if direction is None else np.linalg.inv(np.asarray(direction, dtype=np.float64))
    if use_cpp_jacobian(displacement):
        from .kernels import jacobian_cpu

        values = jacobian_cpu.jacobian_determinant(_numpy(displacement), weights, inverse,
                                                   None if out is None else _numpy(out))
        return out if out is not None else _returned(values, displacement, None)
    import torch

    field = _tensor(displacement)
    nz = field.shape[0]
    # out itself where given, as in resampled_image
    result = _tensor(out) if out is not None else torch.empty(field.shape[:3], dtype=torch.float32, device=field.device)
    for start, stop in _slabs(field.shape[:3], slab_voxels):
        first, end = max(start - 1, 0), min(stop + 1, nz)
        slab = _determinant_of_slab(field[first:end].permute(3, 0, 1, 2).float(), weights, inverse)
        result[start:stop] = slab[start - first:stop - first]
    return out if out is not None else _returned(result, displacement, None)


def jacobian_summary(jacobian: np.ndarray, slab_voxels: int = 2**22):
    """``(min, max, percent of voxels <= 0, standard deviation of the log over the voxels > 0)``
    of a Jacobian determinant's voxels: how much a transform folds (<= 0) and how irregular it is
    elsewhere. In slabs: no whole-volume log at CT size."""
    values = np.asarray(jacobian).ravel()
    low, high, folds = np.inf, -np.inf, 0
    count, mean, squares = 0, 0.0, 0.0  # of the logs: squares = sum of squared deviations from the mean
    for start in range(0, values.size, slab_voxels):
        slab = values[start:start + slab_voxels].astype(np.float64)
        low, high = min(low, slab.min()), max(high, slab.max())
        logs = np.log(slab[slab > 0])
        folds += slab.size - logs.size
        if logs.size:  # the slab's moments merged into the running ones (Chan et al.): no cancellation
            slab_mean = logs.mean()
            delta, merged = slab_mean - mean, count + logs.size
            squares += np.square(logs - slab_mean).sum() + delta * delta * count * logs.size / merged
            mean, count = mean + delta * logs.size / merged, merged
    return float(low), float(high), 100.0 * folds / values.size, float(np.sqrt(squares / count)) if count else np.nan


def _determinant_of_slab(u: torch.Tensor, weights: np.ndarray, inverse) -> torch.Tensor:
    """:func:`jacobian_determinant`'s tensor form on a (3, Z, Y, X) slab of the field: (Z, Y, X),
    its first and last slices differenced against themselves (right only at the field's ends)."""
    import torch

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
    return (r[0][0] * r[1][1] * r[2][2] - r[0][0] * r[2][1] * r[1][2] - r[1][0] * r[0][1] * r[2][2]
            + r[1][0] * r[2][1] * r[0][2] + r[2][0] * r[0][1] * r[1][2] - r[2][0] * r[1][1] * r[0][2])


# ---------------- the PyTorch path of resampled_image and displacement_field (the GPU's, the C++ reference);
# torch imported where it runs: mgr-engine warp and jacobian run the C++ kernels without it


def grid_points(displacement: torch.Tensor, fixed_to_grid, fixed_shape, first_z: int = 0) -> torch.Tensor:
    """Where each voxel of the fixed grid (its slices from ``first_z`` on) lands on the
    displacement's grid: (3, Z, Y, X) float64 grid indices (x, y, z), ``q + displacement(q)`` with
    ``q`` the voxel's own grid position (no displacement where ``q`` is outside the grid)."""
    q = _affine_grid(fixed_to_grid, fixed_shape, displacement.device, first_z)
    sampled = _sample_linear(displacement.permute(3, 0, 1, 2).double(), q)
    return q + sampled * _inside(q, displacement.shape[:3])


def _affine_grid(affine, shape, device, first_z: int = 0) -> torch.Tensor:
    """``affine`` applied to the index of every voxel of a (Z, Y, X) grid whose slices start at
    ``first_z``: (3, Z, Y, X) float64 (x, y, z)."""
    import torch

    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=device)[:, :, None, None, None]
    z, y, x = (torch.arange(start, start + n, dtype=torch.float64, device=device)
               for start, n in zip((first_z, 0, 0), shape))
    return affine[:, 3] + affine[:, 0] * x + affine[:, 1] * y[:, None] + affine[:, 2] * z[:, None, None]


def _apply_affine(affine, points: torch.Tensor) -> torch.Tensor:
    """``affine`` applied to (3, ...) points (x, y, z)."""
    import torch

    affine = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=points.device)
    return torch.einsum("ij,j...->i...", affine[:, :3], points) + affine[:, 3].reshape(3, *([1] * (points.dim() - 1)))


def _inside(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Where (3, ...) continuous indices (x, y, z) lie inside a (Z, Y, X) grid, by ITK's rule."""
    import torch

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
        # NaN (a NaN displacement: outside, 0) to voxel 0, whose value _inside then discards
        clamped = index[axis].nan_to_num(nan=0.0).clamp(0, n - 1)
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
    import torch

    from . import ops

    steps = torch.tensor([max(n - 1, 1) for n in volume.shape[1:]], dtype=index.dtype, device=index.device)
    coords = index.flip(0) / steps.reshape(3, *([1] * (index.dim() - 1)))
    return ops.warp(volume[None], coords[None].to(volume.dtype), padding="border")[0]
