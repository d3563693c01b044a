#!/usr/bin/env python
"""One-shot commands against the reference's: ``mgr-engine warp`` and ``mgr-engine jacobian``
against ``unigradicon-warp`` and ``unigradicon-jacobian``, each a fresh process, on the same
files, alternating ours and the reference's for ``--rounds`` rounds.

Each command is timed whole (imports, reading, the work, writing), as a user runs it; peak
resident memory is the child's ``ru_maxrss`` (``os.wait4``), which on Linux also counts this
process's memory at fork time: every command is timed before any output is read, so this
process stays far smaller than the commands. The outputs are compared: the warped images
voxel for voxel, the (log-)Jacobians by their largest difference. The transform is any ITK
transform file the fixed and moving images go with, typically a ``--transform_out`` of
``mgr-engine register`` or ``unigradicon-register``.

    python benchmarks/bench_cli.py --fixed fixed.nii.gz --moving moving.nii.gz --transform t.h5 \\
        --results benchmarks/RESULTS.md

Needs itk and unigradicon (the test extra and the Makefile's reference install).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]

from bench_kernels import print_and_append  # noqa: E402


def run(command):
    """(wall seconds, peak RSS in GiB) of ``command`` in a fresh process; raises if it fails."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read().decode(errors='replace')}")
    return seconds, usage.ru_maxrss / 2**20  # kB on Linux


def largest_difference(path_a, path_b):
    import itk

    a = itk.array_from_image(itk.imread(str(path_a))).astype(np.float64)
    b = itk.array_from_image(itk.imread(str(path_b))).astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    difference = np.where(both_nan, 0.0, np.abs(a - b))
    return float(np.nanmax(difference)), int((difference > 0).sum()), difference.size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--transform", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=Path, help="append the table to this file")
    args = p.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    ours, reference = str(bin_dir / "mgr-engine"), str(bin_dir / "unigradicon-warp")
    if not Path(reference).exists():
        sys.exit("unigradicon is not installed next to this Python (make test installs it)")
    out = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    inputs = ["--fixed", args.fixed, "--moving", args.moving, "--transform", args.transform]
    jacobian_inputs = ["--fixed", args.fixed, "--transform", args.transform]
    commands = {  # name: (ours, the reference's, outputs to compare)
        "warp --linear": (
            [ours, "warp", *inputs, "--linear", "--warped_moving_out", str(out / "ours_linear.nii.gz")],
            [reference, *inputs, "--linear", "--warped_moving_out", str(out / "ref_linear.nii.gz")],
            ["linear"]),
        "warp --nearest_neighbor": (
            [ours, "warp", *inputs, "--nearest_neighbor", "--warped_moving_out", str(out / "ours_nearest.nii.gz")],
            [reference, *inputs, "--nearest_neighbor", "--warped_moving_out", str(out / "ref_nearest.nii.gz")],
            ["nearest"]),
        "jacobian --log_jacob": (
            [ours, "jacobian", *jacobian_inputs, "--jacob", str(out / "ours_jac.nii.gz"),
             "--log_jacob", str(out / "ours_logjac.nii.gz")],
            [str(bin_dir / "unigradicon-jacobian"), *jacobian_inputs, "--jacob", str(out / "ref_jac.nii.gz"),
             "--log_jacob", str(out / "ref_logjac.nii.gz")],
            ["jac", "logjac"]),
    }
    rows = []
    try:
        # every command timed before any output is compared: a process forked from this one once
        # it held the outputs' arrays reported this one's resident memory as its peak
        measured = {name: {"ours": [], "reference": []} for name in commands}
        for name, (our_command, reference_command, _) in commands.items():
            for _ in range(args.rounds):
                measured[name]["reference"].append(run(reference_command))
                measured[name]["ours"].append(run(our_command))
        for name, (_, _, outputs) in commands.items():
            cells = []
            for side in ("reference", "ours"):
                seconds = [s for s, _ in measured[name][side]]
                peak = max(m for _, m in measured[name][side])
                cells.append(f"{min(seconds):.1f}-{max(seconds):.1f} s, {peak:.2f} GiB")
            ratio = (np.median([s for s, _ in measured[name]["reference"]])
                     / np.median([s for s, _ in measured[name]["ours"]]))
            differences = []
            for output in outputs:
                largest, differing, size = largest_difference(out / f"ours_{output}.nii.gz", out / f"ref_{output}.nii.gz")
                differences.append(f"{output}: {largest:.2g} ({differing} of {size} voxels)")
            rows.append(f"| `{name}` | {cells[0]} | {cells[1]} | {ratio:.2f}x | {'; '.join(differences)} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    import itk

    size = "x".join(str(n) for n in itk.imread(args.fixed).GetLargestPossibleRegion().GetSize())
    lines = [
        f"### One-shot commands against unigradicon's: fixed image {size}", "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, itk {itk.__version__}; "
        f"transform `{Path(args.transform).name}`; {args.rounds} rounds alternating the reference and ours, "
        "fresh processes, whole commands (imports, reading, writing `.nii.gz`).", "",
        "| command | unigradicon (range, peak RSS) | mgr-engine (range, peak RSS) | median speed-up | "
        "largest output difference |",
        "|---|--:|--:|--:|---|",
        *rows,
    ]
    print_and_append("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
