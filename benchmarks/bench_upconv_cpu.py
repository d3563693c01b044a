#!/usr/bin/env python
"""The C++ transposed convolutions of the U-Nets (kernels/upconv_cpu.py), forward and backward
(Winograd) and weight gradient (direct sums), against oneDNN's (``conv_transpose3d``,
``convolution_backward``) on the CPU.

Per decoder level of a full-resolution U-Net (175^3 by default: 48 -> 16 channels at 88^3, 96 ->
32 at 44^3, 192 -> 64 at 22^3, 512 -> 128 at 11^3), channels-last tensors as the engine has them:
median time and rate of oneDNN's op and of the C++ one (in each vector width the CPU runs: 64
bytes AVX-512, 32 AVX2 + FMA, 16 SSE2; the rate counts the direct sums' products for both), their
largest error against float64's, and which the engine takes (:func:`upconv_cpu.takes_forward`,
:func:`upconv_cpu.takes_backward`, :func:`upconv_cpu.takes`). The layer's input goes through the
leaky ReLU, as the network's: the C++ kernels apply it (and its derivative) themselves, oneDNN's
ops get ``leaky_relu(x)`` (and ``leaky_relu_backward`` after the input gradient), as the engine
ran them. The last table compares one Winograd backward call with the engine's path before it
(oneDNN's input gradient, the direct weight gradient). End to end, in one process: a warm
``predict_map`` (no IO; oneDNN's forward and the C++ one alternated, three rounds), one IO call
(``instance_optimize`` with one step) with oneDNN's forward then the C++ one, and one with the
backward pass before the Winograd one, then with it.

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


def relative_error(result, exact) -> float:
    """The largest difference from float64's ``exact`` over its largest magnitude (of each of a
    tuple's tensors, the largest)."""
    if isinstance(exact, tuple):
        return max(relative_error(r, e) for r, e in zip(result, exact))
    return float((result.double() - exact).abs().max() / exact.abs().max())


def level_rows(shape, repeats, op):
    """One table row per level for ``op``: "forward", "input gradient", "weight gradient" (oneDNN's
    against the C++ direct sums), "weight gradient, Winograd" or "both gradients" (the engine's
    path before the Winograd backward: oneDNN's input gradient, the C++ direct weight gradient
    where it took it, against the Winograd backward's one call)."""
    widths = [w for w in (64, 32, 16) if upconv_cpu.vector_bytes(w) == w]
    upconv_cpu.vector_bytes(0)
    slope = model.LEAKY_SLOPE
    rows = []
    for level, (cin, cout) in enumerate(LEVELS):
        grid, x, grad, weight, bias = level_inputs(shape, level, cin, cout)
        activated, winograd = torch.nn.functional.leaky_relu(x, slope), upconv_cpu.takes_backward(grad, weight, x)
        if op == "forward":
            onednn_op = lambda: upconv_cpu.forward_reference(x, weight, bias, slope)  # noqa: E731
            cpp_op = lambda: upconv_cpu.forward(x, weight, bias, slope)  # noqa: E731
            exact = upconv_cpu.forward_reference(x.double(), weight.double(), bias.double(), slope)
            takes = "C++" if upconv_cpu.takes_forward(x, weight, bias) else "oneDNN"
        elif op == "input gradient":
            onednn_op = lambda: upconv_cpu.input_grad_reference(grad, weight, x, slope)  # noqa: E731
            cpp_op = lambda: upconv_cpu.backward(grad, weight, x, slope, weight_grad=False)[0]  # noqa: E731
            exact = upconv_cpu.input_grad_reference(grad.double(), weight.double(), x.double(), slope)
            takes = "C++" if winograd else "oneDNN"
        elif op.startswith("weight gradient"):
            onednn_op = lambda: upconv_cpu.reference(activated, grad, weight)  # noqa: E731
            cpp_op = ((lambda: upconv_cpu.backward(grad, weight, x, slope, input_grad=False)[1]) if op.endswith("Winograd")
                      else (lambda: upconv_cpu.weight_grad(activated, grad)))
            exact = upconv_cpu.reference(activated.double(), grad.double(), weight.double())
            takes = ("Winograd" if winograd else "direct" if upconv_cpu.takes(activated, grad, weight)
                     else "oneDNN")
        else:
            def onednn_op():  # the engine's path before: one oneDNN call, or two with the C++ weight gradient
                direct = upconv_cpu.takes(activated, grad, weight)
                gx, gw = torch.ops.aten.convolution_backward(grad, activated, weight, None, [2] * 3, [1] * 3, [1] * 3,
                                                             True, [0] * 3, 1, [True, not direct, False])[:2]
                gx = torch.ops.aten.leaky_relu_backward(gx, x, slope, False)
                return gx, upconv_cpu.weight_grad(activated, grad) if direct else gw

            cpp_op = lambda: upconv_cpu.backward(grad, weight, x, slope)  # noqa: E731
            exact = (upconv_cpu.input_grad_reference(grad.double(), weight.double(), x.double(), slope),
                     upconv_cpu.reference(activated.double(), grad.double(), weight.double()))
            takes = "C++" if winograd else "oneDNN"
        flops = 2 * x.numel() * cout * 64 * (2 if op == "both gradients" else 1)
        onednn = timed(onednn_op, "cpu", repeats)
        cells = [f"{cin} -> {cout} at {'x'.join(map(str, grid))}", f"{onednn * 1e3:.0f} ms ({flops / onednn / 1e9:.0f})"]
        for width in widths:
            upconv_cpu.vector_bytes(width)
            seconds = timed(cpp_op, "cpu", repeats)
            cells.append(f"{seconds * 1e3:.0f} ms ({flops / seconds / 1e9:.0f}, {onednn / seconds:.2f}x)")
        upconv_cpu.vector_bytes(0)
        errors = [relative_error(result, exact) for result in (onednn_op(), cpp_op())]
        cells += [f"{errors[0]:.1e} / {errors[1]:.1e}", takes]
        rows.append(cells)
    baseline = "before (GFLOP/s)" if op == "both gradients" else "oneDNN (GFLOP/s)"
    header = ([f"{op}: layer (input grid)", baseline]
              + [f"C++ {w} bytes (GFLOP/s, speed-up)" for w in widths]
              + [f"error vs float64, {baseline.split()[0]} / C++", "engine takes"])
    return header, rows


def main(argv=None):
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(upconv_cpu.available(), "_upconv_cpu")
    host_memory.keep_freed_memory()  # as the engine does: no page faults of fresh memory in the times
    shape = tuple(args.shape)
    print(machine_line(upconv_cpu.vector_bytes()))
    for op in ("forward", "input gradient", "weight gradient", "weight gradient, Winograd", "both gradients"):
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
        onednn, ours = io_call_seconds(shape, args.repeats,
                                       mock.patch.object(model, "use_cpp_upconv_backward", lambda *t: False))
        print(f"one IO call at {where}: oneDNN's input gradient and the direct weight gradient {onednn:.2f} s, "
              f"the Winograd backward {ours:.2f} s ({onednn / ours:.2f}x)")


if __name__ == "__main__":
    main()
