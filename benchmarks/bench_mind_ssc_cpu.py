#!/usr/bin/env python
"""The C++ MIND-SSC descriptor and loss (kernels/mind_ssc_cpu.py) against the PyTorch path of
mgr_engine.losses on the CPU.

At 175^3 by default, host memory kept as the engine keeps it: median time and allocated memory
of the descriptor (forward, and forward + backward) and of the MIND-SSC loss with its gradient
(the target's descriptor computed once, as IO does). End to end, with randomized official
weights, in one process: one IO call (``instance_optimize(similarity="mind")`` with one step
and the final forward) with the PyTorch descriptor and loss and with the C++ ones.

    .venv/bin/python benchmarks/bench_mind_ssc_cpu.py
    .venv/bin/python benchmarks/bench_mind_ssc_cpu.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import (allocated_mib, cpu_benchmark_parser, exit_unless_built, io_call_seconds,  # noqa: E402
                            machine_line)

from mgr_engine import host_memory, losses  # noqa: E402
from mgr_engine.kernels import mind_ssc_cpu  # noqa: E402

PYTORCH_MIND = mock.patch.object(losses, "use_cpp_mind", lambda *args: False)


def op_rows(shape, repeats):
    """(label, PyTorch seconds, C++ seconds, PyTorch MiB, C++ MiB, PyTorch's and C++'s largest
    difference from float64), float32 like the engine."""
    from helpers import smooth_volume

    def cases(dtype):
        image = torch.from_numpy(smooth_volume(shape, 1))[None, None].to(dtype).requires_grad_()
        target = torch.from_numpy(smooth_volume(shape, 2))[None, None].to(dtype)
        grad_out = torch.randn(1, 12, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)

        def loss_gradient():
            similarity = losses.with_constant_targets(losses.mind_loss)
            similarity(image, target)  # the target's descriptor, computed once as in IO
            return lambda: torch.autograd.grad(similarity(image, target), image)[0]

        return {"descriptor, forward": lambda: lambda: losses.mind_ssc(image.detach()),
                "descriptor, forward + backward":
                    lambda: lambda: torch.autograd.grad(losses.mind_ssc(image), image, grad_out)[0],
                "MIND-SSC loss, forward + backward": loss_gradient}

    rows = []
    for (label, make), make_float64 in zip(cases(torch.float32).items(), cases(torch.float64).values()):
        # float64 in C++ (equal to PyTorch's float64 to 1e-12 in the tests): PyTorch's float32
        # descriptor varies from call to call by up to 1e-4 where the variance is clamped
        exact = make_float64()()
        with PYTORCH_MIND:
            ref = make()

        def pytorch(ref=ref):
            with PYTORCH_MIND:
                return ref()
        ours = make()
        differences = [float((fn().double() - exact).abs().max() / exact.abs().max()) for fn in (pytorch, ours)]
        rows.append((label, timed(pytorch, "cpu", repeats), timed(ours, "cpu", repeats), allocated_mib(pytorch),
                     allocated_mib(ours), *differences))
    return rows


def main(argv=None) -> int:
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(mind_ssc_cpu.available(), "_mind_ssc_cpu")
    host_memory.keep_freed_memory()
    shape = tuple(args.shape)
    print(f"{machine_line()}, {shape}, median of {args.repeats}\n")
    print("| op | PyTorch | C++ | speed-up | allocated PyTorch | allocated C++ | PyTorch from float64 | C++ from float64 |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for label, t_ref, t_ours, m_ref, m_ours, d_ref, d_ours in op_rows(shape, args.repeats):
        print(f"| {label} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.0f} ms | {t_ref / t_ours:.2f}x | {m_ref:.0f} MiB "
              f"| {m_ours:.0f} MiB | {d_ref:.1e} | {d_ours:.1e} |")
    print("(from float64: the largest difference from the op in float64, relative to its largest value; of the "
          "gradient rows, the image's gradient)")
    padded_mib = torch.Size([size + 4 for size in shape]).numel() * 4 / 2**20
    print(f"(the C++ column counts torch's allocations; the extension's own buffers come on top: the padded image, "
          f"{padded_mib:.0f} MiB, in the forward; it, its gradient and the variance, "
          f"{2 * padded_mib + shape[0] * shape[1] * shape[2] * 4 / 2**20:.0f} MiB, in the backward)")
    if not args.skip_end_to_end:
        pytorch, ours = io_call_seconds(shape, max(2, args.repeats // 2), PYTORCH_MIND, similarity="mind")
        print(f"\nIO call with one MIND-SSC step (objective forward + backward, Adam step, final forward): "
              f"PyTorch descriptor {pytorch:.1f} s, C++ {ours:.1f} s ({pytorch / ours:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
