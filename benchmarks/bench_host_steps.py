#!/usr/bin/env python
"""The host steps of one registration besides the network, each timed alone (min of ``--repeats``).

On a GPU the network of a no-IO registration is expected to take tens of milliseconds, so the
steps around it on the host decide the latency: reading and preprocessing both images, building
the result's ITK transform, the warped image, the displacement field and its Jacobian. Each is
timed on a new ``RegistrationResult`` (nothing cached) of a smooth random 175^3 map between the
oblique 160x192x160 / 150x180x170 pair of ``bench_resample.py``; the read is of a compressed
``.nii.gz``. Prints a Markdown table; compare code states by running it on each checkout.

    python benchmarks/bench_host_steps.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import itk

    from helpers import oblique_image, smooth_volume
    from mgr_engine import itk_io, ops
    from mgr_engine.engine import RegistrationResult
    from mgr_engine.preprocess import normalize_intensity, resize

    network = (175, 175, 175)
    fixed = oblique_image(smooth_volume((160, 192, 160), 1) * 900, (1.2, 1.0, 0.9), (-80.0, -90.0, -70.0), (0.1, 0.0, 0.2))
    moving = oblique_image(smooth_volume((150, 180, 170), 2) * 700 + 50, (1.1, 1.05, 0.95), (-75.0, -95.0, -60.0),
                           (0.15, -0.05, -0.1))
    g = torch.Generator().manual_seed(0)
    phi = ops.identity_map(network) + 0.03 * torch.nn.functional.interpolate(
        torch.randn(1, 3, 5, 5, 5, generator=g), size=network, mode="trilinear")
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "fixed.nii.gz")
        itk.imwrite(fixed, path, compression=True)

        def result():
            return RegistrationResult(fixed=fixed, moving=moving, phi_ab=phi)

        def field_and_jacobian():
            r = result()
            return r.displacement_field(), r.jacobian_determinant()

        steps = [  # (name, call, times per pair)
            ("read one image (.nii.gz)", lambda: itk_io.load_image(path), 2),
            ("preprocess one image (MRI)", lambda: resize(normalize_intensity(itk_io.voxel_array(fixed), "mri"), network), 2),
            ("`result.transform`", lambda: result().transform, 1),
            ("`result.warp()`", lambda: result().warp(), 1),
            ("`displacement_field()` + `jacobian_determinant()`", field_and_jacobian, 1),
        ]
        lines = ["| host step | time |", "|---|--:|"]
        total = 0.0
        for name, call, per_pair in steps:
            call()  # ITK's lazy module loading, outside the timing
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            total += per_pair * best
            lines.append(f"| {name} | {best * 1e3:.0f} ms |")
            print(lines[-1], flush=True)
    lines.append(f"| sum for a pair (read and preprocess twice) | {total * 1e3:.0f} ms |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
