#!/usr/bin/env python
"""Time mgr_engine's registration against the authors' reference pipeline, in one run.

Both sides load the same checkpoint (randomized weights of the official architecture,
saved once to a temporary ``.trch``) and register the same image pair (two smooth
random volumes with anisotropic spacing). Each measurement runs in a fresh
subprocess, so peak memory is per pipeline:

* ours, no IO: ``Engine(...)`` then ``engine.register(..., io_iterations=None)`` and
  ``result.transform``; a cold (first) and a warm (second) call on the same engine.
* reference, no IO: ``unigradicon.preprocess`` of both images, then
  ``icon_registration.itk_wrapper.register_pair(net, moving, fixed, finetune_steps=None)``
  (which computes both directions and the loss); cold and warm.
* both with instance optimization (IO), ``--io-steps`` Adam steps with LNCC.

Prints a Markdown table (appended to ``--results`` too) with reference / ours ratios
measured in the same run, and the largest difference in mm between both sides'
transforms at random points inside the fixed image.

    .venv/bin/python benchmarks/bench_register.py                       # 175^3, 2 IO steps
    .venv/bin/python benchmarks/bench_register.py --shape 72 72 72 --image-shape 64 80 72 --io-steps 1

Peak memory: on CPU the high-water mark of the child's resident set (``VmHWM`` of
``/proc/self/status``; ``ru_maxrss`` elsewhere, which on Linux would also count the
parent's memory at fork time); on CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
JOBS_NO_IO = ("ours", "reference")
JOBS_IO = ("ours_io", "reference_io")


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175), metavar=("D", "H", "W"),
                   help="network input shape (default: the official 175 175 175)")
    p.add_argument("--image-shape", type=int, nargs=3, default=(160, 192, 160), metavar=("Z", "Y", "X"),
                   help="voxels of each image, numpy order z y x (default 160 192 160)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.2, 1.0, 0.9), metavar=("X", "Y", "Z"),
                   help="image spacing in mm, ITK order x y z (default 1.2 1.0 0.9)")
    p.add_argument("--io-steps", type=int, default=2,
                   help="instance-optimization steps for the IO measurements (default 2; at 175^3 one "
                        "reference step takes ~90 s and ~12.6 GB on a 2-core CPU)")
    p.add_argument("--skip-io", action="store_true", help="measure without instance optimization only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--points", type=int, default=1000, help="random points for the transform comparison")
    p.add_argument("--results", type=Path, default=None, help="also append the Markdown table to this file")
    p.add_argument("--reference-keeps-freed-memory", action="store_true",
                   help="the reference's process keeps freed host memory as ours does on the CPU "
                        "(mgr_engine.host_memory): compares the code rather than malloc's settings")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.io_steps < 1 and not args.skip_io:
        p.error("--io-steps must be >= 1 (use --skip-io for none)")
    return args


# ---------------------------------------------------------------- child side


def peak_rss_bytes() -> int:
    """High-water resident set of this process (this exec's address space only)."""
    value = _proc_status("VmHWM")
    if value is not None:
        return value
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes():
    return _proc_status("VmRSS")


def _proc_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StepTimer:
    """Times each Adam step of instance optimization, in both pipelines: from
    ``optimizer.zero_grad()`` (the first call of each iteration, in ours and in
    icon_registration's ``finetune_execute``) to the end of ``optimizer.step()``."""

    def __init__(self, sync):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.starts, self.ends = [], []
        original = torch.optim.Adam.zero_grad

        def zero_grad(optimizer, *args, **kwargs):
            sync()
            self.starts.append(time.perf_counter())
            return original(optimizer, *args, **kwargs)

        def after_step(optimizer, args, kwargs):
            sync()
            self.ends.append(time.perf_counter())

        torch.optim.Adam.zero_grad = zero_grad
        register_optimizer_step_post_hook(after_step)

    def steps(self):
        return [end - start for start, end in zip(self.starts, self.ends)]


def load_pair(workdir: Path, spacing):
    """The fixed and moving itk images (float32, the given spacing, zero origin)."""
    import itk

    images = []
    for name in ("fixed", "moving"):
        image = itk.image_from_array(np.load(workdir / f"{name}.npy"))
        image.SetSpacing([float(s) for s in spacing])
        images.append(image)
    return images


def transform_points(transform, points):
    return np.array([list(transform.TransformPoint([float(c) for c in p])) for p in points])


def child_context(spec):
    """Import paths, threads, seed; returns (torch, device, sync)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)  # both sides draw the GradICON regularizer's noise from the global RNG
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

        def sync():
            torch.cuda.synchronize(device)
    else:
        def sync():
            pass
    return torch, device, sync


def job_prepare(spec, workdir: Path) -> dict:
    """Randomized checkpoint and the image pair, written once for every other job."""
    torch, device, _ = child_context(spec)
    from helpers import random_network, smooth_volume
    from mgr_engine.model import official_state_dict

    net = random_network(tuple(spec["shape"]), displacement_scale=0.3)
    torch.save(official_state_dict(net), workdir / "weights.trch")
    for name, seed in (("fixed", 1), ("moving", 2)):
        np.save(workdir / f"{name}.npy", smooth_volume(tuple(spec["image_shape"]), seed=seed))
    info = {
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def job_ours(spec, workdir: Path, io_steps) -> dict:
    torch, device, sync = child_context(spec)
    import mgr_engine
    from mgr_engine import NetworkConfig

    fixed, moving = load_pair(workdir, spec["spacing"])
    timer = StepTimer(sync) if io_steps else None
    start = time.perf_counter()
    engine = mgr_engine.Engine(weights=str(workdir / "weights.trch"),
                               config=NetworkConfig(input_shape=tuple(spec["shape"])), device=device)
    sync()
    out = {"setup_s": time.perf_counter() - start, "rss_after_setup": current_rss_bytes(), "times_s": []}
    for _ in range(1 if io_steps else 2):
        start = time.perf_counter()
        result = engine.register(fixed, moving, fixed_modality="mri", moving_modality="mri",
                                 io_iterations=io_steps, io_sim="lncc", progress=False)
        transform = result.transform
        sync()
        out["times_s"].append(time.perf_counter() - start)
    if timer:
        out["steps_s"] = timer.steps()
        out["io_losses"] = list(result.io_losses)
    np.save(workdir / f"{spec['job']}_points.npy", transform_points(transform, np.load(workdir / "points.npy")))
    return out


def job_reference(spec, workdir: Path, io_steps) -> dict:
    torch, device, sync = child_context(spec)
    import icon_registration.config as icon_config
    import unigradicon
    from helpers import reference_network
    from icon_registration import itk_wrapper
    from mgr_engine.model import GradICONNetwork, NetworkConfig, load_official_state_dict

    icon_config.device = device
    if spec["reference_keeps_freed_memory"]:
        from mgr_engine import host_memory

        host_memory.keep_freed_memory()
    fixed, moving = load_pair(workdir, spec["spacing"])
    timer = StepTimer(sync) if io_steps else None
    start = time.perf_counter()
    state = torch.load(workdir / "weights.trch", map_location="cpu", weights_only=True)
    ours = GradICONNetwork(NetworkConfig(input_shape=tuple(spec["shape"])))
    load_official_state_dict(ours, state)
    net = reference_network(ours).to(device)  # GradientICONSparse, LNCC sigma 5, lambda 1.5
    del ours, state
    sync()
    out = {"setup_s": time.perf_counter() - start, "rss_after_setup": current_rss_bytes(), "times_s": []}
    for _ in range(1 if io_steps else 2):
        start = time.perf_counter()
        fixed_pre = unigradicon.preprocess(fixed, modality="mri")
        moving_pre = unigradicon.preprocess(moving, modality="mri")
        transform, _inverse = itk_wrapper.register_pair(net, moving_pre, fixed_pre, finetune_steps=io_steps)
        sync()
        out["times_s"].append(time.perf_counter() - start)
    if timer:
        out["steps_s"] = timer.steps()
    np.save(workdir / f"{spec['job']}_points.npy", transform_points(transform, np.load(workdir / "points.npy")))
    return out


def run_child(job: str, workdir: Path) -> None:
    spec = json.loads((workdir / "spec.json").read_text())
    spec["job"] = job
    io_steps = spec["io_steps"] if job.endswith("_io") else None
    if job == "prepare":
        out = job_prepare(spec, workdir)
    elif job.startswith("ours"):
        out = job_ours(spec, workdir, io_steps)
    elif job.startswith("reference"):
        out = job_reference(spec, workdir, io_steps)
    else:
        raise SystemExit(f"unknown job {job!r}")
    import torch

    from mgr_engine import host_memory

    out["keeps_freed_memory"] = host_memory.keeping_freed_memory()
    out["peak_rss"] = peak_rss_bytes()
    out["threads"] = torch.get_num_threads()
    if spec["device"] == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    (workdir / f"{job}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- parent side


def spawn(job: str, workdir: Path) -> dict:
    """Run one job in a fresh interpreter; its stdout (the reference prints losses) is kept
    and shown only on failure."""
    print(f"[bench] {job} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", job, "--workdir", str(workdir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise SystemExit(f"[bench] {job} failed (exit {proc.returncode}):\n{tail}")
    print(f"[bench] {job} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return json.loads((workdir / f"{job}.json").read_text())


def random_points(image_shape, spacing, count, seed=0):
    """Physical points (x, y, z; mm) uniformly inside the fixed image: zero origin, identity
    direction, continuous index in [0, size - 1]."""
    size_xyz = np.asarray(list(reversed(image_shape)), dtype=np.float64)
    index = np.random.default_rng(seed).uniform(0, 1, (count, 3)) * (size_xyz - 1)
    return index * np.asarray(spacing, dtype=np.float64)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 0.1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.0f} ms"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_ratio(reference, ours) -> str:
    if not reference or not ours:
        return "-"
    ratio = reference / ours
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def table(title, rows):
    lines = [f"| {title} | mgr_engine | reference | reference / mgr_engine |", "|---|--:|--:|--:|"]
    for label, ours, ref, fmt in rows:
        lines.append(f"| {label} | {fmt(ours)} | {fmt(ref)} | {fmt_ratio(ref, ours)} |")
    return lines


def max_point_difference(workdir: Path, job_a: str, job_b: str) -> float:
    a = np.load(workdir / f"{job_a}_points.npy")
    b = np.load(workdir / f"{job_b}_points.npy")
    return float(np.linalg.norm(a - b, axis=1).max())


def report(args, info, results, workdir: Path) -> str:
    shape = "x".join(map(str, args.shape))
    image = "x".join(map(str, args.image_shape))
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    threads = results["ours"]["threads"]
    device = f"CUDA, {info['gpu']}" if args.device == "cuda" else "CPU"
    lines = [
        f"## mgr_engine vs reference: network {shape}, image {image}, {device}",
        "",
        f"- Machine: {cpu_model()}, {cores} cores ({usable} usable), torch {info['torch']} with {threads} threads; "
        f"{device}; Python {platform.python_version()}; {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        f"- Versions: mgr_engine {version('mgr_engine')}; reference unigradicon {version('unigradicon')} + "
        f"icon_registration {version('icon_registration')}; itk {version('itk')}.",
        f"- Checkpoint: randomized weights of the official architecture ({info['parameters'] / 1e6:.1f} M parameters, "
        "BatchNorm statistics random too), one .trch loaded by both sides.",
        f"- Images: two smooth random volumes {image} (z y x) float32, spacing {tuple(args.spacing)} mm (x y z), "
        "modality mri. Each measurement in a fresh process.",
        "- Timed: ours `Engine.register` + `result.transform`; reference `unigradicon.preprocess` x2 + "
        "`itk_wrapper.register_pair` (which computes both directions and the loss). The first call of either "
        "includes ITK's lazy loading of its transform modules (seconds), as a one-shot command line run does.",
        f"- Freed host memory kept for reuse (`mgr_engine.host_memory`): ours {results['ours']['keeps_freed_memory']}, "
        f"reference {results['reference']['keeps_freed_memory']}.",
        "",
    ]
    ours, ref = results["ours"], results["reference"]
    rows = [
        ("setup: load checkpoint, build network", ours["setup_s"], ref["setup_s"], fmt_s),
        ("registration, first call (cold)", ours["times_s"][0], ref["times_s"][0], fmt_s),
        ("registration, second call (warm)", ours["times_s"][1], ref["times_s"][1], fmt_s),
        ("memory after setup (RSS)", ours["rss_after_setup"], ref["rss_after_setup"], fmt_bytes),
        ("peak memory (RSS)", ours["peak_rss"], ref["peak_rss"], fmt_bytes),
    ]
    if args.device == "cuda":
        rows.append(("peak GPU memory (max_memory_allocated)", ours["gpu_peak"], ref["gpu_peak"], fmt_bytes))
    lines += table("without instance optimization", rows)
    lines += ["", f"Largest difference between both transforms at {args.points} random points in the fixed image "
                  f"(no IO): {max_point_difference(workdir, 'ours', 'reference'):.2e} mm.", ""]
    if not args.skip_io:
        ours_io, ref_io = results["ours_io"], results["reference_io"]
        n = args.io_steps
        steps = f"{n} Adam step{'s' if n != 1 else ''}"

        def mean(values):
            return sum(values) / len(values) if values else None

        rows = [
            ("setup: load checkpoint, build network", ours_io["setup_s"], ref_io["setup_s"], fmt_s),
            (f"total: preprocess, {steps}, final forward, transform", ours_io["times_s"][0], ref_io["times_s"][0], fmt_s),
            (f"per IO step (mean of {len(ours_io['steps_s'])})", mean(ours_io["steps_s"]), mean(ref_io["steps_s"]), fmt_s),
            ("peak memory (RSS)", ours_io["peak_rss"], ref_io["peak_rss"], fmt_bytes),
        ]
        if args.device == "cuda":
            rows.append(("peak GPU memory (max_memory_allocated)", ours_io["gpu_peak"], ref_io["gpu_peak"], fmt_bytes))
        lines += table(f"instance optimization, {steps}, LNCC", rows)
        lines += ["", f"Step times (s): mgr_engine {', '.join(f'{s:.2f}' for s in ours_io['steps_s'])}; "
                      f"reference {', '.join(f'{s:.2f}' for s in ref_io['steps_s'])}. Largest point difference "
                      f"after IO (same seed for the regularizer's noise): "
                      f"{max_point_difference(workdir, 'ours_io', 'reference_io'):.2e} mm.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.workdir)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mgr_bench_") as tmp:
        workdir = Path(tmp)
        spec = {"shape": list(args.shape), "image_shape": list(args.image_shape), "spacing": list(args.spacing),
                "device": args.device, "threads": args.threads, "io_steps": args.io_steps,
                "reference_keeps_freed_memory": args.reference_keeps_freed_memory}
        (workdir / "spec.json").write_text(json.dumps(spec))
        np.save(workdir / "points.npy", random_points(args.image_shape, args.spacing, args.points))
        info = spawn("prepare", workdir)
        jobs = JOBS_NO_IO + (() if args.skip_io else JOBS_IO)
        results = {job: spawn(job, workdir) for job in jobs}
        text = report(args, info, results, workdir)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
