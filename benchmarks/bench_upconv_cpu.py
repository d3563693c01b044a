#!/usr/bin/env python
"""The C++ weight gradient of the U-Nets' transposed convolutions (kernels/upconv_cpu.py) against
oneDNN's (``convolution_backward``) on the CPU.

Per decoder level of a full-resolution U-Net (175^3 by default: 48 -> 16 channels at 88^3, 96 ->
32 at 44^3, 192 -> 64 at 22^3, 512 -> 128 at 11^3), channels-last tensors as IO has them: median
time and rate of oneDNN's weight gradient and of the C++ one (in each vector width the CPU runs:
64 bytes AVX-512, 32 AVX2 + FMA, 16 SSE2), their largest error against float64's, and which the
engine takes (:func:`upconv_cpu.takes`). End to end, in one process: one IO call
(``instance_optimize`` with one step) with oneDNN's weight gradient, then with the C++ one.

    .venv/bin/python benchmarks/bench_upconv_cpu.py
    .venv/bin/python benchmarks/bench_upconv_cpu.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import cpu_benchmark_parser, exit_unless_built, io_call_seconds  # noqa: E402

from mgr_engine import model  # noqa: E402
from mgr_engine.kernels import upconv_cpu  # noqa: E402

CL = torch.channels_last_3d
LEVELS = ((48, 16), (96, 32), (192, 64), (512, 128))  # input, output channels, finest first


def level_rows(shape, repeats):
    widths = [w for w in (64, 32, 16) if upconv_cpu.vector_bytes(w) == w]
    upconv_cpu.vector_bytes(0)
    rows = []
    for level, (cin, cout) in enumerate(LEVELS):
        grid = [math.ceil(n / 2 ** (level + 1)) for n in shape]  # the transposed convolution's input
        gen = torch.Generator().manual_seed(level)
        x = torch.randn(1, cin, *grid, generator=gen).contiguous(memory_format=CL)
        grad = torch.randn(1, cout, *(2 * n for n in grid), generator=gen).contiguous(memory_format=CL)
        weight = torch.randn(cin, cout, 4, 4, 4, generator=gen)
        exact = upconv_cpu.reference(x.double(), grad.double(), weight.double())
        flops = 2 * x.numel() * cout * 64
        onednn = timed(lambda: upconv_cpu.reference(x, grad, weight), "cpu", repeats)
        cells = [f"{cin} -> {cout} at {'x'.join(map(str, grid))}", f"{onednn * 1e3:.0f} ms ({flops / onednn / 1e9:.0f})"]
        for width in widths:
            upconv_cpu.vector_bytes(width)
            seconds = timed(lambda: upconv_cpu.weight_grad(x, grad), "cpu", repeats)
            cells.append(f"{seconds * 1e3:.0f} ms ({flops / seconds / 1e9:.0f})")
        upconv_cpu.vector_bytes(0)
        errors = [float((result.double() - exact).abs().max() / exact.abs().max())
                  for result in (upconv_cpu.reference(x, grad, weight), upconv_cpu.weight_grad(x, grad))]
        cells += [f"{errors[0]:.1e} / {errors[1]:.1e}", "C++" if upconv_cpu.takes(x, grad, weight) else "oneDNN"]
        rows.append(cells)
    header = (["layer (input grid)", "oneDNN (GFLOP/s)"] + [f"C++ {w} bytes (GFLOP/s)" for w in widths]
              + ["error vs float64, oneDNN / C++", "engine takes"])
    return header, rows


def main(argv=None):
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(upconv_cpu.available(), "_upconv_cpu")
    shape = tuple(args.shape)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; widest vectors {upconv_cpu.vector_bytes()} bytes\n")
    header, rows = level_rows(shape, args.repeats)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not args.skip_end_to_end:
        onednn, ours = io_call_seconds(shape, args.repeats,
                                       mock.patch.object(model, "use_cpp_upconv_weight_grad", lambda *t: False))
        print(f"\none IO call at {'x'.join(map(str, shape))} (one step and the final forward, median of "
              f"{args.repeats}): oneDNN's weight gradient {onednn:.2f} s, C++ {ours:.2f} s ({onednn / ours:.2f}x)")


if __name__ == "__main__":
    main()
