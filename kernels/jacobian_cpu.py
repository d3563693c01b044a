"""The Jacobian determinant of a displacement field on the CPU in C++ with OpenMP, ITK's filter's
arithmetic bit for bit.

:meth:`mgr_engine.RegistrationResult.jacobian_determinant` and ``mgr-engine jacobian`` take it on
the CPU. ITK's ``DisplacementFieldJacobianDeterminantFilter`` visits each voxel through a
neighbourhood iterator, and the tensor form (:func:`mgr_engine.resample.jacobian_determinant`, the
reference) makes two dozen passes over volume-sized temporaries: 2.7 s and 2.0 s on a 512x512x300
field (2 cores), 3.5 s for the physical form. The extension ``mgr_engine._jacobian_cpu``
(``kernels/jacobian_cpu.cpp``, built by ``setup.py``) takes a row of voxels through one loop and
allocates its output only: 0.28 s, 0.64 s for the physical form (``benchmarks/RESULTS.md``). No
gradients: the output is a result.

Reference: :func:`mgr_engine.resample.jacobian_determinant` (and ITK's filter); test:
``tests/test_kernels_jacobian_cpu.py``; benchmark: ``benchmarks/bench_jacobian_cpu.py``.
"""

from __future__ import annotations

import numpy as np

from mgr_engine.kernel_modes import cpu_threads

try:
    from mgr_engine import _jacobian_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _jacobian_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _jacobian_cpu is not None


def jacobian_determinant(displacement: np.ndarray, half_weights: np.ndarray, inverse_direction=None,
                         out: np.ndarray | None = None) -> np.ndarray:
    """:func:`mgr_engine.resample.jacobian_determinant` on a numpy array: ``displacement`` (Z, Y, X, 3),
    ``half_weights`` the float32 (x, y, z) weights of the central differences, ``inverse_direction``
    (3, 3) for the derivatives along the physical axes (None: along the index axes). (Z, Y, X)
    float32, written into ``out`` where given (C-contiguous)."""
    out = np.empty(displacement.shape[:3], dtype=np.float32) if out is None else out
    field = np.ascontiguousarray(displacement, dtype=np.float32)
    weights = np.ascontiguousarray(half_weights, dtype=np.float32)
    if inverse_direction is None:
        _jacobian_cpu.jacobian_determinant(field, weights, out, cpu_threads())
    else:
        _jacobian_cpu.physical_jacobian_determinant(field, weights, np.asarray(inverse_direction, dtype=np.float32),
                                                    out, cpu_threads())
    return out
