#!/usr/bin/env python
"""Where a warm IO call's time goes on the CPU: every op, by name and by shape.

Runs ``Engine.instance_optimize`` (randomized official weights, the benchmarks' smooth pair; with
``--no-io`` ``Engine.predict_map``, a registration without IO) with ``--warmups`` untimed calls
first, then ``--calls`` timed ones. Each aten op is timed through a ``TorchDispatchMode``, each
call into a C++ extension (``mgr_engine._*_cpu``) through a wrapper; a C++ call's time excludes
the aten ops it dispatches (its allocations), so no time is counted twice. Prints how much of the
wall time the timed ops cover (the rest is Python, autograd's bookkeeping and the timer itself),
then two Markdown tables, per call: ops by name, and the largest ``(op, shapes)`` items with
their time per call, each with the page faults it took (an op that wrote fresh memory, where the
heap grew, is slow for that reason alone).

    .venv/bin/python benchmarks/profile_io_cpu.py                      # 175^3, one step
    .venv/bin/python benchmarks/profile_io_cpu.py --no-io --calls 5    # predict_map
    .venv/bin/python benchmarks/profile_io_cpu.py --shape 96 96 96 --warmups 1   # quick

Needs no itk. The timer adds a few percent; use it to find what to work on, and the per-kernel
benchmarks (bench_*_cpu.py) to measure a change.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

import numpy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench_warp_cpu import machine_line, markdown_table  # noqa: E402

EXTENSIONS = ("_encoder_cpu", "_gaussian_blur_cpu", "_jacobian_cpu", "_last_conv_cpu", "_mind_ssc_cpu",
              "_resample_cpu", "_trilinear_cpu", "_upconv_cpu")


def minor_faults() -> int:
    """The process's minor page faults so far (all threads): a first touch of fresh memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class OpTimer(TorchDispatchMode):
    """Seconds, page faults and calls per ``(name, shapes)``, exclusive of nested timed calls.
    The faults tell an op that wrote fresh pages (the heap grown: about 20 us a fault on the
    2-core VM of RESULTS.md's fifty-fourth session) from one that ran slow."""

    def __init__(self):
        super().__init__()
        self.seconds = collections.defaultdict(float)
        self.faults = collections.Counter()
        self.calls = collections.Counter()
        self._nested = [[0.0, 0]]  # time and faults of the timed calls inside the current one, per level

    def timed(self, name, shapes, fn, *args, **kwargs):
        self._nested.append([0.0, 0])
        start, faults = time.perf_counter(), minor_faults()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed, faulted = time.perf_counter() - start, minor_faults() - faults
            inner_seconds, inner_faults = self._nested.pop()
            self._nested[-1][0] += elapsed
            self._nested[-1][1] += faulted
            self.seconds[name, shapes] += elapsed - inner_seconds
            self.faults[name, shapes] += faulted - inner_faults
            self.calls[name, shapes] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.timed(func.overloadpacket.__name__, shapes_of(args), func, *args, **(kwargs or {}))


def shapes_of(args) -> str:
    """The shapes of the tensor and array arguments (the extensions take NumPy views; lists
    included), as ``1x16x88^3`` where the last three sizes are equal; other arguments left out."""
    def shape(t):
        s = list(t.shape)
        if len(s) >= 3 and s[-1] == s[-2] == s[-3]:
            return "x".join(map(str, s[:-3] + [f"{s[-1]}^3"]))
        return "x".join(map(str, s)) or "scalar"

    def is_array(a):
        return isinstance(a, (torch.Tensor, numpy.ndarray))

    found = []
    for a in args:
        if is_array(a):
            found.append(shape(a))
        elif isinstance(a, (list, tuple)) and any(is_array(t) for t in a):
            found.append("[" + ", ".join(shape(t) for t in a if is_array(t)) + "]")
    return ", ".join(found)


def wrap_extensions(timer: OpTimer) -> None:
    """Route every function of the built C++ extensions through ``timer``."""
    import importlib

    for module_name in EXTENSIONS:
        try:
            module = importlib.import_module(f"mgr_engine.{module_name}")
        except ImportError:
            continue
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith("_") or not callable(fn) or name == "simd_bytes":
                continue

            def wrapper(*args, _fn=fn, _name=f"{module_name.strip('_')}.{name}", **kwargs):
                return timer.timed(_name, shapes_of(args), _fn, *args, **kwargs)

            setattr(module, name, wrapper)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--iterations", type=int, default=1, help="IO steps per call (default 1)")
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--calls", type=int, default=1, help="timed IO calls, averaged (default 1)")
    parser.add_argument("--similarity", default="lncc2")
    parser.add_argument("--top", type=int, default=25, help="rows of the by-shape table")
    parser.add_argument("--no-io", action="store_true", help="profile predict_map (no IO) instead")
    args = parser.parse_args(argv)

    from helpers import benchmark_engine

    from mgr_engine.kernels import upconv_cpu

    engine, moving, fixed = benchmark_engine(tuple(args.shape))

    def call():
        if args.no_io:
            engine.predict_map(moving, fixed)
        else:
            engine.instance_optimize(moving, fixed, iterations=args.iterations, similarity=args.similarity,
                                     progress=False)

    for _ in range(args.warmups):
        call()
    timer = OpTimer()
    wrap_extensions(timer)
    start, faults = time.perf_counter(), minor_faults()
    with timer:
        for _ in range(args.calls):
            call()
    wall = (time.perf_counter() - start) / args.calls
    faults = (minor_faults() - faults) / args.calls

    per_call = {key: s / args.calls for key, s in timer.seconds.items()}
    by_name = collections.defaultdict(float)
    calls_by_name, faults_by_name = collections.Counter(), collections.Counter()
    for (name, shapes), s in per_call.items():
        by_name[name] += s
        calls_by_name[name] += timer.calls[name, shapes] / args.calls
        faults_by_name[name] += timer.faults[name, shapes] / args.calls
    timed_total = sum(per_call.values())

    print(machine_line(upconv_cpu.vector_bytes()))
    what = ("predict_map (no IO)" if args.no_io else
            f"IO call ({args.iterations} step(s) and the final forward, similarity {args.similarity})")
    print(f"{what} at {'x'.join(map(str, args.shape))}: {wall:.3f} s wall, {timed_total:.3f} s in timed ops "
          f"({timed_total / wall:.0%}), {faults:,.0f} page faults; mean of {args.calls} call(s) after "
          f"{args.warmups} warm-up(s)\n")
    rows = [[name, f"{s:.3f}", f"{s / wall:.1%}", f"{calls_by_name[name]:g}", f"{faults_by_name[name]:,.0f}"]
            for name, s in sorted(by_name.items(), key=lambda item: -item[1]) if s >= 0.005]
    print(markdown_table(["op", "seconds a call", "of wall", "calls a call", "page faults a call"], rows))
    print()
    rows = []
    for (name, shapes), s in sorted(per_call.items(), key=lambda item: -item[1])[:args.top]:
        calls = timer.calls[name, shapes] / args.calls
        rows.append([name, shapes, f"{s:.3f}", f"{calls:g}", f"{1e3 * s / calls:.1f}",
                     f"{timer.faults[name, shapes] / args.calls:,.0f}"])
    print(markdown_table(["op", "tensor shapes", "seconds a call", "calls a call", "ms each", "page faults a call"],
                         rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
