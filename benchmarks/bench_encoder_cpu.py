#!/usr/bin/env python
"""The C++ first encoder level of the U-Nets (kernels/encoder_cpu.py) against the PyTorch ops the
U-Net runs otherwise, on the CPU.

At the first level of a full-resolution U-Net (175^3 by default: the two images, 2 -> 16
channels) and of a half-resolution one (88^3), channels-last as the engine runs them: median
time of the forward and of the backward (the gradients to the input, the weight and the bias, as
IO needs them) of PyTorch's ops (``low_memory_conv`` plus ``half_resolution``, the U-Net's own
path under ``kernel_mode("torch")``) and of the C++ kernel (in each vector width the CPU runs:
64 bytes AVX-512, 32 AVX2 + FMA, 16 SSE2), the memory each allocates (torch.profiler's CPU
memory events), and the largest difference of each from float64's. End to end, in one process: a
warm ``predict_map`` without IO (PyTorch's ops and the kernel alternated, three rounds) and one IO
call (``instance_optimize`` with one step), with PyTorch's ops, then with the kernel.

    .venv/bin/python benchmarks/bench_encoder_cpu.py
    .venv/bin/python benchmarks/bench_encoder_cpu.py --shape 96 96 96 --repeats 3   # quick

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
from bench_warp_cpu import (allocated_mib, cpu_benchmark_parser, exit_unless_built, io_call_seconds,  # noqa: E402
                            machine_line, markdown_table, predict_map_seconds)

from mgr_engine import host_memory, model, ops  # noqa: E402
from mgr_engine.kernels import encoder_cpu  # noqa: E402

CL = torch.channels_last_3d


def encoder_level(x, conv, kernel: bool):
    """The U-Net's first encoder level: the C++ kernel, or the PyTorch ops
    :meth:`mgr_engine.model.UNet.forward` runs otherwise."""
    if kernel:
        return encoder_cpu.encoder_level(x, conv.weight, conv.bias, model.LEAKY_SLOPE)
    with ops.kernel_mode("torch"):
        y = model.low_memory_conv(conv, x)
        return y + model._match_channels(model.half_resolution(x), y.shape[1])


def level_rows(shape, repeats):
    widths = [w for w in (64, 32, 16) if encoder_cpu.vector_bytes(w) == w]
    encoder_cpu.vector_bytes(0)
    rows = []
    for level in (0, 1):
        grid = [math.ceil(n / 2**level) for n in shape]
        gen = torch.Generator().manual_seed(level)
        conv = torch.nn.Conv3d(2, 16, 3, stride=2, padding=1)
        x = torch.rand(1, 2, *grid, generator=gen).contiguous(memory_format=CL).requires_grad_()
        grad = torch.randn(1, 16, *(math.ceil(n / 2) for n in grid), generator=gen).contiguous(memory_format=CL)
        leaves = (x, conv.weight, conv.bias)
        conv64 = torch.nn.Conv3d(2, 16, 3, stride=2, padding=1).double()
        conv64.load_state_dict(conv.state_dict())
        x64 = x.detach().double().contiguous(memory_format=CL).requires_grad_()
        exact_out = encoder_level(x64, conv64, kernel=False)
        exact = (exact_out.detach(), *torch.autograd.grad(exact_out, (x64, conv64.weight, conv64.bias), grad.double()))

        def measure(kernel):
            forward = timed(lambda: encoder_level(x, conv, kernel), "cpu", repeats)
            out = encoder_level(x, conv, kernel)
            backward = timed(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), "cpu", repeats)
            mib = allocated_mib(lambda: torch.autograd.grad(encoder_level(x, conv, kernel), leaves, grad))
            results = (out.detach(), *torch.autograd.grad(out, leaves, grad))
            error = max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(results, exact))
            return forward, backward, mib, error

        cells = [f"2 -> 16 at {'x'.join(map(str, grid))}"]
        forward, backward, mib, error = measure(kernel=False)
        cells.append(f"{forward * 1e3:.1f} / {backward * 1e3:.1f} ms, {mib:.0f} MiB, {error:.1e}")
        for width in widths:
            encoder_cpu.vector_bytes(width)
            forward_c, backward_c, mib, error = measure(kernel=True)
            cells.append(f"{forward_c * 1e3:.1f} / {backward_c * 1e3:.1f} ms ({forward / forward_c:.1f}x / "
                         f"{backward / backward_c:.1f}x), {mib:.0f} MiB, {error:.1e}")
        encoder_cpu.vector_bytes(0)
        rows.append(cells)
    header = (["level (input grid)", "PyTorch: forward / backward, allocated, error vs float64"]
              + [f"C++ {w} bytes" for w in widths])
    return header, rows


def main(argv=None):
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(encoder_cpu.available(), "_encoder_cpu")
    host_memory.keep_freed_memory()  # as the engine does: no page faults of fresh memory in the times
    shape = tuple(args.shape)
    print(machine_line(encoder_cpu.vector_bytes()) + "\n")
    print(markdown_table(*level_rows(shape, args.repeats)))
    if not args.skip_end_to_end:
        pytorch_ops = mock.patch.object(model, "use_cpp_encoder_level", lambda *a: False)
        pytorch, ours = predict_map_seconds(shape, args.repeats, pytorch_ops)
        print(f"\npredict_map at {'x'.join(map(str, shape))} (no IO, warm, median of 3 alternated rounds' medians "
              f"of {args.repeats}): PyTorch's ops "
              f"{pytorch:.3f} s, C++ {ours:.3f} s ({pytorch / ours:.2f}x)")
        pytorch, ours = io_call_seconds(shape, args.repeats, pytorch_ops)
        print(f"one IO call at {'x'.join(map(str, shape))} (one step and the final forward, median of "
              f"{args.repeats}): PyTorch's ops {pytorch:.2f} s, C++ {ours:.2f} s ({pytorch / ours:.2f}x)")


if __name__ == "__main__":
    main()
