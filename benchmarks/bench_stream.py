#!/usr/bin/env python
"""Throughput over a data set: ``Engine.register_many`` (reading ahead in a thread, batches,
pinned memory on CUDA) against a loop of ``Engine.register``, without IO, in one process.

``--pairs`` pairs of smooth random volumes are written as ``.nii.gz`` files first (anisotropic
spacing, as a scanner's). Each pass registers all of them with one warm engine and builds each
result's transform (what saving it needs); passes alternate over ``--rounds`` rounds and the
best round of each is reported, so a burst of load on a shared machine hits every variant.

    python benchmarks/bench_stream.py                                   # 175^3, CPU or CUDA
    python benchmarks/bench_stream.py --shape 72 72 72 --pairs 4 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from bench_kernels import print_and_append  # noqa: E402


def write_pairs(directory: Path, count: int, image_shape, spacing):
    import itk

    from helpers import smooth_volume

    pairs = []
    for i in range(count):
        paths = []
        for role, seed in (("fixed", 2 * i), ("moving", 2 * i + 1)):
            image = itk.image_from_array(smooth_volume(image_shape, seed) * 800 + 30)
            image.SetSpacing(spacing)
            path = directory / f"{role}_{i}.nii.gz"
            itk.imwrite(image, str(path), compression=True)
            paths.append(str(path))
        pairs.append(tuple(paths))
    return pairs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175), help="network input shape")
    p.add_argument("--image-shape", type=int, nargs=3, default=(160, 192, 160), help="voxels of each image (z y x)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="register_many batch sizes (default 1 2 on the CPU, 1 2 4 on CUDA)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, help="append the table to this file")
    args = p.parse_args(argv)

    from helpers import random_network

    from mgr_engine import Engine
    from mgr_engine.model import official_state_dict

    device = torch.device(args.device)
    batch_sizes = args.batch_sizes or ([1, 2, 4] if device.type == "cuda" else [1, 2])
    net = random_network(tuple(args.shape), seed=1, displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(net), config=net.config, device=device)
    with tempfile.TemporaryDirectory() as directory:
        pairs = write_pairs(Path(directory), args.pairs, tuple(args.image_shape), (1.2, 1.0, 0.9))
        engine.register(*pairs[0], io_iterations=None).transform  # warm-up: oneDNN/cuDNN, ITK's lazy loading

        def loop():
            for fixed, moving in pairs:
                engine.register(fixed, moving, io_iterations=None).transform

        def streamed(batch_size):
            for result in engine.register_many(pairs, batch_size=batch_size, io_iterations=None):
                result.transform

        variants = {"loop of Engine.register": loop}
        variants.update({f"register_many, batch_size {b}": (lambda b=b: streamed(b)) for b in batch_sizes})
        times = {name: [] for name in variants}
        peaks = {}
        for _ in range(args.rounds):
            for name, run in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                started = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - started)
                if device.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated() / 2**30

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    base = min(times["loop of Engine.register"])
    lines = [f"## Throughput over {args.pairs} pairs, {name}, network {'x'.join(map(str, args.shape))}, no IO", "",
             f"torch {torch.__version__}; images {'x'.join(map(str, args.image_shape))} .nii.gz, read, preprocessed, "
             f"registered, transform built; best of {args.rounds} rounds (all rounds in s).", "",
             "| variant | pairs / s | s / pair | speed-up vs loop | peak GPU memory | rounds |", "|---|--:|--:|--:|--:|--:|"]
    for variant, measured in times.items():
        best = min(measured)
        peak = f"{peaks[variant]:.2f} GiB" if variant in peaks else "-"
        lines.append(f"| {variant} | {args.pairs / best:.3f} | {best / args.pairs:.2f} | {base / best:.2f}x | {peak} | "
                     f"{', '.join(f'{t:.1f}' for t in measured)} |")
    print_and_append("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
