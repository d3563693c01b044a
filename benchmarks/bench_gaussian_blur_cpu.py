#!/usr/bin/env python
"""The C++ Gaussian blur of LNCC (kernels/gaussian_blur_cpu.py) against the PyTorch path's banded
matrix products on the CPU.

At 175^3 by default, host memory kept as the engine keeps it: median time and allocated memory
of the blur of the three volumes LNCC blurs per call (forward, and forward + backward), and of
the whole 1-LNCC^2 loss with its gradient (the target's moments computed once, as IO does).
End to end, with randomized official weights, in one process: one IO call
(``instance_optimize`` with one step and the final forward) with the PyTorch blur and with
the C++ one.

    .venv/bin/python benchmarks/bench_gaussian_blur_cpu.py
    .venv/bin/python benchmarks/bench_gaussian_blur_cpu.py --shape 96 96 96 --repeats 3   # quick

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
from mgr_engine.kernels import gaussian_blur_cpu  # noqa: E402

PYTORCH_BLUR = mock.patch.object(losses, "use_cpp_blur", lambda *args: False)


def op_rows(shape, repeats):
    """(label, PyTorch seconds, C++ seconds, PyTorch MiB, C++ MiB, largest relative difference)."""
    from helpers import smooth_volume

    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 3, *shape, generator=gen).requires_grad_()
    grad_out = torch.randn(volume.shape, generator=gen)
    taps = losses.gaussian_kernel1d()
    image = torch.from_numpy(smooth_volume(shape, 1))[None, None].requires_grad_()
    target = torch.from_numpy(smooth_volume(shape, 2))[None, None]
    moments = losses.target_moments(target)
    cases = {
        "blur, 3 volumes, forward": lambda op: lambda: op(volume.detach(), taps),
        "blur, 3 volumes, forward + backward": lambda op: lambda: torch.autograd.grad(op(volume, taps), volume, grad_out),
        "1 - LNCC^2, forward + backward": None,
    }
    rows = []
    for label, make in cases.items():
        if make is not None:
            ref, ours = make(gaussian_blur_cpu.reference), make(gaussian_blur_cpu.blur)
        else:
            def loss_gradient():
                return torch.autograd.grad(losses.lncc2_loss(image, target, moments_of_target=moments), image)

            def ref():
                with PYTORCH_BLUR:
                    return loss_gradient()
            ours = loss_gradient
        got, expected = ours(), ref()
        got, expected = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
        difference = float((got - expected).abs().max() / expected.abs().max())
        rows.append((label, timed(ref, "cpu", repeats), timed(ours, "cpu", repeats), allocated_mib(ref),
                     allocated_mib(ours), difference))
    return rows


def main(argv=None) -> int:
    args = cpu_benchmark_parser(__doc__).parse_args(argv)
    exit_unless_built(gaussian_blur_cpu.available(), "_gaussian_blur_cpu")
    host_memory.keep_freed_memory()
    shape = tuple(args.shape)
    print(f"{machine_line()}, {shape}, median of {args.repeats}\n")
    print("| op | PyTorch (matrix products) | C++ | speed-up | allocated PyTorch | allocated C++ | difference |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for label, t_ref, t_ours, m_ref, m_ours, difference in op_rows(shape, args.repeats):
        print(f"| {label} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.0f} ms | {t_ref / t_ours:.2f}x | {m_ref:.0f} MiB "
              f"| {m_ours:.0f} MiB | {difference:.1e} |")
    print("(difference: largest, relative to the largest value; of the loss row, the image's gradient)")
    if not args.skip_end_to_end:
        pytorch, ours = io_call_seconds(shape, max(2, args.repeats // 2), PYTORCH_BLUR)
        print(f"\nIO call with one step (objective forward + backward, Adam step, final forward): PyTorch blur "
              f"{pytorch:.1f} s, C++ {ours:.1f} s ({pytorch / ours:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
