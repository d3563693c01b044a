#!/usr/bin/env python
"""What an IO step keeps for its backward pass, by the autograd node that keeps it.

Builds the GradICON objective of one instance-optimization step as ``Engine.instance_optimize``
does (randomized official weights, two smooth volumes, 1-LNCC^2), then walks the autograd
graph from the loss: every tensor a node saved for backward, each storage counted once (for
the first node that holds it, in the walk's order from the loss), summed per node type and per
tensor shape. This is the activation memory a step holds at the end of its forward pass, where
its peak lies; the weights, their gradients and Adam's moments come on top.

    .venv/bin/python benchmarks/profile_io_memory.py                       # CPU, 175^3
    python benchmarks/profile_io_memory.py --device cuda                   # GPU
    .venv/bin/python benchmarks/profile_io_memory.py --shape 96 96 96      # quick

Needs no itk.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def io_step_loss(engine, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The loss of one IO step's forward pass on ``engine``'s network, built as
    ``Engine.instance_optimize`` builds it (1-LNCC^2, fp32, seeded regularizer noise), its
    autograd graph alive. Leaves the network's parameters requiring gradients."""
    from mgr_engine.engine import gradicon_objective
    from mgr_engine.losses import similarity_by_name, with_constant_targets

    network = engine.network.requires_grad_(True)
    with engine._precision("fp32"):
        loss, _, _ = gradicon_objective(network, moving, fixed, with_constant_targets(similarity_by_name("lncc2")),
                                        generator=torch.Generator().manual_seed(0))
    return loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--rows", type=int, default=15, help="rows of the per-shape table")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)

    from helpers import benchmark_engine, kept_for_backward

    engine, moving, fixed = benchmark_engine(shape, args.device, cache_host_memory=False)
    total, by_shape = kept_for_backward(io_step_loss(engine, moving, fixed))
    by_type = collections.Counter()
    for (kind, _), (_, nbytes) in by_shape.items():
        by_type[kind] += nbytes
    parameters = sum(p.numel() * p.element_size() for p in engine.network.parameters())

    mib = 2**20
    print(f"{args.device}, torch {torch.__version__}, network input {shape}: kept for backward "
          f"{total / 2**30:.2f} GiB (weights {parameters / 2**30:.2f} GiB; the weights, their gradients and "
          f"Adam's two moments take {4 * parameters / 2**30:.2f} GiB besides)\n")
    print("| node that keeps it | MiB | share |")
    print("|---|--:|--:|")
    for kind, nbytes in by_type.most_common():
        if nbytes >= mib:
            print(f"| {kind} | {nbytes / mib:.0f} | {nbytes / total:.0%} |")
    print("\n| node, tensor shape | tensors | MiB |")
    print("|---|--:|--:|")
    rows = sorted(by_shape.items(), key=lambda item: -item[1][1])[: args.rows]
    for (kind, size), (count, nbytes) in rows:
        print(f"| {kind} {size} | {count} | {nbytes / mib:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
