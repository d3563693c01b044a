#!/usr/bin/env python
"""Engine speed and peak memory on the CPU with and without keeping freed host memory
(``Engine(cache_host_memory=...)``, :mod:`mgr_engine.host_memory`), each in a fresh process.

Randomized official-architecture weights, two smooth volumes at the network's input size, on
tensors (no itk): the warm median of ``Engine.predict_map`` (no IO) and of one IO step
(``Engine.instance_optimize`` with one iteration: an Adam step and the final forward), and
the process's peak resident memory (VmHWM).

    .venv/bin/python benchmarks/bench_host_memory.py
    .venv/bin/python benchmarks/bench_host_memory.py --shape 96 96 96 --repeats 2   # quick

Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def measure(shape, repeats, io_repeats, cache) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    import torch
    from bench_kernels import timed
    from helpers import random_network, smooth_volume

    from mgr_engine import Engine, host_memory
    from mgr_engine.model import official_state_dict

    net = random_network(shape, seed=1, displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", cache_host_memory=cache)
    moving = torch.from_numpy(smooth_volume(shape, 1))[None, None]
    fixed = torch.from_numpy(smooth_volume(shape, 2))[None, None]

    no_io = timed(lambda: engine.predict_map(moving, fixed), "cpu", repeats, warmups=1)
    peak_no_io = peak_rss_gib()
    io = timed(lambda: engine.instance_optimize(moving, fixed, iterations=1, progress=False), "cpu", io_repeats,
               warmups=1)
    return {"kept": host_memory.keeping_freed_memory(), "no_io": no_io, "peak_no_io": peak_no_io, "io": io,
            "peak_io": peak_rss_gib()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--repeats", type=int, default=3, help="timed predict_map calls (after a warm-up)")
    parser.add_argument("--io-repeats", type=int, default=2, help="timed IO calls (after a warm-up)")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(measure(shape, args.repeats, args.io_repeats, args.child == "on")))
        return 0
    results = {}
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--child", setting, "--shape", *map(str, shape),
                   "--repeats", str(args.repeats), "--io-repeats", str(args.io_repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[setting] = json.loads(output.splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"{platform.machine()}, network input {shape}, each setting in a fresh process; "
          f"freed memory kept: {on['kept']} (on), {off['kept']} (off)\n")
    print("| | returned to the system (off) | kept for reuse (on) | off / on |")
    print("|---|--:|--:|--:|")
    print(f"| predict_map (no IO), warm median | {off['no_io']:.2f} s | {on['no_io']:.2f} s | {off['no_io'] / on['no_io']:.2f}x |")
    print(f"| one IO step + final forward, median | {off['io']:.1f} s | {on['io']:.1f} s | {off['io'] / on['io']:.2f}x |")
    print(f"| peak resident memory after no IO | {off['peak_no_io']:.2f} GiB | {on['peak_no_io']:.2f} GiB | |")
    print(f"| peak resident memory after IO | {off['peak_io']:.2f} GiB | {on['peak_io']:.2f} GiB | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
