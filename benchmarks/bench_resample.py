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

``--tensors`` (where itk does not import, as on the GPU machine, too) times the tensor calls
alone, with the images' grids as :class:`mgr_engine.itk_io.ImageGrid`: on a CUDA device the
PyTorch path there against the CPU's path (the C++ kernel where built; the Jacobian's tensor
form on both), with the largest difference between them and the peak of CUDA memory; on the
CPU the C++ kernel against the PyTorch path.

    python benchmarks/bench_resample.py --results benchmarks/RESULTS.md
    python benchmarks/bench_resample.py --fixed-shape 40 48 40 --network 32 32 32 --repeats 1   # a quick check
    python benchmarks/bench_resample.py --tensors    # no itk needed
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from bench_kernels import print_and_append  # noqa: E402


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


FIXED_SPACING, FIXED_ORIGIN, FIXED_ANGLES = (1.2, 1.0, 0.9), (-80.0, -90.0, -70.0), (0.1, 0.0, 0.2)
MOVING_SPACING, MOVING_ORIGIN, MOVING_ANGLES = (1.1, 1.05, 0.95), (-75.0, -95.0, -60.0), (0.15, -0.05, -0.1)


def random_map(network):
    """The benchmark's map: smooth and random, moving points by up to about 10 voxels at 175^3."""
    from mgr_engine import ops

    g = torch.Generator().manual_seed(0)
    field = torch.nn.functional.interpolate(torch.randn(1, 3, 5, 5, 5, generator=g), size=network, mode="trilinear")
    return ops.identity_map(network) + 0.03 * field


def itk_rows(args, device, phi):
    """The Markdown table rows and header of ours against ITK's filters."""
    import itk

    from helpers import oblique_image, smooth_volume
    from mgr_engine import itk_io, ops
    from mgr_engine.engine import RegistrationResult

    fixed = oblique_image(smooth_volume(tuple(args.fixed_shape), 1) * 900, FIXED_SPACING, FIXED_ORIGIN, FIXED_ANGLES)
    moving = oblique_image(smooth_volume(tuple(args.moving_shape), 2) * 700 + 50, MOVING_SPACING, MOVING_ORIGIN,
                           MOVING_ANGLES)
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
    header = ["output", "ITK"]
    for side, _ in sides:
        header += [f"{side} (ITK / it)", "largest difference"] + ([] if cpu else ["peak CUDA memory"])
    return header, rows, f"itk {itk.__version__}"


def tensor_rows(args, device, phi):
    """The Markdown table rows and header of the tensor calls: on CUDA against the CPU's path,
    on the CPU the C++ kernel against the PyTorch path."""
    from helpers import rotation, smooth_volume
    from mgr_engine import ops, resample
    from mgr_engine.itk_io import ImageGrid, index_to_physical_affine, network_to_physical_affine

    def grid(shape_zyx, spacing, origin, angles):
        return ImageGrid(tuple(reversed(shape_zyx)), np.asarray(spacing), np.asarray(origin), rotation(*angles))

    fixed = grid(args.fixed_shape, FIXED_SPACING, FIXED_ORIGIN, FIXED_ANGLES)
    moving = grid(args.moving_shape, MOVING_SPACING, MOVING_ORIGIN, MOVING_ANGLES)
    volume = torch.from_numpy(smooth_volume(tuple(args.moving_shape), 2) * 700 + 50)
    network = tuple(args.network)
    fixed_to_network = resample.compose_affines(resample.invert_affine(network_to_physical_affine(fixed, network)),
                                                index_to_physical_affine(fixed))
    network_to_index = resample.compose_affines(resample.invert_affine(index_to_physical_affine(moving)),
                                                network_to_physical_affine(moving, network))
    shape = tuple(args.fixed_shape)
    displacement = torch.from_numpy(resample.map_displacement(phi[0].numpy()))  # as the result's transform holds it
    calls = {
        "moving image, linear": lambda m, v: resample.resampled_image(m, fixed_to_network, shape, v, network_to_index),
        "moving image, nearest": lambda m, v: resample.resampled_image(m, fixed_to_network, shape, v, network_to_index,
                                                                       "nearest"),
        "displacement field": lambda m, v: resample.displacement_field(
            m, fixed_to_network, shape, network_to_physical_affine(moving, network), index_to_physical_affine(fixed)),
    }
    cpu = device.type == "cpu"
    # first the CPU's own path (the C++ kernel where built), then the PyTorch path: forced on the
    # CPU, or on the CUDA device
    sides = (("C++" if resample.use_cpp_resample(displacement) else "PyTorch", torch.device("cpu"), "auto"),
             ("PyTorch", torch.device("cpu"), "torch") if cpu else (f"PyTorch on {device.type}", device, "auto"))
    rows = []
    fields = {}
    for name, call in [*calls.items(), ("Jacobian determinant (tensor form)", None)]:
        outputs, seconds, cells = [], [], []
        for side, where, mode in sides:
            m, v = displacement.to(where), volume.to(where)
            if call is None:  # of the field this side computed
                fn = functools.partial(resample.jacobian_determinant, fields[side], FIXED_SPACING)
            else:
                fn = functools.partial(call, m, v)
            with ops.kernel_mode(mode):
                time_s, peak, out = measure(fn, where, args.repeats)
            if name == "displacement field":
                fields[side] = out
            outputs.append(out.cpu().double())
            seconds.append(time_s)
            cells.append(f"{time_s * 1e3:.1f} ms" + ("" if peak is None else f", {peak:.0f} MiB"))
            print(f"{name}: {side} {time_s * 1e3:.1f} ms", flush=True)
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {seconds[0] / seconds[1]:.2f}x | "
                    f"{(outputs[0] - outputs[1]).abs().max().item():.2g} |")
    header = ["output (tensors)", f"CPU, {sides[0][0]}", sides[1][0] + ("" if cpu else " (peak CUDA memory)"),
              "time first / second", "largest difference"]
    return header, rows, "no itk"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixed-shape", type=int, nargs=3, default=(160, 192, 160), help="fixed image voxels (z y x)")
    p.add_argument("--moving-shape", type=int, nargs=3, default=(150, 180, 170), help="moving image voxels (z y x)")
    p.add_argument("--network", type=int, nargs=3, default=(175, 175, 175), help="the map's grid")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, help="append the table to this file")
    p.add_argument("--tensors", action="store_true", help="the tensor calls alone, no itk (the GPU machine has none)")
    args = p.parse_args(argv)
    if not args.tensors:
        try:
            import itk  # noqa: F401
        except ImportError:
            print("itk does not import: measuring the tensor calls alone (--tensors)", flush=True)
            args.tensors = True

    device = torch.device(args.device)
    phi = random_map(tuple(args.network))
    header, rows, versions = (tensor_rows if args.tensors else itk_rows)(args, device, phi)
    lines = [
        f"### Full-resolution resampling: fixed {'x'.join(map(str, args.fixed_shape))}, "
        f"network {'x'.join(map(str, args.network))}, {device.type}", "",
        f"- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, {versions}; "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}.",
        f"- Median of {args.repeats} after a warm-up, of the whole call (with ITK: `result.warp()`, "
        "`result.displacement_field()`, ITK image out); largest difference between the outputs.", "",
        "| " + " | ".join(header) + " |",
        "|---|" + "--:|" * (len(header) - 1),
        *rows,
    ]
    print_and_append("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
