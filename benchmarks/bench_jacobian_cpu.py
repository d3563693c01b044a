#!/usr/bin/env python
"""The C++ Jacobian determinant (kernels/jacobian_cpu.py) against ITK's
DisplacementFieldJacobianDeterminantFilter and against its reference, the tensor form of
mgr_engine.resample, on the CPU.

A smooth random displacement field (up to about 10 mm, with folds) at a CT's size by default
(512x512x300, 0.7 x 0.7 x 1.25 mm, oblique), host memory kept as the engine keeps it. Median
time of each, after two warm-ups; the memory the tensor calls allocate, summed over their
allocations with frees not subtracted (torch's profiler; ITK's allocations are not seen by it); the largest difference from ITK's filter (index axes) or
from the tensor form (physical axes).

    .venv/bin/python benchmarks/bench_jacobian_cpu.py
    .venv/bin/python benchmarks/bench_jacobian_cpu.py --shape 160 192 160 --repeats 5

Needs itk for ITK's row. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import allocated_mib, cpu_benchmark_parser, exit_unless_built, machine_line  # noqa: E402

from mgr_engine import host_memory, ops, resample  # noqa: E402
from mgr_engine.kernels import jacobian_cpu  # noqa: E402

SPACING = (0.7, 0.7, 1.25)  # (x, y, z) mm
ANGLES = (0.1, 0.0, 0.05)  # the direction's rotation (helpers.rotation)


def random_field(shape) -> torch.Tensor:
    """(Z, Y, X, 3) float32 mm: a coarse random field interpolated to ``shape``."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 6, 6, 6, generator=g) * 10
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear")[0].permute(1, 2, 3, 0).contiguous()


def main(argv=None) -> int:
    from helpers import oblique_image, rotation

    parser = cpu_benchmark_parser(__doc__, end_to_end=False)
    parser.set_defaults(shape=(300, 512, 512), repeats=3)
    args = parser.parse_args(argv)
    exit_unless_built(jacobian_cpu.available(), "_jacobian_cpu")
    host_memory.keep_freed_memory()
    field = random_field(args.shape)
    direction = rotation(*ANGLES)
    print(f"{machine_line()}, field {'x'.join(map(str, args.shape))} (z y x), median of {args.repeats}\n", flush=True)
    print("| Jacobian determinant | reference | its time | C++ | speed-up | allocated by the reference | "
          "allocated by C++ | largest difference |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")

    def ours(direction_or_none):
        with ops.kernel_mode("cpp"):
            return resample.jacobian_determinant(field, SPACING, direction_or_none)

    def tensor_form(direction_or_none):
        with ops.kernel_mode("torch"):
            return resample.jacobian_determinant(field, SPACING, direction_or_none)

    cases = []  # (axes, reference's name, direction or None, reference, its allocated memory or None to measure)
    try:
        import itk

        from mgr_engine import itk_io

        grid = oblique_image(np.zeros((1, 1, 1), np.float32), SPACING, (0.0, 0.0, 0.0), ANGLES)  # spacing, direction
        image = itk_io.image_like(field.numpy(), grid, is_vector=True)
        filter_class = itk.DisplacementFieldJacobianDeterminantFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.F]

        def itk_filter():
            f = filter_class.New(image)
            f.Update()
            return torch.from_numpy(itk.array_from_image(f.GetOutput()))

        cases.append(("index axes", f"ITK {itk.__version__} filter", None, itk_filter, "n/a"))
    except ImportError:
        print("(itk does not import: no ITK row)")
    cases += [("index axes", "tensor form", None, lambda: tensor_form(None), None),
              ("physical axes", "tensor form", direction, lambda: tensor_form(direction), None)]
    for axes, name, direction_or_none, reference, reference_mib in cases:
        expected, got = reference(), ours(direction_or_none)
        difference = float((got - expected).abs().max())
        t_ref = timed(reference, "cpu", args.repeats)
        t_ours = timed(lambda: ours(direction_or_none), "cpu", args.repeats)
        if reference_mib is None:
            reference_mib = f"{allocated_mib(reference):.0f} MiB"
        print(f"| {axes} | {name} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.1f} ms | {t_ref / t_ours:.1f}x | {reference_mib} | "
              f"{allocated_mib(lambda: ours(direction_or_none)):.0f} MiB | {difference:.2g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
