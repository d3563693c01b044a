"""Fused map composition ``x -> coords(x) + field(coords(x))`` (Triton).

Semantics of :func:`mgr_engine.ops.compose_maps`: the displacement field is sampled
trilinearly with border padding at the map ``coords`` and added to it, in one pass
(the warp kernel of :mod:`kernels.warp` with its ``ADD_COORDS`` epilogue). Used by
TwoStep, by the GradICON regularizer's finite differences and by IO.
"""

from __future__ import annotations

import torch

from .warp import _like, warp_backward, warp_forward


class ComposeMaps(torch.autograd.Function):
    """``compose_maps(field, coords)`` with a fused Triton forward and backward."""

    @staticmethod
    def forward(ctx, field, coords):
        ctx.save_for_backward(field, coords)
        return warp_forward(field, coords, zero_pad=False, add_coords=True)

    @staticmethod
    def backward(ctx, grad_out):
        field, coords = ctx.saved_tensors
        grad_field, grad_coords = warp_backward(field, coords, grad_out, False, True, ctx.needs_input_grad[0])
        return _like(grad_field, field), grad_coords.to(coords.dtype)


def compose_maps(field: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`mgr_engine.ops.compose_maps`; ``field`` has 3 channels."""
    if field.shape[1] != 3:
        raise ValueError(f"a displacement field has 3 channels, got {field.shape[1]}")
    return ComposeMaps.apply(field, coords)
