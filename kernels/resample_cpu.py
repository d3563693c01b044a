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
import torch

try:
    from mgr_engine import _resample_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _resample_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _resample_cpu is not None


# (torch has uint16 and uint32 since 2.3)
PIXEL_TYPES = tuple(getattr(torch, name) for name in ("uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
                    if hasattr(torch, name))


def supports(displacement: torch.Tensor, volume: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes ``displacement`` (D, H, W, 3) and ``volume``, the image (Z, Y, X):
    built, CPU tensors, each under 2^31 elements (the kernel's offsets are 32-bit; a larger one
    takes the PyTorch path instead of the kernel's refusal), the image of one of
    :data:`PIXEL_TYPES` (ITK's scalar pixel types, sampled as they are)."""
    tensors = (displacement,) if volume is None else (displacement, volume)
    return (available() and all(t.device.type == "cpu" and t.numel() < 2**31 for t in tensors)
            and (volume is None or volume.dtype in PIXEL_TYPES))


def _displacement_array(displacement: torch.Tensor) -> np.ndarray:
    return displacement.detach().to(torch.float64).contiguous().numpy()


def _affine(affine) -> np.ndarray:
    return np.ascontiguousarray(affine, dtype=np.float64)


def resample(displacement: torch.Tensor, fixed_to_grid, fixed_shape, volume: torch.Tensor, grid_to_index,
             nearest: bool, out=None) -> torch.Tensor:
    """:func:`mgr_engine.resample.resampled_image` on CPU tensors: ``volume`` at the moving point
    of each fixed voxel, (Z, Y, X) of its dtype, written into ``out`` where given (C-contiguous)."""
    out = torch.empty(tuple(fixed_shape), dtype=volume.dtype) if out is None else out
    _resample_cpu.resample(_displacement_array(displacement), _affine(fixed_to_grid), volume.detach().contiguous().numpy(),
                           _affine(grid_to_index), nearest, out.numpy(), torch.get_num_threads())
    return out


def displacement_field(displacement: torch.Tensor, fixed_to_grid, fixed_shape, grid_to_physical,
                       fixed_to_physical, out=None, first_z: int = 0) -> torch.Tensor:
    """:func:`mgr_engine.resample.displacement_field` on CPU tensors: (Z, Y, X, 3) float32, mm (x, y, z),
    written into ``out`` where given (C-contiguous)."""
    out = torch.empty((*fixed_shape, 3), dtype=torch.float32) if out is None else out
    _resample_cpu.displacement_field(_displacement_array(displacement), _affine(fixed_to_grid), _affine(grid_to_physical),
                                     _affine(fixed_to_physical), out.numpy(), first_z, torch.get_num_threads())
    return out
