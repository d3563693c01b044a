"""The registration's transform at every fixed voxel on the CPU in C++ with OpenMP: the moving
image resampled onto the fixed grid (linear or nearest) and the dense displacement field.

:meth:`mgr_engine.RegistrationResult.warp` and ``.displacement_field()`` evaluate ITK's composite
transform of a network map (:func:`mgr_engine.itk_io.map_to_transform`) at every voxel of the
fixed image. ITK's filters do it point by point through virtual calls (0.33 s / 0.26 s at
160x192x160 on 2 cores); the same arithmetic as float64 tensor operations
(:mod:`mgr_engine.resample`'s PyTorch path, the one a GPU runs) makes a dozen passes over
large temporaries on the CPU. The extension ``mgr_engine._resample_cpu``
(``kernels/resample_cpu.cpp``, built by ``setup.py``) takes a row of fixed voxels through
one vectorized loop, in double as ITK: 94-118 ms for each output, 2.4-3.4x faster than ITK
(160x192x160, 2-core AMD EPYC, ``benchmarks/RESULTS.md``). No gradients: the outputs are the registration's results.

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


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes ``tensors`` (the map (3, D, H, W), the image (Z, Y, X)): built, CPU
    tensors, each volume under 2^31 voxels (the kernel's offsets are 32-bit; a larger one takes
    the PyTorch path instead of the kernel's refusal)."""
    return available() and all(t.device.type == "cpu" and t.shape[-3:].numel() < 2**31 for t in tensors)


def _map_array(phi: torch.Tensor) -> np.ndarray:
    return phi.detach().to(torch.float32).contiguous().numpy()


def _affine(affine) -> np.ndarray:
    return np.ascontiguousarray(affine, dtype=np.float64)


def resample(phi: torch.Tensor, fixed_to_network, fixed_shape, volume: torch.Tensor, network_to_index,
             nearest: bool) -> torch.Tensor:
    """:func:`mgr_engine.resample.resampled_image` on CPU tensors: ``volume`` (float32 or float64)
    at the moving point of each fixed voxel, (Z, Y, X) float64."""
    out = torch.empty(tuple(fixed_shape), dtype=torch.float64)
    _resample_cpu.resample(_map_array(phi), _affine(fixed_to_network), volume.detach().contiguous().numpy(),
                           _affine(network_to_index), nearest, out.numpy(), torch.get_num_threads())
    return out


def displacement_field(phi: torch.Tensor, fixed_to_network, fixed_shape, network_to_physical,
                       fixed_to_physical, out=None) -> torch.Tensor:
    """:func:`mgr_engine.resample.displacement_field` on CPU tensors: (Z, Y, X, 3) float32, mm (x, y, z),
    written into ``out`` where given (C-contiguous)."""
    out = torch.empty((*fixed_shape, 3), dtype=torch.float32) if out is None else out
    _resample_cpu.displacement_field(_map_array(phi), _affine(fixed_to_network), _affine(network_to_physical),
                                     _affine(fixed_to_physical), out.numpy(), torch.get_num_threads())
    return out
