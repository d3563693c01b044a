#!/usr/bin/env python
"""The C++ transposed convolutions of the U-Nets (kernels/upconv_cpu.py), forward and input
gradient (Winograd) and weight gradient, against oneDNN's (``conv_transpose3d``, ``convolution_backward``) on the CPU.

Per decoder level of a full-resolution U-Net (175^3 by default: 48 -> 16 channels at 88^3, 96 ->
32 at 44^3, 192 -> 64 at 22^3, 512 -> 128 at 11^3), channels-last tensors as the engine has them:
median time and rate of oneDNN's op and of the C++ one (in each vector width the CPU runs: 64
bytes AVX-512, 32 AVX2 + FMA, 16 SSE2; the rate counts the direct sums' products for both), their
largest error against float64's, and which the engine takes (:func:`upconv_cpu.takes_forward`,
:func:`upconv_cpu.takes_input_grad`, :func:`upconv_cpu.takes`). The forward is of
``leaky_relu(x)``, as the network's (the C++ kernel applies it as it reads), the input gradient
through it (oneDNN's followed by ``leaky_relu_backward``, as the engine ran it). End to end, in
one process: a warm ``predict_map`` (no IO; oneDNN's forward and the C++ one alternated, three
rounds), one IO call (``instance_optimize`` with one step) with oneDNN's forward then the C++ one,
and the same for the input gradient and for the weight gradient.

    .venv/bin/python benchmarks/bench_upconv_cpu.py
    .venv/bin/python benchmarks/bench_upconv_cpu.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import (cpu_benchmark_parser, exit_unless_built, io_call_seconds, machine_line,  # noqa: E402
                            markdown_table, predict_map_seconds)

from mgr_engine import host_memory, model  # noqa: E402
from mgr_engine.kernels import upconv_cpu  # noqa: E402

CL = torch.channels_last_3d
LEVELS = ((48, 16), (96, 32), (192, 64), (512, 128))  # input, output channels, finest first


def level_inputs(shape, level, cin, cout):
    """The level's channels-last input and output gradient and its weight and bias (seed: the level)."""
    grid = [math.ceil(n / 2 ** (level + 1)) for n in shape]  # the transposed convolution's input
    gen = torch.Generator().manual_seed(level)
    x = torch.randn(1, cin, *grid, generator=gen).contiguous(memory_format=CL)
    grad = torch.randn(1, cout, *(2 * n for n in grid), generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(cin, cout, 4, 4, 4, generator=gen) / (8 * cin) ** 0.5
    return grid, x, grad, weight, torch.randn(cout, generator=gen)


def level_rows(shape, repeats, op):
    """One table row per level for ``op``: "forward", "input gradient" or "weight gradient"."""
    widths = [w for w in (64, 32, 16) if upconv_cpu.vector_bytes(w) == w]
    upconv_cpu.vector_bytes(0)
    rows = []
    for level, (cin, cout) in enumerate(LEVELS):
        grid, x, grad, weight, bias = level_inputs(shape, level, cin, cout)
        if op == "forward":
            slope = model.LEAKY_SLOPE
            onednn_op = lambda: upconv_cpu.forward_reference(x, weight, bias, slope)  # noqa: E731
            cpp_op = lambda: upconv_cpu.forward(x, weight, bias, slope)  # noqa: E731
            exact = upconv_cpu.forward_reference(x.double(), weight.double(), bias.double(), slope)
            takes = upconv_cpu.takes_forward(x, weight, bias)
        elif op == "input gradient":
            slope = model.LEAKY_SLOPE
            onednn_op = lambda: upconv_cpu.input_grad_reference(grad, weight, x, slope)  # noqa: E731
            cpp_op = lambda: upconv_cpu.input_grad(grad, weight, x, slope)  # noqa: E731
            exact = upconv_cpu.input_grad_reference(grad.double(), weight.double(), x.double(), slope)
            takes = upconv_cpu.takes_input_grad(grad, weight, x)
        else:
            onednn_op = lambda: upconv_cpu.reference(x, grad, weight)  # noqa: E731
            cpp_op = lambda: upconv_cpu.weight_grad(x, grad)  # noqa: E731
            exact = upconv_cpu.reference(x.double(), grad.double(), weight.double())
            takes = upconv_cpu.takes(x, grad, weight)
        flops = 2 * x.numel() * cout * 64
        onednn = timed(onednn_op, "cpu", repeats)
        cells = [f"{cin} -> {cout} at {'x'.join(map(str, grid))}", f"{onednn * 1e3:.0f} ms ({flops / onednn / 1e9:.0f})"]
        for width in widths:
            upconv_cpu.vector_bytes(width)
            seconds = timed(cpp_op, "cpu", repeats)
            cells.append(f"{seconds * 1e3:.0f} ms ({flops / seconds / 1e9:.0f}, {onednn / seconds:.2f}x)")
        upconv_cpu.vector_bytes(0)
        errors = [float((result.double() - exact).abs().max() / exact.abs().max())
                  for result in (onednn_op(), cpp_op())]
        cells += [f"{errors[0]:.1e} / {errors[1]:.1e}", "C++" if takes else "oneDNN"]
        rows.append(cells)
    header = ([f"{op}: layer (input grid)", "oneDNN (GFLOP/s)"]
              + [f"C++ {w} bytes (GFLOP/s, speed-up)" for w in widths]
              + ["error vs float64, oneDNN / C++", "engine takes"])
    return header, rows


def main(argv=None):
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(upconv_cpu.available(), "_upconv_cpu")
    host_memory.keep_freed_memory()  # as the engine does: no page faults of fresh memory in the times
    shape = tuple(args.shape)
    print(machine_line(upconv_cpu.vector_bytes()))
    for op in ("forward", "input gradient", "weight gradient"):
        print("\n" + markdown_table(*level_rows(shape, args.repeats, op)))
    if not args.skip_end_to_end:
        where = "x".join(map(str, shape))
        onednn_forward = mock.patch.object(model, "use_cpp_upconv_forward", lambda *a: False)
        onednn, ours = predict_map_seconds(shape, args.repeats, onednn_forward)
        print(f"\npredict_map at {where} (no IO, warm, median of 3 alternated rounds' medians of {args.repeats}): "
              f"oneDNN's forward {onednn:.3f} s, C++ {ours:.3f} s ({onednn / ours:.2f}x)")
        onednn, ours = io_call_seconds(shape, args.repeats, onednn_forward)
        print(f"one IO call at {where} (one step and the final forward, median of {args.repeats}): oneDNN's forward "
              f"{onednn:.2f} s, C++ {ours:.2f} s ({onednn / ours:.2f}x)")
        for name, switch in (("input", "use_cpp_upconv_input_grad"), ("weight", "use_cpp_upconv_weight_grad")):
            onednn, ours = io_call_seconds(shape, args.repeats, mock.patch.object(model, switch, lambda *t: False))
            print(f"one IO call at {where}: oneDNN's {name} gradient {onednn:.2f} s, C++ {ours:.2f} s "
                  f"({onednn / ours:.2f}x)")


if __name__ == "__main__":
    main()
