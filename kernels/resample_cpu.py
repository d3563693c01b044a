"""A transform at every fixed voxel on the CPU in C++ with OpenMP: the moving image resampled
onto the fixed grid (linear or nearest) and the dense displacement field.

:meth:`mgr_engine.RegistrationResult.warp` and ``.displacement_field()``, and ``mgr-engine warp``
and ``jacobian`` with a transform file of that form, evaluate ITK's composite of an affine, a
displacement field on a grid and an affine (:class:`mgr_engine.resample.GridTransform`) at every
voxel of the fixed image. ITK's filters do it point by point through virtual calls (0.33 s /
0.26 s at 160x192x160 on 2 cores); the same arithmetic as float64 tensor operations
(:mod:`mgr_engine.resample`'s PyTorch path, the one a GPU runs) makes a dozen passes over
large temporaries on the CPU. The extension ``mgr_engine._resample_cpu``
(``kernels/resample_cpu.cpp``, built by ``setup.py``) takes a row of fixed voxels through
one vectorized loop, in double as ITK (``benchmarks/RESULTS.md``). No gradients: the outputs
are the registration's results.

Reference: the PyTorch path of :mod:`mgr_engine.resample` (and ITK); test:
``tests/test_resample.py``; benchmark: ``benchmarks/bench_resample.py``.
"""

from __future__ import annotations

import numpy as np

from mgr_engine.kernel_modes import cpu_threads

try:
    from mgr_engine import _resample_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _resample_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _resample_cpu is not None


# ITK's scalar pixel types, sampled as they are (by name: a numpy or a torch dtype)
PIXEL_TYPES = ("uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")


def supports(displacement, volume=None) -> bool:
    """Whether the kernel takes ``displacement`` (D, H, W, 3) and ``volume``, the image (Z, Y, X),
    numpy arrays or CPU tensors: built, each under 2^31 elements (the kernel's offsets are 32-bit;
    a larger one takes the PyTorch path instead of the kernel's refusal), the image of one of
    :data:`PIXEL_TYPES`."""
    arrays = (displacement,) if volume is None else (displacement, volume)
    return (available() and all(int(np.prod(a.shape)) < 2**31 for a in arrays)
            and (volume is None or str(volume.dtype).removeprefix("torch.") in PIXEL_TYPES))


def _affine(affine) -> np.ndarray:
    return np.ascontiguousarray(affine, dtype=np.float64)


def resample(displacement: np.ndarray, fixed_to_grid, fixed_shape, volume: np.ndarray, grid_to_index,
             nearest: bool, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`mgr_engine.resample.resampled_image` on numpy arrays: ``volume`` at the moving point
    of each fixed voxel, (Z, Y, X) of its dtype, written into ``out`` where given (C-contiguous)."""
    out = np.empty(tuple(fixed_shape), dtype=volume.dtype) if out is None else out
    _resample_cpu.resample(np.ascontiguousarray(displacement, dtype=np.float64), _affine(fixed_to_grid),
                           np.ascontiguousarray(volume), _affine(grid_to_index), nearest, out, cpu_threads())
    return out


def displacement_field(displacement: np.ndarray, fixed_to_grid, fixed_shape, grid_to_physical,
                       fixed_to_physical, out: np.ndarray | None = None, first_z: int = 0) -> np.ndarray:
    """:func:`mgr_engine.resample.displacement_field` on numpy arrays: (Z, Y, X, 3) float32, mm
    (x, y, z), written into ``out`` where given (C-contiguous)."""
    out = np.empty((*fixed_shape, 3), dtype=np.float32) if out is None else out
    _resample_cpu.displacement_field(np.ascontiguousarray(displacement, dtype=np.float64), _affine(fixed_to_grid),
                                     _affine(grid_to_physical), _affine(fixed_to_physical), out, first_z, cpu_threads())
    return out
