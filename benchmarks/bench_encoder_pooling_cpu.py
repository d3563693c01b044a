#!/usr/bin/env python
"""The U-Net encoder's pooled path on the CPU: ``model.half_resolution`` (a depthwise convolution
for even channels-last float32 grids) against ``F.avg_pool3d(x, 2, ceil_mode=True)``.

Per encoder level of a full-resolution U-Net of the official architecture (the tensors each level
pools, channels-last as the network has them): median time of the forward and of forward +
backward, and the largest difference. End to end, in one process: ``Engine.predict_map`` (no IO)
and one IO call (``instance_optimize``, one step and the final forward), randomized official
weights, with ``F.avg_pool3d`` everywhere and with ``half_resolution``.

    .venv/bin/python benchmarks/bench_encoder_pooling_cpu.py
    .venv/bin/python benchmarks/bench_encoder_pooling_cpu.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import cpu_benchmark_parser, machine_line  # noqa: E402

from mgr_engine import model  # noqa: E402


def average_pooling(x):
    return F.avg_pool3d(x, 2, ceil_mode=True)


def level_rows(shape, repeats):
    """(channels and grid, forward ms each way, forward + backward ms each way, difference) for
    the tensor each encoder level pools: level k's input, down_channels[k] channels."""
    channels, grid, rows = model.NetworkConfig(input_shape=shape).down_channels, list(shape), []
    gen = torch.Generator().manual_seed(0)
    for level in range(len(channels) - 1):
        x = torch.randn(1, channels[level], *grid, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        pooled = average_pooling(x)
        grad = torch.randn(pooled.shape, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        times = []
        for pool in (average_pooling, model.half_resolution):
            with torch.no_grad():
                forward = timed(lambda: pool(x), "cpu", repeats)
            both = timed(lambda: torch.autograd.grad(pool(x), x, grad), "cpu", repeats)
            times.append((forward, both))
        difference = float((model.half_resolution(x) - pooled).detach().abs().max())
        rows.append((f"{channels[level]} x {'x'.join(map(str, grid))}", times, difference))
        grid = [(n + 1) // 2 for n in grid]
    return rows


def main(argv=None) -> int:
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    shape = tuple(args.shape)
    print(f"{machine_line()}, network input {shape}, median of {args.repeats}\n")
    print("| pooled tensor | forward avg_pool3d | forward half_resolution | forward + backward avg_pool3d "
          "| forward + backward half_resolution | difference |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, ((f_pool, b_pool), (f_ours, b_ours)), difference in level_rows(shape, args.repeats):
        print(f"| {name} | {f_pool * 1e3:.2f} ms | {f_ours * 1e3:.2f} ms | {b_pool * 1e3:.2f} ms | {b_ours * 1e3:.2f} ms "
              f"| {difference:.1e} |")
    if args.skip_end_to_end:
        return 0

    from helpers import benchmark_engine

    engine, moving, fixed = benchmark_engine(shape)
    results = {}
    for label in ("avg_pool3d", "half_resolution", "avg_pool3d again", "half_resolution again"):
        pool = average_pooling if label.startswith("avg_pool3d") else model.half_resolution
        with mock.patch.object(model, "half_resolution", pool):
            predict = timed(lambda: engine.predict_map(moving, fixed), "cpu", args.repeats)
            io = timed(lambda: engine.instance_optimize(moving, fixed, iterations=1, progress=False), "cpu", 1,
                       warmups=0)
            results[label] = predict, io, engine.predict_map(moving, fixed)
    voxels = torch.tensor(shape).view(1, 3, 1, 1, 1) - 1
    difference = float(((results["half_resolution"][2] - results["avg_pool3d"][2]) * voxels).abs().max())
    print("\n| end to end (alternated) | Engine.predict_map | one IO call (1 step + final forward) |\n|---|--:|--:|")
    for label, (predict, io, _) in results.items():
        print(f"| {label} | {predict:.3f} s | {io:.2f} s |")
    print(f"\nmaps differ by at most {difference:.1e} voxel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
