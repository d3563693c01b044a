"""Coordinate maps and the operations on them, in plain PyTorch.

A *map* is a tensor ``(B, 3, D, H, W)`` of absolute coordinates in ``[0, 1]^3``
of the tensor's own axes (channel 0 indexes dim 2, channel 1 dim 3, channel 2
dim 4); the identity map spans 0..1 over n voxels, so voxel i sits at
``i / (n - 1)``. A *displacement field* is a map minus the identity.

These functions are the reference semantics the fused kernels (``kernels/``)
must reproduce; the engine calls only these, so a kernel slots in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    grid = coords.flip(1).permute(0, 2, 3, 4, 1) * 2.0 - 1.0  # (x, y, z) order, [-1, 1]
    if grid.shape[0] == 1 and image.shape[0] != 1:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def compose_maps(displacement: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Map ``x -> x + displacement(x)`` evaluated at ``coords``; the field repeats its border."""
    return coords + warp(displacement, coords, padding="border")

