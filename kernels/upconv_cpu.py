"""The weight gradient of the U-Net decoder's transposed convolutions on the CPU, in C++ with OpenMP.

Each decoder level upsamples with ``ConvTranspose3d(kernel_size=4, stride=2, padding=1)``. In
IO's backward pass, oneDNN computes that layer's weight gradient at about 60% of the rate of its
input gradient (48 -> 16 channels at 88^3, 2 cores: 259 against 404 GFLOP/s on an AMD Zen 5):
the largest convolution cost of a full-resolution U-Net's finest level. The extension
``mgr_engine._upconv_cpu`` (``kernels/upconv_cpu.cpp``, built by ``setup.py``) computes it from
channels-last tensors (the engine's layout), in the widest vectors the CPU has
(:func:`vector_bytes`), with float64 sums per row block and per thread. It is faster than
oneDNN's where the layer has few output channels, at the finest two levels (16 and 32): there
:func:`takes` routes IO's layers to it; oneDNN keeps the coarser ones, whose short rows it runs
better.

Reference: :func:`reference` (``convolution_backward``); test: ``tests/test_kernels_upconv_cpu.py``;
benchmark: ``benchmarks/bench_upconv_cpu.py``.
"""

from __future__ import annotations

import torch

from mgr_engine.ops import is_channels_last

from .warp_cpu import as_kernel_array

try:
    from mgr_engine import _upconv_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _upconv_cpu = None

# Output channels up to which the kernel is faster than oneDNN's (both in AVX-512, and both
# in AVX2: benchmarks/RESULTS.md, forty-sixth session); beyond, the rows are short and the
# channels many, and oneDNN is as fast or faster.
MOST_OUTPUT_CHANNELS = 32


def available() -> bool:
    """Whether the C++ extension was built."""
    return _upconv_cpu is not None


def vector_bytes(cap: int | None = None) -> int:
    """The vector width in bytes the kernel runs in: 64 (AVX-512), 32 (AVX2 + FMA) or 16 (SSE2,
    or another architecture's). ``cap`` (16, 32 or 64) caps it from now on, in this process, and
    0 lifts the cap: the tests run every width on one CPU."""
    return _upconv_cpu.simd_bytes(-1 if cap is None else cap)


def reference(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The op in PyTorch: the weight gradient of ``conv_transpose3d(x, weight, stride=2, padding=1)``
    for its output's gradient ``grad``."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [2] * 3, [1] * 3, [1] * 3, True, [0] * 3, 1,
                                               [False, True, False])[1]


def supports(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`weight_grad` takes these: float32 CPU tensors, ``x`` (B, Ci, D, H, W),
    ``grad`` (B, Co, 2D, 2H, 2W) with Co a multiple of 16, ``weight`` (Ci, Co, 4, 4, 4)."""
    if _upconv_cpu is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (x, grad, weight)):
        return False
    return (x.dim() == 5 and grad.dim() == 5 and grad.shape[0] == x.shape[0] and grad.shape[1] % 16 == 0
            and tuple(grad.shape[2:]) == tuple(2 * n for n in x.shape[2:])
            and tuple(weight.shape) == (x.shape[1], grad.shape[1], 4, 4, 4))


def takes(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether IO's transposed convolution runs its weight gradient here: :func:`supports`, both
    tensors channels-last (the network's layout, no copies), at most
    :data:`MOST_OUTPUT_CHANNELS` output channels, and vectors of at least 32 bytes (AVX2)."""
    return (supports(x, grad, weight) and is_channels_last(x) and is_channels_last(grad)
            and grad.shape[1] <= MOST_OUTPUT_CHANNELS and vector_bytes() >= 32)


def weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """:func:`reference` in C++: the (Ci, Co, 4, 4, 4) weight gradient of a kernel-4, stride-2,
    padding-1 transposed convolution of ``x`` whose output's gradient is ``grad``. Needs
    :func:`supports` (inputs not channels-last are copied to it)."""
    out = torch.empty(x.shape[1], grad.shape[1], 4, 4, 4, dtype=x.dtype)
    _upconv_cpu.upconv_weight_grad(as_kernel_array(x), as_kernel_array(grad), out.numpy(), torch.get_num_threads())
    return out
