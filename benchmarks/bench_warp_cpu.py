#!/usr/bin/env python
"""The C++ trilinear warp (kernels/warp_cpu.py) against PyTorch's grid_sample on the CPU.

Per op at full size (175^3 by default), for each thread count: median time of the warp of a
1-channel image (zero padding) and of the map composition (3-channel field, border padding),
PyTorch (``kernel_mode("torch")``) against C++ (``kernel_mode("cpp")``), and the memory each
call allocates (torch.profiler's CPU memory events: the output, plus the sampling grid that
grid_sample needs). End to end: ``Engine.predict_map`` (the network without IO: every warp
and composition of the TwoStep/DownSample nesting) with randomized weights, warm median,
both modes, and the largest difference between their maps (voxels).

    .venv/bin/python benchmarks/bench_warp_cpu.py
    .venv/bin/python benchmarks/bench_warp_cpu.py --shape 64 64 64 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.random_network: randomized weights

from mgr_engine import ops  # noqa: E402
from mgr_engine.kernels import warp_cpu  # noqa: E402

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)


def allocated_mib(fn):
    """MiB allocated by ``fn()``: the ops' own CPU allocations (torch.profiler), frees not
    subtracted. The profiler's start/stop lines on stderr are silenced."""
    stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    return sum(max(row.self_cpu_memory_usage, 0) for row in prof.key_averages()) / 2**20


def op_rows(shape, threads_list, repeats):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *shape, generator=gen)
    field = 0.02 * torch.randn(1, 3, *shape, generator=gen)
    coords = ops.identity_map(shape) + 0.02 * torch.randn(1, 3, *shape, generator=gen)
    cases = {
        "warp (1 channel, zeros)": lambda: ops.warp(image, coords, "zeros"),
        "compose_maps (3 channels, border)": lambda: ops.compose_maps(field, coords),
    }
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name, fn in cases.items():
            result = {}
            for mode in ("torch", "cpp"):
                with ops.kernel_mode(mode):
                    result[mode] = (timed(fn, "cpu", repeats), allocated_mib(fn), fn())
            difference = float((result["cpp"][2] - result["torch"][2]).abs().max())
            rows.append((name, threads, result["torch"][0], result["cpp"][0], result["torch"][1], result["cpp"][1], difference))
    return rows


def end_to_end(shape, threads, repeats):
    from helpers import random_network

    from mgr_engine import Engine
    from mgr_engine.model import official_state_dict

    torch.set_num_threads(threads)
    network = random_network(tuple(shape), displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(network), config=network.config, device="cpu")
    gen = torch.Generator().manual_seed(1)
    moving, fixed = torch.rand(1, 1, *shape, generator=gen), torch.rand(1, 1, *shape, generator=gen)
    out = {}
    for mode in ("torch", "cpp"):
        with ops.kernel_mode(mode):
            out[mode] = (timed(lambda: engine.predict_map(moving, fixed), "cpu", repeats),
                         engine.predict_map(moving, fixed))
    difference = float((out["cpp"][1] - out["torch"][1]).abs().max()) * (max(shape) - 1)
    return out["torch"][0], out["cpp"][0], difference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--threads", type=int, nargs="+", default=(1, torch.get_num_threads()))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args(argv)
    if not warp_cpu.available():
        sys.exit("mgr_engine._trilinear_cpu was not built: pip install -e . with a C++ compiler")
    shape = tuple(args.shape)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, shape {shape}, "
          f"median of {args.repeats}")
    print("| op | threads | PyTorch | C++ | speed-up | allocated PyTorch | allocated C++ | max difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, t_torch, t_cpp, m_torch, m_cpp, diff in op_rows(shape, sorted(set(args.threads)), args.repeats):
        print(f"| {name} | {threads} | {t_torch * 1e3:.0f} ms | {t_cpp * 1e3:.0f} ms | {t_torch / t_cpp:.2f}x "
              f"| {m_torch:.0f} MiB | {m_cpp:.0f} MiB | {diff:.1e} |")
    if not args.skip_end_to_end:
        threads = max(args.threads)
        t_torch, t_cpp, diff = end_to_end(shape, threads, max(2, args.repeats // 2))
        print(f"\nEngine.predict_map (no IO), {threads} threads: PyTorch warps {t_torch:.2f} s, C++ warps {t_cpp:.2f} s "
              f"({t_torch / t_cpp:.2f}x); maps differ by at most {diff:.1e} voxel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
