#!/usr/bin/env python
"""Time the network's forward in ONNX Runtime (CPU) against the engine's PyTorch path and the
reference, on one randomized checkpoint and one image pair, in one run.

Every pipeline computes one direction, the map ``Phi[moving, fixed]`` at the network input
shape (default 175^3), from the same preprocessed pair (two smooth random volumes at that
shape), each in a fresh subprocess with the same thread count:

* ``torch``: ``Engine.predict_map`` (BatchNorm folded, channels-last), the engine's default path;
* ``reference``: the authors' network (icon_registration's ``TwoStepRegistration`` of ``UNet2``,
  built by ``tests/helpers.reference_network``), ``regis_net(moving, fixed)(identity)``;
* ``ort_full``: the full graph as ``export_onnx`` writes it (sub-pixel transposed convolutions,
  maps in GridSample's form);
* ``ort_native``: the same graph without those rewrites (``cpu_rewrites=False``: ``ConvTranspose``
  nodes and a 3-D last convolution);
* ``ort_torch_export``: ``torch.onnx.export`` (dynamo, opset 20) of the unfolded
  ``GradICONNetwork``, unchanged, in a session with ONNX Runtime's default options: what
  exporting the network as it is gives (the other ORT jobs use the engine's session options);
* ``ort_stages``: the four stage graphs in ONNX Runtime, warps and compositions in PyTorch;
* ``ort_fp16``: the full graph with float16 U-Nets (the CPU provider runs float16 Conv nodes
  through inserted casts: float16 storage, float32 arithmetic).

Reported: first call (includes one-time set-up), best and median of the following calls,
session creation, peak memory, largest point difference against the ``torch`` map in voxels,
and ONNX Runtime's per-operator time (its profiler) for the ORT graphs.

    .venv/bin/python benchmarks/bench_onnx.py                          # 175^3, 3 calls each
    .venv/bin/python benchmarks/bench_onnx.py --shape 72 72 72 --calls 2 --skip torch_export
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
JOBS = ("torch", "reference", "ort_full", "ort_native", "ort_torch_export", "ort_stages", "ort_fp16")
LABELS = {
    "torch": "mgr_engine, PyTorch (folded BN, channels-last)",
    "reference": "reference network, PyTorch",
    "ort_full": "ONNX Runtime, full graph as exported",
    "ort_native": "ONNX Runtime, full graph without CPU rewrites",
    "ort_torch_export": "ONNX Runtime, torch.onnx.export of the unfolded network",
    "ort_stages": "ONNX Runtime stage graphs + PyTorch warps",
    "ort_fp16": "ONNX Runtime, full graph, float16 U-Nets",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175), metavar=("D", "H", "W"))
    p.add_argument("--calls", type=int, default=3, help="forward calls per pipeline and round (the first is reported apart)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds over all pipelines, each pipeline in a fresh process per round (default 2): on a "
                        "shared machine, a burst of load then hits every pipeline rather than one")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--skip", nargs="*", default=[], choices=[j[4:] if j.startswith("ort_") else j for j in JOBS],
                   help="pipelines to leave out (names without the ort_ prefix)")
    p.add_argument("--results", type=Path, help="also append the Markdown section to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls < 2:
        p.error("--calls must be at least 2 (one cold, one warm)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


# ---------------------------------------------------------------- child side


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def setup(spec):
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import torch

    torch.set_num_threads(spec["threads"])
    return torch


def load_network(spec, workdir):
    torch = setup(spec)
    from mgr_engine.model import GradICONNetwork, NetworkConfig, load_official_state_dict

    net = GradICONNetwork(NetworkConfig(input_shape=tuple(spec["shape"])))
    load_official_state_dict(net, torch.load(workdir / "weights.trch", weights_only=True))
    return net.eval()


def pair(workdir):
    import torch

    return (torch.from_numpy(np.load(workdir / "moving.npy"))[None, None],
            torch.from_numpy(np.load(workdir / "fixed.npy"))[None, None])


def timed_calls(run, calls):
    times, out = [], None
    for _ in range(calls):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return times, out


def job_prepare(spec, workdir):
    torch = setup(spec)
    from helpers import random_network, smooth_volume
    from mgr_engine import export_onnx
    from mgr_engine.model import official_state_dict

    shape = tuple(spec["shape"])
    net = random_network(shape, seed=7, displacement_scale=0.3)
    state = official_state_dict(net)
    torch.save(state, workdir / "weights.trch")
    np.save(workdir / "moving.npy", smooth_volume(shape, seed=2))
    np.save(workdir / "fixed.npy", smooth_volume(shape, seed=1))
    out = {"parameters": sum(p.numel() for p in net.parameters()), "export_s": {}}
    exports = {"ort_full": ("full.onnx", {}), "ort_native": ("full_native.onnx", {"cpu_rewrites": False}),
               "ort_stages": ("stages", {"kind": "stages"}), "ort_fp16": ("full_fp16.onnx", {"dtype": "float16"})}
    for job, (name, options) in exports.items():
        if job in spec["jobs"]:
            start = time.perf_counter()
            export_onnx(workdir / name, weights=state, config=net.config, **options)
            out["export_s"][job] = time.perf_counter() - start
    if "ort_torch_export" in spec["jobs"]:
        moving, fixed = pair(workdir)
        start = time.perf_counter()
        torch.onnx.export(net, (moving, fixed), str(workdir / "torch_export.onnx"), opset_version=20, dynamo=True,
                          input_names=["moving", "fixed"], output_names=["map"], verbose=False)
        out["export_s"]["ort_torch_export"] = time.perf_counter() - start
    out["torch"] = torch.__version__
    return out


def job_torch(spec, workdir):
    torch = setup(spec)
    from mgr_engine import Engine

    moving, fixed = pair(workdir)
    start = time.perf_counter()
    engine = Engine(weights=workdir / "weights.trch", config=load_network(spec, workdir).config, device="cpu")
    setup_s = time.perf_counter() - start
    times, phi = timed_calls(lambda: engine.predict_map(moving, fixed), spec["calls"])
    return {"setup_s": setup_s, "times_s": times, "threads": torch.get_num_threads()}, phi


def job_reference(spec, workdir):
    torch = setup(spec)
    from helpers import reference_network

    moving, fixed = pair(workdir)
    start = time.perf_counter()
    ref = reference_network(load_network(spec, workdir))
    setup_s = time.perf_counter() - start
    ref.identity_map.isIdentity = True

    def run():
        with torch.no_grad():
            return ref.regis_net(moving, fixed)(ref.identity_map)

    times, phi = timed_calls(run, spec["calls"])
    return {"setup_s": setup_s, "times_s": times}, phi


def job_ort(spec, workdir, job):
    import onnxruntime as ort

    torch = setup(spec)
    moving, fixed = pair(workdir)
    if job == "ort_stages":
        from mgr_engine import Engine

        start = time.perf_counter()
        engine = Engine(weights=workdir / "weights.trch", config=load_network(spec, workdir).config, device="cpu",
                        backend="onnxruntime", onnx_model=workdir / "stages")
        setup_s = time.perf_counter() - start
        times, phi = timed_calls(lambda: engine.predict_map(moving, fixed), spec["calls"])
        return {"setup_s": setup_s, "times_s": times}, phi
    path = workdir / {"ort_full": "full.onnx", "ort_native": "full_native.onnx", "ort_fp16": "full_fp16.onnx",
                      "ort_torch_export": "torch_export.onnx"}[job]
    if job == "ort_torch_export":  # as it is: ONNX Runtime's default session options
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.log_severity_level = 3
    else:  # the engine's (backend="onnxruntime")
        from mgr_engine.export.runtime import session_options

        options = session_options(spec["threads"])
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile_{job}")
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    setup_s = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]
    feed = {names[0]: moving.numpy(), names[1]: fixed.numpy()}
    output = [o.name for o in session.get_outputs()][0]
    times, phi = timed_calls(lambda: session.run([output], feed)[0], spec["calls"])
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_call = len(nodes) // spec["calls"]
    by_op = collections.Counter()
    for event in nodes[-per_call:]:  # the last call
        by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return {"setup_s": setup_s, "times_s": times, "ops_s": dict(by_op.most_common()), "nodes": per_call,
            "ort": ort.__version__}, torch.from_numpy(phi)


def run_child(job, workdir):
    spec = json.loads((workdir / "spec.json").read_text())
    load_before = os.getloadavg()[0]
    if job == "prepare":
        out, phi = job_prepare(spec, workdir), None
    elif job == "torch":
        out, phi = job_torch(spec, workdir)
    elif job == "reference":
        out, phi = job_reference(spec, workdir)
    else:
        out, phi = job_ort(spec, workdir, job)
    if phi is not None:
        np.save(workdir / f"{job}_map.npy", phi.float().numpy())
    out["peak_rss"] = peak_rss_bytes()
    out["load"] = [load_before, os.getloadavg()[0]]
    (workdir / f"{job}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- parent side


def spawn(job, workdir, label=""):
    print(f"[bench] {job}{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", job, "--workdir", str(workdir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {job} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    print(f"[bench] {job}{label} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return json.loads((workdir / f"{job}.json").read_text())


def merge(rounds):
    """One pipeline's rounds: first calls, warm calls, set-up and the worst peak memory."""
    return {"first_s": [r["times_s"][0] for r in rounds], "warm_s": [t for r in rounds for t in r["times_s"][1:]],
            "setup_s": min(r["setup_s"] for r in rounds), "peak_rss": max(r["peak_rss"] for r in rounds),
            "load": [v for r in rounds for v in r["load"]], **{k: rounds[-1][k] for k in ("ops_s", "nodes")
                                                              if k in rounds[-1]}}


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def voxel_difference(workdir, job, shape):
    scale = (np.asarray(shape, np.float64) - 1).reshape(1, 3, 1, 1, 1)
    a = np.load(workdir / f"{job}_map.npy").astype(np.float64)
    b = np.load(workdir / "torch_map.npy").astype(np.float64)
    return float((np.abs(a - b) * scale).max())


def report(args, jobs, results, workdir):
    shape = tuple(args.shape)
    prep = results["prepare"]
    base = min(results["torch"]["warm_s"])
    load = [v for r in results.values() for v in r["load"]]
    lines = [
        "## ONNX Runtime",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_onnx.py --shape {' '.join(map(str, shape))} --calls {args.calls}"
        f" --rounds {args.rounds} --threads {args.threads}" + (f" --skip {' '.join(args.skip)}" if args.skip else "")
        + "`.",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads for torch and ONNX Runtime; CPU; "
        f"Python {platform.python_version()}; {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Load average "
        f"during the jobs {min(load):.2f}..{max(load):.2f} (the machine was shared).",
        f"- Versions: torch {prep['torch']}, onnxruntime {version('onnxruntime')}, onnx {version('onnx')}, "
        f"mgr_engine {version('mgr_engine')}, icon_registration {version('icon_registration')}.",
        f"- Network {'x'.join(map(str, shape))}, official channel widths, randomized weights "
        f"({prep['parameters'] / 1e6:.1f} M parameters, BatchNorm statistics random too). Input: two smooth random "
        f"volumes at that shape, already preprocessed. One direction per call; {args.rounds} rounds over all pipelines, "
        f"each pipeline in a fresh process per round, {args.calls} calls each: \"first call\" is the best first call of "
        "the rounds (one-time set-up included), best and median over the other calls.",
        "",
        f"| pipeline (one direction) | first call | best of {args.rounds * (args.calls - 1)} more | median | best vs mgr_engine PyTorch "
        "| set-up | peak RSS | max difference from mgr_engine PyTorch |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for job in jobs:
        r = results[job]
        warm = r["warm_s"]
        diff = "-" if job == "torch" else f"{voxel_difference(workdir, job, shape):.1e} voxel"
        lines.append(f"| {LABELS[job]} | {min(r['first_s']):.2f} s | {min(warm):.2f} s | {statistics.median(warm):.2f} s "
                     f"| {min(warm) / base:.2f}x | {r['setup_s']:.1f} s | {r['peak_rss'] / 2**30:.2f} GiB | {diff} |")
    ort_jobs = [j for j in jobs if "ops_s" in results[j]]
    if ort_jobs:
        ops = sorted({op for j in ort_jobs for op in results[j]["ops_s"]},
                     key=lambda op: -max(results[j]["ops_s"].get(op, 0) for j in ort_jobs))
        lines += ["", "ONNX Runtime profiler, seconds per operator type in the last call (kernel time):", "",
                  "| operator | " + " | ".join(j.replace("ort_", "") for j in ort_jobs) + " |",
                  "|---|" + "--:|" * len(ort_jobs)]
        for op in ops:
            lines.append(f"| {op} | " + " | ".join(f"{results[j]['ops_s'].get(op, 0):.2f}" for j in ort_jobs) + " |")
        lines.append("| (nodes) | " + " | ".join(str(results[j]["nodes"]) for j in ort_jobs) + " |")
    exports = ", ".join(f"{j.replace('ort_', '')} {s:.1f} s" for j, s in prep["export_s"].items())
    if exports:
        lines += ["", f"Export times: {exports}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.workdir)
        return
    jobs = [j for j in JOBS if j.replace("ort_", "") not in args.skip and j not in args.skip]
    if "torch" not in jobs:
        raise SystemExit("the torch pipeline is the baseline; it cannot be skipped")
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        workdir = Path(tmp)
        spec = {"shape": list(args.shape), "calls": args.calls, "threads": args.threads, "jobs": jobs}
        (workdir / "spec.json").write_text(json.dumps(spec))
        prepare = spawn("prepare", workdir)
        rounds = {job: [] for job in jobs}
        for index in range(args.rounds):
            for job in jobs:
                rounds[job].append(spawn(job, workdir, f" (round {index + 1}/{args.rounds})"))
                if job != "torch":  # keep this round's map for the comparison against torch's
                    os.replace(workdir / f"{job}_map.npy", workdir / f"{job}_map_last.npy")
        for job in jobs:
            if job != "torch":
                os.replace(workdir / f"{job}_map_last.npy", workdir / f"{job}_map.npy")
        results = {"prepare": prepare, **{job: merge(rounds[job]) for job in jobs}}
        text = report(args, jobs, results, workdir)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
