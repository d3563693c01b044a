#!/usr/bin/env python
"""Where the time of a registration and of an IO step goes: torch.profiler's operators sorted
by their own device time, for issue 3 item 4 (fuse only what a profile shows pays).

Randomized official-architecture weights, two smooth volumes, on tensors (no itk needed).
Profiled after a warm-up of each: one ``Engine.predict_map`` (no IO) and ``--io-steps``
steps of ``Engine.instance_optimize`` with 1 - LNCC^2, on a GPU also in TF32 and tf32x3, and with
MIND-SSC (whose descriptor is PyTorch ops there).

    python benchmarks/profile_gpu.py --out profile.md                      # GPU, 175^3
    python benchmarks/profile_gpu.py --device cpu --shape 72 72 72 --rows 10   # a check on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def profiled(fn, device, rows):
    """``fn()`` under the profiler: the table of its top ``rows`` operators by own time. On a GPU
    also by own host time, and the wall time: host work the device waits for (the regularizer's
    noise is drawn on the CPU, say) shows as wall time above the device time total."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    if device != "cuda":
        return (events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
                + convolutions_by_shape(prof, "self_cpu_time_total", rows))
    return (f"wall time {wall:.3f} s under the profiler, against the table's device time total\n\n"
            + events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
            + "\nby own host time:\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=min(rows, 12), max_name_column_width=60)
            + convolutions_by_shape(prof, "device_time_total", rows))


def convolutions_by_shape(prof, time_key, rows):
    """The convolution operators (forward, transposed, backward) by input and weight shape, by
    ``time_key``: which layers' weight gradients take an IO step's time (61% on an H200)."""
    averages = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key in ("aten::convolution_backward", "aten::cudnn_convolution", "aten::cudnn_convolution_transpose",
                             "aten::mkldnn_convolution")]
    averages = sorted(averages, key=lambda e: getattr(e, time_key), reverse=True)[:rows]
    lines = [f"\nconvolutions by input shapes ({time_key.replace('_', ' ')}, ms):",
             f"{'operator':36} {'calls':>5} {'ms':>9}  input shapes"]
    lines += [f"{e.key:36} {e.count:5d} {getattr(e, time_key) / 1e3:9.3f}  {e.input_shapes[:3]}" for e in averages]
    return "\n".join(lines) + "\n"


def first_call_profile(no_io, device, rows, title):
    """``no_io()``, this process's first registration, under the profiler by host time, after the
    process-wide warm-up that bench_gpu's first calls also get (small convolutions, sampling)."""
    from bench_gpu import warm_up_process

    warm_up_process(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        no_io()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return (f"## Profile of a process's first registration, {title}, torch {torch.__version__}\n\n"
            f"```\nwall time {wall:.3f} s under the profiler\n\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
            + "\n```\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    p.add_argument("--io-steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", type=Path, help="append the tables to this file")
    p.add_argument("--first-call", action="store_true",
                   help="profile only this process's first registration (its one-time set-up), by host time")
    args = p.parse_args(argv)
    device, shape = args.device, tuple(args.shape)

    from helpers import benchmark_engine

    engine, moving, fixed = benchmark_engine(shape, device)

    def no_io():
        engine.predict_map(moving, fixed)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    if args.first_call:  # a fresh process: what a first registration pays once (cuDNN, Triton, CUDA's loading)
        text = first_call_profile(no_io, device, args.rows, f"{name}, network {'x'.join(map(str, shape))}")
    else:
        def io(steps, precision="fp32", similarity="lncc2"):
            engine.instance_optimize(moving, fixed, iterations=steps, similarity=similarity, progress=False,
                                     precision=precision)

        no_io()  # warm-ups: cuDNN's plans, Triton's compilation
        io(1)
        text = (f"## Profile, {name}, network {'x'.join(map(str, shape))}, torch {torch.__version__}\n\n"
                f"### no IO: one predict_map\n\n```\n{profiled(no_io, device, args.rows)}\n```\n\n"
                f"### IO: {args.io_steps} steps of instance_optimize (1 - LNCC^2) and the final forward\n\n"
                f"```\n{profiled(lambda: io(args.io_steps), device, args.rows)}\n```\n")
        # on CUDA: IO in TF32 (opt-in, 4.5x the reference's fp32 IO on an H200): what is left then; in
        # tf32x3 (three TF32 products a convolution, float32's accuracy): what the splits cost
        for precision in ("tf32", "tf32x3") if device == "cuda" else ():
            io(1, precision)
            text += (f"\n### IO in {precision}: {args.io_steps} steps of instance_optimize(precision='{precision}')"
                     f"\n\n```\n{profiled(lambda: io(args.io_steps, precision), device, args.rows)}\n```\n")
        if device == "cuda":  # MIND-SSC's descriptor is PyTorch ops on a GPU: would a Triton kernel pay?
            io(1, similarity="mind")
            text += (f"\n### IO with MIND-SSC: {args.io_steps} steps of instance_optimize(similarity='mind')"
                     f"\n\n```\n{profiled(lambda: io(args.io_steps, similarity='mind'), device, args.rows)}\n```\n")
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
