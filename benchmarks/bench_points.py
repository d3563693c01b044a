#!/usr/bin/env python
"""Points through a registration's transform: ``mgr_engine.transform_points`` (numpy, all points
at once) against ITK's ``TransformPoint`` called point by point, the way a user of ITK's Python
wrapping moves landmarks or a mesh's vertices.

The transform is a result's (a smooth random map on the 175^3 network grid between two oblique
images); the points are random over the fixed image. Median time of each after two warm-ups
(ITK's loop once, without warm-ups, for a million points), and the largest difference (mm).

    .venv/bin/python benchmarks/bench_points.py
    .venv/bin/python benchmarks/bench_points.py --counts 300 100000

Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)


def main(argv=None) -> int:
    import itk

    from helpers import oblique_image, random_map, smooth_volume
    from mgr_engine import itk_io
    from mgr_engine.engine import RegistrationResult

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", nargs="+", type=int, default=[300, 10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    fixed = oblique_image(smooth_volume((60, 64, 58), 1), (2.5, 2.4, 2.6), (-70.0, -80.0, -75.0), (0.1, 0.0, 0.2))
    moving = oblique_image(smooth_volume((62, 60, 63), 2), (2.4, 2.5, 2.5), (-75.0, -70.0, -80.0), (0.15, -0.05, -0.1))
    result = RegistrationResult(fixed=fixed, moving=moving, phi_ab=random_map((175, 175, 175), 0.03, seed=12)[None])
    transform = result.transform
    to_physical = itk_io.index_to_physical_affine(fixed)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"ITK {itk.Version.GetITKVersion()}; a result's transform (175^3 network grid), random points over the "
          f"fixed image; median of {args.repeats}\n")
    print("| points | ITK's TransformPoint, point by point | mgr_engine.transform_points | speed-up | "
          "largest difference |")
    print("|--:|--:|--:|--:|--:|")
    rng = np.random.default_rng(0)
    for count in args.counts:
        index = rng.uniform(0, 57, (count, 3))
        at = index @ to_physical[:, :3].T + to_physical[:, 3]
        listed = at.tolist()

        def with_itk():
            return np.array([tuple(transform.TransformPoint(point)) for point in listed])

        if count >= 1_000_000:  # seconds a call: once
            start = time.perf_counter()
            expected = with_itk()
            itk_seconds = time.perf_counter() - start
        else:
            itk_seconds = timed(with_itk, "cpu", args.repeats)
            expected = with_itk()
        ours_seconds = timed(lambda: result.transform_points(at), "cpu", args.repeats)
        difference = np.abs(result.transform_points(at) - expected).max()
        print(f"| {count:,} | {itk_seconds * 1e3:.1f} ms | {ours_seconds * 1e3:.1f} ms | "
              f"{itk_seconds / ours_seconds:.1f}x | {difference:.1e} mm |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
