"""The U-Net decoder's transposed convolutions on the CPU, in C++ with OpenMP: the forward and
backward passes in Winograd form, and the weight gradient in direct form.

Each decoder level upsamples with ``ConvTranspose3d(kernel_size=4, stride=2, padding=1)``. The
extension ``mgr_engine._upconv_cpu`` (``kernels/upconv_cpu.cpp``, built by ``setup.py``) works on
channels-last tensors (the engine's layout), in the widest vectors the CPU has
(:func:`vector_bytes`).

* **Forward** (:func:`forward`, of ``leaky_relu(x)`` or ``x``). oneDNN runs these layers near the
  FMA peak, so only fewer products make them faster: Winograd's F(2, 2) on their sub-pixel form
  takes 27 products per input x output channel pair where the direct sums take 64 (48 -> 16
  channels at 88^3, the finest level of a full-resolution U-Net: 180 against 90 ms on 2 AMD Zen
  5 cores). Its rounding differs from the direct sums' (the transforms add and subtract; its
  error against float64 1.3x oneDNN's there): tested against float64 within 8 float32 epsilons
  of the sum of absolute products. The inference network and IO's forward take it at the finest
  three levels, up to 64 output channels (:func:`takes_forward`).
* **Backward pass in Winograd form** (:func:`backward`: the input gradient, times the leaky
  ReLU's derivative where the layer's input went through one, and the weight gradient). oneDNN
  runs the input gradient near the FMA peak too, as a strided convolution; per axis it is a 2-tap
  correlation for each parity of the output gradient's voxels, and so is the weight gradient (x
  in the place of the weight), so F(2, 2) applies as in the forward: 27 products where the direct
  sums take 64, both sharing the transform of the output gradient. IO's backward pass takes it
  at the finest levels (:func:`takes_backward`).
* **Weight gradient in direct form** (:func:`weight_grad`), for the layers whose channels the
  Winograd form does not take. In IO's backward pass, oneDNN computes it at about
  60% of the rate of the layer's input gradient (48 -> 16 channels at 88^3, 2 cores: 259 against
  404 GFLOP/s on an AMD Zen 5), the largest convolution cost of a full-resolution U-Net's finest
  level. Here with float64 sums per row block and per thread. It is faster than oneDNN's where
  the layer has few output channels, at the finest two levels (16 and 32): there :func:`takes`
  routes IO's layers to it; oneDNN keeps the coarser ones, whose short rows it runs better.

References: :func:`forward_reference` (``conv_transpose3d``), :func:`input_grad_reference` and
:func:`reference` (``convolution_backward``); test: ``tests/test_kernels_upconv_cpu.py``; benchmark:
``benchmarks/bench_upconv_cpu.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mgr_engine.ops import is_channels_last

from .warp_cpu import as_kernel_array

try:
    from mgr_engine import _upconv_cpu
except ImportError:  # not compiled (no C++ compiler at install time)
    _upconv_cpu = None

# Output channels up to which the weight gradient is faster than oneDNN's (in AVX-512 and in
# AVX2: benchmarks/RESULTS.md, forty-sixth session; 192 -> 64 at 22^3 1.02x, fiftieth): beyond,
# its rows are short and its channels many.
MOST_OUTPUT_CHANNELS = 32
# The same for the Winograd forward and backward: 192 -> 64 at 22^3 the forward 1.29x oneDNN's
# speed in AVX-512, 1.14x in AVX2 against oneDNN capped at AVX2 (fiftieth session); both gradients
# 1.37x and 1.23x (fifty-third session). More channels are not measured at a grid with enough
# tiles (512 -> 128 is at 11^3).
MOST_WINOGRAD_OUTPUT_CHANNELS = 64
# Tiles (2 x 2 x 2 input voxels each) below which the forward's transformed weights are read for
# too few products: 96 -> 32 channels at 22^3 (1728 tiles) 1.2x oneDNN's speed, at 11^3 (216)
# 0.7x (AVX-512, 2 cores; RESULTS.md, forty-ninth session). The backward's tiles (2 x 2 x 2 voxels
# of the layer's input) too: its input gradient alone 0.98x at 96 -> 32 at 22^3 (1331 tiles),
# 0.70x at 18^3 (729); both gradients 1.34x and 1.06x there, 1.02x at 192 -> 64 at 20^3 (1000)
# (fifty-third session).
FEWEST_TILES = 1000
# Bytes the Winograd weight gradient may keep for all threads: each its float64 sums (27 x Ci x 8
# Co) and a chunk's transformed tiles (27 x the extension's CHUNK_TILES x (8 Co + Ci) floats).
# 192 -> 64 channels take 34 MiB a thread (7 threads fit, 64 would take 2.1 GiB), 96 -> 32 12.6
# MiB, 48 -> 16 5 MiB; beyond, oneDNN computes the layer's backward pass.
MOST_WINOGRAD_BYTES = 256 * 2**20


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


def forward_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      slope: float | None = None) -> torch.Tensor:
    """The forward in PyTorch: ``conv_transpose3d(leaky_relu(x, slope) if slope is not None else x,
    weight, bias, stride=2, padding=1)``."""
    if slope is not None:
        x = F.leaky_relu(x, slope)
    return F.conv_transpose3d(x, weight, bias, stride=2, padding=1)


def supports_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`forward` takes these: float32 CPU tensors, ``x`` (B, Ci, D, H, W), ``weight``
    (Ci, Co, 4, 4, 4) with Co a multiple of 16, ``bias`` None or (Co,)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if _upconv_cpu is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return (x.dim() == 5 and weight.dim() == 5 and weight.shape[0] == x.shape[1] and weight.shape[1] % 16 == 0
            and tuple(weight.shape[2:]) == (4, 4, 4) and (bias is None or tuple(bias.shape) == (weight.shape[1],)))


def takes_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the network's transposed convolution runs its forward here: :func:`supports_forward`,
    ``x`` channels-last (the network's layout, no copy), at most
    :data:`MOST_WINOGRAD_OUTPUT_CHANNELS` output channels, at least :data:`FEWEST_TILES` tiles, and
    vectors of at least 32 bytes (AVX2; in SSE2 it ran at 0.7x oneDNN's AVX2 rate)."""
    tiles = x.shape[0] * math.prod(n // 2 + 1 for n in x.shape[2:])
    return (supports_forward(x, weight, bias) and is_channels_last(x)
            and weight.shape[1] <= MOST_WINOGRAD_OUTPUT_CHANNELS and tiles >= FEWEST_TILES and vector_bytes() >= 32)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            slope: float | None = None) -> torch.Tensor:
    """:func:`forward_reference` in C++ (Winograd form), channels-last (B, Co, 2D, 2H, 2W); no
    gradients. Needs :func:`supports_forward` (an ``x`` not channels-last is copied to it)."""
    out = torch.empty(x.shape[0], weight.shape[1], *(2 * n for n in x.shape[2:]), dtype=x.dtype,
                      memory_format=torch.channels_last_3d)
    bias = torch.empty(0, dtype=x.dtype) if bias is None else bias.detach().contiguous()  # empty: none
    _upconv_cpu.upconv_forward(as_kernel_array(x), weight.detach().contiguous().numpy(), bias.numpy(),
                               as_kernel_array(out), slope is not None, 0.0 if slope is None else float(slope),
                               torch.get_num_threads())
    return out


def input_grad_reference(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                         slope: float | None = None) -> torch.Tensor:
    """The input gradient in PyTorch: that of ``conv_transpose3d(leaky_relu(x, slope) if slope is
    not None else x, weight, stride=2, padding=1)`` for its output's gradient ``grad``."""
    conv_input = F.leaky_relu(x, slope) if slope is not None else x
    out = torch.ops.aten.convolution_backward(grad, conv_input, weight, None, [2] * 3, [1] * 3, [1] * 3, True,
                                              [0] * 3, 1, [True, False, False])[0]
    return out if slope is None else torch.ops.aten.leaky_relu_backward(out, x, slope, False)


def supports_backward(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`backward` takes these: float32 CPU tensors, ``x`` (B, Ci, D, H, W), ``grad``
    (B, Co, 2D, 2H, 2W), ``weight`` (Ci, Co, 4, 4, 4), Ci and Co multiples of 16."""
    if _upconv_cpu is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (grad, weight, x)):
        return False
    return (x.dim() == 5 and grad.dim() == 5 and grad.shape[0] == x.shape[0] and x.shape[1] % 16 == 0
            and grad.shape[1] % 16 == 0 and tuple(grad.shape[2:]) == tuple(2 * n for n in x.shape[2:])
            and tuple(weight.shape) == (x.shape[1], grad.shape[1], 4, 4, 4))


def takes_backward(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether IO's transposed convolution runs its backward pass here: :func:`supports_backward`,
    ``grad`` and ``x`` channels-last, at most :data:`MOST_WINOGRAD_OUTPUT_CHANNELS` output
    channels, at least :data:`FEWEST_TILES` tiles, vectors of at least 32 bytes (AVX2), and the
    threads' weight-gradient buffers within :data:`MOST_WINOGRAD_BYTES`."""
    if not supports_backward(grad, weight, x):
        return False
    tiles = x.shape[0] * math.prod((n + 1) // 2 for n in x.shape[2:])
    cin, depth = x.shape[1], 8 * grad.shape[1]
    per_thread = 27 * (8 * cin * depth + 4 * _upconv_cpu.CHUNK_TILES * (depth + cin))
    return (is_channels_last(grad) and is_channels_last(x) and grad.shape[1] <= MOST_WINOGRAD_OUTPUT_CHANNELS
            and tiles >= FEWEST_TILES and vector_bytes() >= 32
            and torch.get_num_threads() * per_thread <= MOST_WINOGRAD_BYTES)


def backward(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, slope: float | None = None, *,
             input_grad: bool = True, weight_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward pass of ``conv_transpose3d(leaky_relu(x, slope) if slope is not None else x,
    weight, stride=2, padding=1)`` for its output's gradient ``grad``, in C++ (Winograd form): the
    gradient to ``x`` (:func:`input_grad_reference`, channels-last) where ``input_grad``, and to
    ``weight`` (:func:`reference` of the leaky ReLU's output) where ``weight_grad``; None for the
    other. Both together share the transform of ``grad``. The weight gradient's float32 sums run
    over at most 192 tiles, then float64 per thread, the threads' in order: one result per thread
    count. Needs :func:`supports_backward` (inputs not channels-last are copied to it)."""
    gx = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last_3d) if input_grad else None
    grad_weight = torch.empty(weight.shape, dtype=x.dtype) if weight_grad else None
    none = torch.empty(0, dtype=x.dtype).numpy()
    _upconv_cpu.upconv_backward(as_kernel_array(grad), weight.detach().contiguous().numpy(), as_kernel_array(x),
                                none if gx is None else as_kernel_array(gx),
                                none if grad_weight is None else grad_weight.numpy(), slope is not None,
                                0.0 if slope is None else float(slope), torch.get_num_threads())
    return gx, grad_weight
