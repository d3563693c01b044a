#!/usr/bin/env python
"""A result's full-resolution outputs: ``mgr_engine.resample`` (C++ on the CPU, PyTorch elsewhere)
against ITK's filters through the result's transform, in one run.

A 175^3 network map (smooth, random, moving points by up to ~10 voxels) between two oblique,
anisotropic images (fixed 160x192x160, moving 150x180x170, part of it out of the fixed field of
view), as ``RegistrationResult`` holds them. Timed, median of ``--repeats`` after one warm-up:

* the moving image resampled onto the fixed grid, linear and nearest neighbour: ITK's
  ``ResampleImageFilter`` through ``result.transform`` (what ``result.warp()`` ran before) against
  :func:`mgr_engine.resample.resampled_image`;
* the displacement field: ``itk.transform_to_displacement_field_filter`` against
  :func:`mgr_engine.resample.displacement_field`;

each with the largest difference from ITK's output. On the CPU both of ours run: the C++ kernel
(what the engine uses) and the PyTorch path (its reference, forced with ``kernel_mode("torch")``).
On a CUDA device the PyTorch path runs there (timed with synchronization), against ITK on the
host, with its peak of CUDA memory above what was allocated before the call. Host memory is not
compared: in a warm process, resident memory does not show allocations that reuse freed pages,
and ITK's allocations are invisible to torch. (The C++ path allocates its output only, one
float64 per fixed voxel, or a float32 vector for the field.)

    python benchmarks/bench_resample.py --results benchmarks/RESULTS.md
    python benchmarks/bench_resample.py --fixed-shape 40 48 40 --network 32 32 32 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def measure(fn, device, repeats):
    """(median seconds, peak CUDA memory above the start in MiB or None, output) of ``fn``."""
    out = fn()
    times, peaks = [], []
    for _ in range(repeats):
        del out
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(peaks) if peaks else None), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixed-shape", type=int, nargs=3, default=(160, 192, 160), help="fixed image voxels (z y x)")
    p.add_argument("--moving-shape", type=int, nargs=3, default=(150, 180, 170), help="moving image voxels (z y x)")
    p.add_argument("--network", type=int, nargs=3, default=(175, 175, 175), help="the map's grid")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, help="append the table to this file")
    args = p.parse_args(argv)

    import itk

    from helpers import oblique_image, smooth_volume
    from mgr_engine import itk_io, ops
    from mgr_engine.engine import RegistrationResult

    device = torch.device(args.device)
    fixed = oblique_image(smooth_volume(tuple(args.fixed_shape), 1) * 900, (1.2, 1.0, 0.9), (-80.0, -90.0, -70.0),
                          (0.1, 0.0, 0.2))
    moving = oblique_image(smooth_volume(tuple(args.moving_shape), 2) * 700 + 50, (1.1, 1.05, 0.95),
                           (-75.0, -95.0, -60.0), (0.15, -0.05, -0.1))
    g = torch.Generator().manual_seed(0)
    field = torch.nn.functional.interpolate(torch.randn(1, 3, 5, 5, 5, generator=g), size=tuple(args.network),
                                            mode="trilinear")
    phi = ops.identity_map(tuple(args.network)) + 0.03 * field
    result = RegistrationResult(fixed=fixed, moving=moving, phi_ab=phi, device=device)
    transform = result.transform

    cpu = device.type == "cpu"
    sides = [("mgr_engine, C++", "auto"), ("mgr_engine, PyTorch", "torch")] if cpu else [(f"mgr_engine on {device.type}", "auto")]
    rows = []
    for name, itk_fn, ours_fn in (
        ("moving image, linear", lambda: itk_io.resample(moving, transform, fixed, "linear"),
         lambda: result.warp(interpolation="linear")),
        ("moving image, nearest", lambda: itk_io.resample(moving, transform, fixed, "nearest"),
         lambda: result.warp(interpolation="nearest")),
        ("displacement field", lambda: itk.transform_to_displacement_field_filter(
            transform, reference_image=fixed, use_reference_image=True),
         # a new result each call: a result keeps its field
         lambda: RegistrationResult(fixed=fixed, moving=moving, phi_ab=phi, device=device).displacement_field()),
    ):
        itk_time, _, expected = measure(itk_fn, torch.device("cpu"), args.repeats)
        cells = [f"{itk_time * 1e3:.0f} ms"]
        for side, mode in sides:
            with ops.kernel_mode(mode):
                ours_time, peak, ours = measure(ours_fn, device, args.repeats)
            difference = np.abs(itk.array_from_image(ours).astype(np.float64) - itk.array_from_image(expected)).max()
            cells += [f"{ours_time * 1e3:.1f} ms ({itk_time / ours_time:.2f}x)", f"{difference:.2g}"]
            if not cpu:
                cells.append(f"{peak:.0f} MiB")
            print(f"{name}: ITK {itk_time * 1e3:.0f} ms, {side} {ours_time * 1e3:.1f} ms", flush=True)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if cpu and not ops.use_cpp_resample(phi):
        print("warning: the C++ extension was not built: both columns ran the PyTorch path", flush=True)

    header = ["output", "ITK"]
    for side, _ in sides:
        header += [f"{side} (ITK / it)", "largest difference"] + ([] if cpu else ["peak CUDA memory"])
    lines = [
        f"### Full-resolution resampling: fixed {'x'.join(map(str, args.fixed_shape))}, "
        f"network {'x'.join(map(str, args.network))}, {device.type}", "",
        f"- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, itk {itk.__version__}; "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}.",
        f"- Median of {args.repeats} after a warm-up, of the whole call (`result.warp()`, "
        "`result.displacement_field()`: ITK image out); largest difference from ITK's output.", "",
        "| " + " | ".join(header) + " |",
        "|---|" + "--:|" * (len(header) - 1),
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
