#!/usr/bin/env python
"""The C++ last convolution of the U-Nets (kernels/last_conv_cpu.py) against ``F.conv3d`` on the CPU.

Per op, at the full-resolution U-Nets' size (18 -> 3 channels at 175^3 by default) and the
half-resolution one's: median time and allocated memory of the forward and of forward +
backward (gradients to input, weight and bias), PyTorch (oneDNN) against C++, channels-last
inputs as the engine's network has them. End to end, with randomized official weights, in one
process: ``Engine.predict_map`` (no IO, warm median) and one IO call (``instance_optimize`` with
one step: forward + backward of the GradICON objective, an Adam step, the final forward), with
every C++ kernel, and with every C++ kernel but this one. And the C++ op in each vector width
the CPU runs (64 bytes: AVX-512, 32: AVX2 + FMA, 16: SSE2), as CPUs without AVX-512 run it.

    .venv/bin/python benchmarks/bench_last_conv_cpu.py
    .venv/bin/python benchmarks/bench_last_conv_cpu.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import allocated_mib, cpu_benchmark_parser, exit_unless_built, machine_line  # noqa: E402

from mgr_engine import model  # noqa: E402
from mgr_engine.kernels import last_conv_cpu  # noqa: E402


def op_timings(op, shape, cin, repeats):
    """Median seconds of ``op`` (the C++ op or its reference) forward and forward + backward (all
    three gradients) on seeded inputs (channels-last x, as the network has it), then the
    allocated MiB of each and their results."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, *shape, generator=gen).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weight = (0.1 * torch.randn(3, cin, 3, 3, 3, generator=gen)).requires_grad_()
    bias = torch.randn(3, generator=gen).requires_grad_()
    grad_out = torch.randn(1, 3, *shape, generator=gen)

    def forward():
        with torch.no_grad():
            return op(x, weight, bias)

    def forward_backward():
        return torch.autograd.grad(op(x, weight, bias), (x, weight, bias), grad_out)

    return (timed(forward, "cpu", repeats), timed(forward_backward, "cpu", repeats),
            allocated_mib(forward), allocated_mib(forward_backward), forward(), forward_backward())


def op_rows(shape, cin, repeats):
    ref, ours = (op_timings(op, shape, cin, repeats) for op in (last_conv_cpu.reference, last_conv_cpu.last_conv))
    out_difference = float((ours[4] - ref[4]).abs().max())
    grad_difference = max(float((a - b).norm() / b.norm()) for a, b in zip(ours[5], ref[5]))
    return ref, ours, out_difference, grad_difference


def width_rows(shape, cin, repeats):
    """(vector bytes, forward seconds, forward + backward seconds) of the C++ op in each vector
    width this CPU runs, widest first: the passes an AVX2-only (32) or older (16) CPU takes."""
    rows = []
    try:
        for cap in (64, 32, 16):
            if last_conv_cpu.vector_bytes(cap) == cap:
                rows.append((cap, *op_timings(last_conv_cpu.last_conv, shape, cin, repeats)[:2]))
    finally:
        last_conv_cpu.vector_bytes(0)
    return rows


def end_to_end(shape, repeats):
    from helpers import benchmark_engine

    engine, moving, fixed = benchmark_engine(shape)
    results = {}
    for label, patch in (("without", mock.patch.object(model, "use_cpp_last_conv", lambda *args: False)),
                         ("with", contextlib.nullcontext())):
        with patch:
            predict = timed(lambda: engine.predict_map(moving, fixed), "cpu", repeats)
            io = timed(lambda: engine.instance_optimize(moving, fixed, iterations=1, progress=False), "cpu",
                       max(1, repeats // 2))
            phi = engine.predict_map(moving, fixed)
        results[label] = predict, io, phi
    voxels = torch.tensor(shape).view(1, 3, 1, 1, 1) - 1
    difference = float(((results["with"][2] - results["without"][2]) * voxels).abs().max())
    return results["without"][:2], results["with"][:2], difference


def main(argv=None) -> int:
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(last_conv_cpu.available(), "_last_conv_cpu")
    shape = tuple(args.shape)
    config = model.NetworkConfig(input_shape=shape)
    cin = config.down_channels[0] + config.up_channels[0]
    half = tuple((n + 1) // 2 for n in shape)
    print(f"{machine_line(last_conv_cpu.vector_bytes())}, median of {args.repeats}\n")
    print("| last conv (Cin -> 3) | forward PyTorch | forward C++ | speed-up | forward + backward PyTorch "
          "| forward + backward C++ | speed-up | allocated PyTorch (f+b) | allocated C++ (f+b) | difference |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for grid in (shape, half):
        ref, ours, out_diff, grad_diff = op_rows(grid, cin, args.repeats)
        print(f"| {cin} -> 3 at {grid} | {ref[0] * 1e3:.0f} ms | {ours[0] * 1e3:.0f} ms | {ref[0] / ours[0]:.2f}x "
              f"| {ref[1] * 1e3:.0f} ms | {ours[1] * 1e3:.0f} ms | {ref[1] / ours[1]:.2f}x | {ref[3]:.0f} MiB "
              f"| {ours[3]:.0f} MiB | {out_diff:.1e} / {grad_diff:.1e} |")
    print("(difference: output, largest absolute / gradients, largest relative L2)")
    print(f"\n| C++ at {shape}, vectors of | forward | forward + backward |\n|---|--:|--:|")
    for width, forward, forward_backward in width_rows(shape, cin, args.repeats):
        print(f"| {width} bytes | {forward * 1e3:.0f} ms | {forward_backward * 1e3:.0f} ms |")
    if not args.skip_end_to_end:
        (p0, io0), (p1, io1), difference = end_to_end(shape, max(2, args.repeats // 2))
        print(f"\nEngine.predict_map (no IO): PyTorch last conv {p0:.2f} s, C++ {p1:.2f} s ({p0 / p1:.2f}x); "
              f"maps differ by at most {difference:.1e} voxel")
        print(f"IO call with one step (objective forward + backward, Adam step, final forward): PyTorch last conv "
              f"{io0:.1f} s, C++ {io1:.1f} s ({io0 / io1:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
