"""Trilinear warp on the CPU in C++ with OpenMP: the forward of :func:`mgr_engine.ops.warp`.

The extension ``mgr_engine._trilinear_cpu`` (``kernels/trilinear_cpu.cpp``) is compiled by
``setup.py`` through pybind11 when the package is installed; where no compiler was found it
is absent and :func:`available` is False. It computes what ``F.grid_sample(mode="bilinear",
align_corners=True)`` computes, with the output voxels split over ``torch.get_num_threads()``
OpenMP threads: torch's 3-D grid sampler parallelizes only over the batch on the CPU, so a
single pair (batch 1) ran on one core. Forward only, float32 only: :func:`mgr_engine.ops.warp`
uses it where no gradient is needed (registration without IO: every warp and composition
in the network) and keeps PyTorch elsewhere; the outputs are resampled by ITK, not here. Reference: the PyTorch branch of :func:`mgr_engine.ops.warp`; test:
``tests/test_kernels_warp_cpu.py``; benchmark: ``benchmarks/bench_warp_cpu.py``.
"""

from __future__ import annotations

import torch

try:
    from mgr_engine import _trilinear_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _trilinear_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _trilinear_cpu is not None


def supports(image: torch.Tensor, coords: torch.Tensor) -> bool:
    """Whether :func:`warp_cpu` handles these arguments: CPU float32, no gradient wanted."""
    return (image.device.type == "cpu" and coords.device.type == "cpu"
            and image.dtype == torch.float32 and coords.dtype == torch.float32
            and not (torch.is_grad_enabled() and (image.requires_grad or coords.requires_grad)))


def warp_cpu(image: torch.Tensor, coords: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """``image`` (B, C, *grid) sampled at ``coords`` (B or 1, 3, *out) in [0, 1]; see
    :func:`mgr_engine.ops.warp`. Needs :func:`available` and :func:`supports`."""
    if _trilinear_cpu is None:
        raise RuntimeError("mgr_engine._trilinear_cpu was not built: reinstall mgr_engine with a C++ compiler "
                           "(pip install -e .) or use the PyTorch path (MGR_ENGINE_KERNELS=torch)")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', not {padding!r}")
    image, coords = image.detach().contiguous(), coords.detach().contiguous()
    out = torch.empty((image.shape[0], image.shape[1], *coords.shape[2:]), dtype=torch.float32)
    _trilinear_cpu.warp_trilinear(image.numpy(), coords.numpy(), out.numpy(), padding == "border",
                                  torch.get_num_threads())
    return out
