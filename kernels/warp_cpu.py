"""Trilinear warp on the CPU in C++ with OpenMP: :func:`mgr_engine.ops.warp`, forward and backward.

The extension ``mgr_engine._trilinear_cpu`` (``kernels/trilinear_cpu.cpp``) is compiled by
``setup.py`` through pybind11 when the package is installed; where no compiler was found it
is absent and :func:`available` is False. It computes what ``F.grid_sample(mode="bilinear",
align_corners=True)`` computes, and its gradients with respect to the image and to the map,
with the output voxels split over ``torch.get_num_threads()`` OpenMP threads (torch's 3-D
grid sampler parallelizes only over the batch on the CPU, so a single pair, batch 1, ran its
forward and backward on one core) and the loops over them vectorized with gathers (AVX2 or
AVX-512, picked at load time). float32 (the engine) and float64 (gradcheck); first
derivatives only (IO and training need no more). Reference: the PyTorch branch of
:func:`mgr_engine.ops.warp`; test: ``tests/test_kernels_warp_cpu.py``; benchmark:
``benchmarks/bench_warp_cpu.py``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mgr_engine.ops import is_channels_last, memory_format_of

try:
    from mgr_engine import _trilinear_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _trilinear_cpu = None


def available() -> bool:
    """Whether the C++ extension was built."""
    return _trilinear_cpu is not None


def _require_extension() -> None:
    if _trilinear_cpu is None:
        raise RuntimeError("mgr_engine._trilinear_cpu was not built: reinstall mgr_engine with a C++ compiler "
                           "(pip install -e .) or use the PyTorch path (MGR_ENGINE_KERNELS=torch)")


def supports(image: torch.Tensor, coords: torch.Tensor) -> bool:
    """Whether :func:`warp_cpu` handles these arguments: CPU tensors, both float32 or both float64,
    an image of fewer than 2^31 voxels per channel (the kernel's offsets are 32-bit)."""
    return (image.device.type == "cpu" and coords.device.type == "cpu"
            and image.dtype == coords.dtype and image.dtype in (torch.float32, torch.float64)
            and image.shape[2:].numel() < 2**31)


def as_kernel_array(tensor: torch.Tensor, channels_last: bool = True):
    """``tensor`` (N, K, D, H, W) as the numpy array a C++ kernel reads: (N, D, H, W, K) when
    ``channels_last`` (a copy unless the tensor is channels-last already), else planar. A view
    of an output tensor's memory, for the kernel to write into."""
    tensor = tensor.detach()
    if channels_last:
        return tensor.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1).numpy()
    return tensor.contiguous().numpy()


class TrilinearWarpCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coords, border, add_coords):
        image, coords = image.detach().contiguous(), coords.detach()  # .numpy() wants no autograd
        # The engine's maps are channels-last (its network is, identity grid included): the
        # kernel then reads them, and writes its output, in that layout instead of a planar copy.
        channels_last = is_channels_last(coords)
        out = torch.empty((image.shape[0], image.shape[1], *coords.shape[2:]), dtype=image.dtype,
                          memory_format=memory_format_of(coords))
        _trilinear_cpu.warp_trilinear(image.numpy(), as_kernel_array(coords, channels_last),
                                      as_kernel_array(out, channels_last),
                                      border, add_coords, channels_last, torch.get_num_threads())
        ctx.save_for_backward(image, coords)
        ctx.border, ctx.add_coords = border, add_coords
        ctx.channels_last = channels_last
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        image, coords = ctx.saved_tensors
        channels_last = ctx.channels_last
        need_image, need_coords = ctx.needs_input_grad[:2]
        empty = image.new_empty((0,) * 5)
        grad_image = torch.empty_like(image) if need_image else empty
        grad_coords = (torch.empty(coords.shape, dtype=coords.dtype, memory_format=memory_format_of(coords))
                       if need_coords else empty)
        _trilinear_cpu.warp_trilinear_backward(
            image.numpy(), as_kernel_array(coords, channels_last), as_kernel_array(grad_out, channels_last),
            grad_image.numpy(),
            as_kernel_array(grad_coords, channels_last) if need_coords else empty.numpy(), need_image, need_coords,
            ctx.border, ctx.add_coords, channels_last, torch.get_num_threads())
        return (grad_image if need_image else None), (grad_coords if need_coords else None), None, None


def warp_cpu(image: torch.Tensor, coords: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """``image`` (B, C, *grid) sampled at ``coords`` (B or 1, 3, *out) in [0, 1], differentiable
    in both; see :func:`mgr_engine.ops.warp`. Needs :func:`available` and :func:`supports`."""
    _require_extension()
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', not {padding!r}")
    return TrilinearWarpCPU.apply(image, coords, padding == "border", False)


def compose_maps_cpu(displacement: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``coords + warp_cpu(displacement, coords, "border")`` in one pass, differentiable in both
    (:func:`mgr_engine.ops.compose_maps`): ``displacement`` (B, 3, *grid), ``coords`` (B or 1, 3,
    *out). Needs :func:`available` and :func:`supports`."""
    _require_extension()
    if displacement.shape[1] != 3:
        raise ValueError(f"a displacement field has 3 channels, not {displacement.shape[1]}")
    return TrilinearWarpCPU.apply(displacement, coords, True, True)
