"""Coordinate maps and the operations on them, in plain PyTorch.

A *map* is a tensor ``(B, 3, D, H, W)`` of absolute coordinates in ``[0, 1]^3``
of the tensor's own axes (channel 0 indexes dim 2, channel 1 dim 3, channel 2
dim 4); the identity map spans 0..1 over n voxels, so voxel i sits at
``i / (n - 1)``. A *displacement field* is a map minus the identity.

These functions are the reference semantics the fused Triton kernels
(``kernels/``, installed as ``mgr_engine.kernels``) reproduce; the engine calls only
these, and they dispatch to the kernels by :func:`kernel_mode`: ``"auto"`` (Triton on
CUDA tensors when triton imports; on the CPU the C++ warp of ``kernels/warp_cpu.py`` where
it applies, PyTorch elsewhere), ``"triton"`` (always Triton; on the CPU that needs
``TRITON_INTERPRET=1``), ``"cpp"`` (the C++ warp, forward and backward, wherever it
applies: CPU float32 or float64 tensors outside tracers; an error when it was not built) or
``"torch"`` (never a kernel). The C++ modes also cover the inference network's decoder
epilogue and IO's BatchNorm-crop-concatenation (``kernels/decoder_cpu.py``, called from
:class:`mgr_engine.model.UNet`) and a result's full-resolution resampling and its Jacobian
determinant (``kernels/resample_cpu.py``, ``kernels/jacobian_cpu.py``, :mod:`mgr_engine.resample`).
The default comes from the environment variable ``MGR_ENGINE_KERNELS``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .errors import InvalidOptionError
from .kernel_modes import KERNEL_MODES, cpp_kernels_allowed, current_kernel_mode, kernel_mode, set_kernel_mode  # noqa: F401


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel under the current mode."""
    mode = current_kernel_mode()
    if mode in ("torch", "cpp"):
        return False
    if mode == "triton":
        is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
        if not (is_compiling is not None and is_compiling()):  # Dynamo's capture launches nothing
            _check_triton_runs_on(tensor)
        return True
    return tensor.is_cuda and triton_available()


def _check_triton_runs_on(tensor: torch.Tensor) -> None:
    """:class:`InvalidOptionError` where kernel mode "triton" cannot launch on ``tensor``: Triton's
    own messages ("0 active drivers", an ImportError) said nothing of the mode."""
    if not triton_available():
        raise InvalidOptionError("kernel mode 'triton' needs triton (pip install triton); use 'auto'")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidOptionError("kernel mode 'triton' runs on CUDA tensors, or on the CPU in Triton's interpreter "
                                 "(TRITON_INTERPRET=1 before triton is imported, for tests); use 'auto' or 'cpp' on "
                                 "the CPU")


def is_eager(*tensors: torch.Tensor) -> bool:
    """Plain tensors outside any tracer (jit, dynamo, export's fake tensors): a C++ call on
    raw memory would not be traced."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if torch.jit.is_tracing() or (is_compiling is not None and is_compiling()):
        return False
    return all(type(t) is torch.Tensor for t in tensors)


def _cpp_kernels_allowed(*tensors: torch.Tensor) -> bool:
    """Whether the current mode lets the C++ extension run on ``tensors`` (which it then checks)."""
    return cpp_kernels_allowed() and is_eager(*tensors)


def use_cpp_warp(image: torch.Tensor, coords: torch.Tensor) -> bool:
    """Whether :func:`warp` of ``image`` at ``coords`` runs the C++ warp under the current mode."""
    from .kernels import warp_cpu

    return _cpp_kernels_allowed(image, coords) and warp_cpu.supports(image, coords)


def use_cpp_decoder(y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
                    skip: torch.Tensor | None = None) -> bool:
    """Whether a U-Net decoder level runs in C++ under the current mode
    (:mod:`mgr_engine.kernels.decoder_cpu`, CPU tensors): with ``scale`` and ``skip``, the folded
    inference network's whole epilogue; without, the upsample-add of IO and training."""
    from .kernels import decoder_cpu

    if scale is None:
        return _cpp_kernels_allowed(y, x) and decoder_cpu.supports_upsample_add(y, x)
    return _cpp_kernels_allowed(y, x, scale, skip) and decoder_cpu.supports(y, x, scale, skip)


def use_cpp_norm_concat(x: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether IO's decoder level output ``cat([norm(x)[crop], skip], 1)`` through an eval-mode
    BatchNorm, and its backward, run in C++ under the current mode
    (:func:`mgr_engine.kernels.decoder_cpu.norm_concat`, channels-last CPU tensors)."""
    from .kernels import decoder_cpu

    return _cpp_kernels_allowed(x, skip) and decoder_cpu.supports_norm_concat(x, skip)


def use_cpp_blur(volume: torch.Tensor, taps: torch.Tensor) -> bool:
    """Whether LNCC's separable blur of ``volume`` by ``taps`` runs in C++ under the current mode
    (:mod:`mgr_engine.kernels.gaussian_blur_cpu`, CPU tensors)."""
    from .kernels import gaussian_blur_cpu

    return _cpp_kernels_allowed(volume) and gaussian_blur_cpu.supports(volume, taps)


def use_cpp_mind(image: torch.Tensor) -> bool:
    """Whether the MIND-SSC descriptor of ``image`` runs in C++ under the current mode
    (:mod:`mgr_engine.kernels.mind_ssc_cpu`, CPU tensors)."""
    from .kernels import mind_ssc_cpu

    return _cpp_kernels_allowed(image) and mind_ssc_cpu.supports(image)


def use_cpp_last_conv(x: torch.Tensor, conv: torch.nn.Conv3d) -> bool:
    """Whether a U-Net's last convolution ``conv`` (3x3x3, padding 1, 3 outputs) runs in C++
    on ``x`` under the current mode (:mod:`mgr_engine.kernels.last_conv_cpu`, CPU tensors)."""
    from .kernels import last_conv_cpu

    # x alone for the tracer check: the weights are Parameters, a subclass that is not traced.
    return (_cpp_kernels_allowed(x) and last_conv_cpu.supports(x, conv.weight, conv.bias)
            and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def use_cpp_encoder_level(x: torch.Tensor, conv: torch.nn.Conv3d) -> bool:
    """Whether a U-Net encoder level of ``x`` through ``conv`` runs in C++ under the current mode
    (:func:`mgr_engine.kernels.encoder_cpu.takes`: CPU, channels-last, a few input channels: the
    first level's two images)."""
    from .kernels import encoder_cpu

    return _cpp_kernels_allowed(x) and encoder_cpu.takes(x, conv)


def use_cpp_upconv_weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the weight gradient of a U-Net's transposed convolution (kernel 4, stride 2,
    padding 1) of ``x``, whose output's gradient is ``grad``, runs in C++ under the current mode
    (:func:`mgr_engine.kernels.upconv_cpu.takes`: CPU, channels-last, the finest levels)."""
    from .kernels import upconv_cpu

    return _cpp_kernels_allowed(x, grad) and upconv_cpu.takes(x, grad, weight)


def use_cpp_upconv_backward(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the backward pass of a U-Net's transposed convolution (kernel 4, stride 2, padding
    1) of ``x``, whose output's gradient is ``grad``, runs in C++ in Winograd form under the
    current mode (:func:`mgr_engine.kernels.upconv_cpu.takes_backward`: CPU, channels-last, the
    finest levels)."""
    from .kernels import upconv_cpu

    return _cpp_kernels_allowed(x, grad) and upconv_cpu.takes_backward(grad, weight, x)


def use_cpp_upconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                           padding: int) -> bool:
    """Whether the forward of a U-Net's transposed convolution of ``x`` (no dilation, groups or
    output padding) runs in C++ under the current mode: stride 2, padding 1 and
    :func:`mgr_engine.kernels.upconv_cpu.takes_forward` (kernel 4, CPU, channels-last, the finest
    levels)."""
    from .kernels import upconv_cpu

    return stride == 2 and padding == 1 and _cpp_kernels_allowed(x) and upconv_cpu.takes_forward(x, weight, bias)


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a 5-D ``tensor`` is channels-last and not also contiguous (one channel, or one
    voxel, is both): the layout the engine runs its network in."""
    return not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last_3d)


def network_memory_format(device) -> torch.memory_format:
    """The layout the engine runs its networks in on ``device``: channels-last 3-D on the CPU
    (its 3-D convolutions 1.4x faster there, an IO step 1.12x, 2 cores), contiguous on a GPU
    (cuDNN: a no-IO registration 47.4 ms against 57.4 ms channels-last, IO steps even, on an
    H200; benchmarks/RESULTS.md, thirty-fifth session)."""
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format that gives a new tensor of another shape ``tensor``'s layout:
    channels-last 3-D where :func:`is_channels_last`, else contiguous."""
    return torch.channels_last_3d if is_channels_last(tensor) else torch.contiguous_format


def identity_map(shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Identity map ``(1, 3, *shape)``; coordinate i / (n - 1) is rounded from float64
    so it equals the reference's numpy-built map bit for bit."""
    axes = [
        (torch.arange(n, dtype=torch.float64) * (1.0 / (n - 1))).to(dtype)
        for n in shape
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid[None].to(device)


def warp(image: torch.Tensor, coords: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, *grid) trilinearly at ``coords`` (B or 1, 3, *out) in [0, 1].

    ``padding="zeros"`` treats the outside as 0 (images in the loss);
    ``padding="border"`` repeats the edge (displacement fields, images inside the network).
    Voxel centres sit at 0 and 1 (``align_corners=True``).
    """
    if use_triton(image):
        from .kernels.warp import warp as triton_warp

        return triton_warp(image, coords, padding)
    if use_cpp_warp(image, coords):
        from .kernels.warp_cpu import warp_cpu

        return warp_cpu(image, coords, padding)
    grid = coords.flip(1).permute(0, 2, 3, 4, 1) * 2.0 - 1.0  # (x, y, z) order, [-1, 1]
    if grid.shape[0] == 1 and image.shape[0] != 1:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def compose_maps(displacement: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Map ``x -> x + displacement(x)`` evaluated at ``coords``; the field repeats its border."""
    if use_triton(displacement):
        from .kernels.compose import compose_maps as triton_compose

        return triton_compose(displacement, coords)
    if use_cpp_warp(displacement, coords) and displacement.shape[1] == 3:
        from .kernels.warp_cpu import compose_maps_cpu

        return compose_maps_cpu(displacement, coords)
    return coords + warp(displacement, coords, padding="border")


def recomputed_in_backward(function, *tensors, recompute: bool):
    """``function(*tensors)``; with ``recompute`` and gradients, under (non-reentrant) activation
    checkpointing: what it computes between its inputs and outputs (a chain's maps, 61 MiB each
    at 175^3; a U-Net's activations) is not kept for the backward pass but recomputed there."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)
