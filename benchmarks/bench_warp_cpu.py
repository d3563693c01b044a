#!/usr/bin/env python
"""The C++ trilinear warp (kernels/warp_cpu.py) against PyTorch's grid_sample on the CPU.

Per op at full size (175^3 by default), for each thread count: median time of the warp of a
1-channel image (zero padding) and of the map composition (3-channel field, border padding),
forward alone and forward + backward (the gradients IO needs: to the map; to the field and
the map; the latter also at the regularizer's half-resolution points, and for the coarser
levels' half- and quarter-resolution fields at the full-resolution points of a smooth map),
PyTorch (``kernel_mode("torch")``) against C++ (``kernel_mode("cpp")``), and the memory each
call allocates (torch.profiler's CPU memory events). End to end, with randomized
weights of the official architecture: ``Engine.predict_map`` (no IO: every warp and
composition of the TwoStep/DownSample nesting), warm median, and one IO step (forward and
backward of the GradICON objective with 1-LNCC^2, both directions), each mode in its own
process so that its peak memory (RSS) is its own.

    .venv/bin/python benchmarks/bench_warp_cpu.py
    .venv/bin/python benchmarks/bench_warp_cpu.py --shape 72 72 72 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.random_network: randomized weights

from mgr_engine import ops  # noqa: E402
from mgr_engine.kernels import warp_cpu  # noqa: E402

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)


def cpu_benchmark_parser(doc: str, end_to_end: bool = True) -> argparse.ArgumentParser:
    """The options of every CPU kernel benchmark: ``--shape``, ``--repeats`` and, where it has an
    end-to-end part, ``--skip-end-to-end``; the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--repeats", type=int, default=5)
    if end_to_end:
        parser.add_argument("--skip-end-to-end", action="store_true")
    return parser


def io_call_seconds(shape, repeats, pytorch_patch, **io_options):
    """Median seconds of one IO call (``instance_optimize``, one step and the final forward; randomized
    official weights, ``io_options`` passed on) with ``pytorch_patch`` active (PyTorch's op), then
    without (the C++ kernel), in this process."""
    from helpers import benchmark_engine

    engine, moving, fixed = benchmark_engine(shape)
    run = lambda: engine.instance_optimize(moving, fixed, iterations=1, progress=False, **io_options)  # noqa: E731
    with pytorch_patch:
        pytorch = timed(run, "cpu", repeats)
    return pytorch, timed(run, "cpu", repeats)


def predict_map_seconds(shape, repeats, pytorch_patch, rounds=3):
    """Median seconds of a warm ``predict_map`` (no IO) with ``pytorch_patch`` active and without,
    ``rounds`` rounds of ``repeats`` calls each, alternated (the difference is a few percent)."""
    from helpers import benchmark_engine

    engine, moving, fixed = benchmark_engine(shape)
    run = lambda: engine.predict_map(moving, fixed)  # noqa: E731
    pytorch, ours = [], []
    for _ in range(rounds):
        with pytorch_patch:
            pytorch.append(timed(run, "cpu", repeats))
        ours.append(timed(run, "cpu", repeats))
    return statistics.median(pytorch), statistics.median(ours)


def machine_line(vector_bytes: int | None = None) -> str:
    """The CPU, thread count, torch version and (given) the kernel's widest vectors, for a
    benchmark's first line."""
    line = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return line if vector_bytes is None else f"{line}; widest vectors {vector_bytes} bytes"


def markdown_table(header, rows) -> str:
    """``header`` and ``rows`` (lists of cell strings) as a Markdown table."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def exit_unless_built(available: bool, extension: str) -> None:
    """Exit, saying how to build it, where the C++ ``extension`` was not built."""
    if not available:
        sys.exit(f"mgr_engine.{extension} was not built: pip install -e . with a C++ compiler")


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


def difference_of(got, expected):
    """Outputs: largest absolute difference. Gradients: relative L2 difference, since a
    trilinear gradient jumps at voxel boundaries and float32 rounding puts a few points on the
    other side (see RESULTS.md)."""
    if isinstance(got, torch.Tensor):
        return float((got - expected).abs().max())
    return max(float((a - b).norm() / b.norm()) for a, b in zip(got, expected))


def op_rows(shape, threads_list, repeats):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *shape, generator=gen)
    field = (0.02 * torch.randn(1, 3, *shape, generator=gen)).requires_grad_()
    coords = (ops.identity_map(shape) + 0.02 * torch.randn(1, 3, *shape, generator=gen)).requires_grad_()
    # The GradICON regularizer samples the full-resolution fields at every second grid point.
    half = tuple((n + 1) // 2 for n in shape)
    half_coords = (ops.identity_map(half) + 0.02 * torch.randn(1, 3, *half, generator=gen)).requires_grad_()
    # The TwoStep/DownSample nesting samples the coarser levels' fields (half and quarter
    # resolution) at the full-resolution points of a smooth, channels-last map, as IO does.
    quarter = tuple((n + 1) // 2 for n in half)
    smooth_coords = (ops.identity_map(shape) + torch.nn.functional.interpolate(
        0.03 * torch.randn(1, 3, 6, 6, 6, generator=gen), size=shape, mode="trilinear")
    ).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    half_field = (0.02 * torch.randn(1, 3, *half, generator=gen)).requires_grad_()
    quarter_field = (0.02 * torch.randn(1, 3, *quarter, generator=gen)).requires_grad_()
    cases = {
        "warp (1 channel, zeros)": lambda: ops.warp(image, coords.detach(), "zeros"),
        "compose_maps (3 channels, border)": lambda: ops.compose_maps(field.detach(), coords.detach()),
        "warp + backward (to the map)": lambda: torch.autograd.grad(ops.warp(image, coords, "zeros").sum(), coords),
        "compose_maps + backward (to field and map)":
            lambda: torch.autograd.grad(ops.compose_maps(field, coords).sum(), (field, coords)),
        "compose_maps + backward at half-resolution points":
            lambda: torch.autograd.grad(ops.compose_maps(field, half_coords).sum(), (field, half_coords)),
        "compose_maps + backward, half-resolution field, smooth map":
            lambda: torch.autograd.grad(ops.compose_maps(half_field, smooth_coords).sum(), (half_field, smooth_coords)),
        "compose_maps + backward, quarter-resolution field, smooth map":
            lambda: torch.autograd.grad(ops.compose_maps(quarter_field, smooth_coords).sum(),
                                        (quarter_field, smooth_coords)),
    }
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name, fn in cases.items():
            result = {}
            for mode in ("torch", "cpp"):
                with ops.kernel_mode(mode):
                    result[mode] = (timed(fn, "cpu", repeats), allocated_mib(fn), fn())
            difference = difference_of(result["cpp"][2], result["torch"][2])
            rows.append((name, threads, result["torch"][0], result["cpp"][0], result["torch"][1], result["cpp"][1], difference))
    return rows


def io_step(shape, threads, repeats, mode):
    """One IO step (GradICON objective, forward + backward, both directions) in kernel ``mode``:
    median seconds of ``repeats`` after one warm-up, peak RSS (GiB) and the gradient. Freed host
    memory is kept, as the engine does on the CPU (:mod:`mgr_engine.host_memory`)."""
    from helpers import random_network, smooth_volume

    from mgr_engine import host_memory
    from mgr_engine.engine import gradicon_objective
    from mgr_engine.losses import lncc2_loss

    host_memory.keep_freed_memory()
    torch.set_num_threads(threads)
    network = random_network(tuple(shape), displacement_scale=0.3).requires_grad_(True)
    moving = torch.from_numpy(smooth_volume(shape, 1))[None, None]
    fixed = torch.from_numpy(smooth_volume(shape, 2))[None, None]
    times = []
    with ops.kernel_mode(mode):
        for _ in range(repeats + 1):
            network.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss, _, _ = gradicon_objective(network, moving, fixed, lncc2_loss, generator=torch.Generator().manual_seed(0))
            loss.backward()
            times.append(time.perf_counter() - start)
    gradient = torch.cat([p.grad.flatten() for p in network.parameters()])
    return statistics.median(times[1:]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, gradient


def io_step_in_subprocess(shape, threads, repeats, mode, gradient_path):
    command = [sys.executable, __file__, "--io-step-mode", mode, "--io-gradient", str(gradient_path),
               "--shape", *map(str, shape), "--threads", str(threads), "--io-repeats", str(repeats)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


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
    parser = cpu_benchmark_parser(__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=(1, torch.get_num_threads()))
    parser.add_argument("--io-repeats", type=int, default=2, help="timed IO steps per mode (after one warm-up)")
    parser.add_argument("--io-step-mode", choices=("torch", "cpp"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--io-gradient", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exit_unless_built(warp_cpu.available(), "_trilinear_cpu")
    shape = tuple(args.shape)
    if args.io_step_mode:
        seconds, peak_gib, gradient = io_step(shape, max(args.threads), args.io_repeats, args.io_step_mode)
        torch.save(gradient, args.io_gradient)
        print(json.dumps({"seconds": seconds, "peak_gib": peak_gib}))
        return 0
    print(f"{machine_line()}, shape {shape}, median of {args.repeats}")
    print("| op | threads | PyTorch | C++ | speed-up | allocated PyTorch | allocated C++ | difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, t_torch, t_cpp, m_torch, m_cpp, diff in op_rows(shape, sorted(set(args.threads)), args.repeats):
        print(f"| {name} | {threads} | {t_torch * 1e3:.0f} ms | {t_cpp * 1e3:.0f} ms | {t_torch / t_cpp:.2f}x "
              f"| {m_torch:.0f} MiB | {m_cpp:.0f} MiB | {diff:.1e} |")
    print("(difference: forward, largest absolute; with backward, relative L2 of the gradients)")
    if not args.skip_end_to_end:
        threads = max(args.threads)
        t_torch, t_cpp, diff = end_to_end(shape, threads, max(2, args.repeats // 2))
        print(f"\nEngine.predict_map (no IO), {threads} threads: PyTorch warps {t_torch:.2f} s, C++ warps {t_cpp:.2f} s "
              f"({t_torch / t_cpp:.2f}x); maps differ by at most {diff:.1e} voxel")
        with tempfile.TemporaryDirectory() as tmp:
            step = {mode: io_step_in_subprocess(shape, threads, args.io_repeats, mode, Path(tmp, mode))
                    for mode in ("torch", "cpp")}
            gradients = {mode: torch.load(Path(tmp, mode)) for mode in step}
        difference = float((gradients["cpp"] - gradients["torch"]).norm() / gradients["torch"].norm())
        print(f"IO step (GradICON objective with 1-LNCC^2, forward + backward), {threads} threads, median of "
              f"{args.io_repeats} after a warm-up: PyTorch warps {step['torch']['seconds']:.1f} s, C++ warps "
              f"{step['cpp']['seconds']:.1f} s ({step['torch']['seconds'] / step['cpp']['seconds']:.2f}x); peak RSS "
              f"{step['torch']['peak_gib']:.2f} / {step['cpp']['peak_gib']:.2f} GiB; weight gradients differ by "
              f"{difference:.1e} (relative L2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
