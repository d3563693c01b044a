#!/usr/bin/env python
"""The C++ decoder epilogue (kernels/decoder_cpu.py) against its PyTorch ops on the CPU.

Per decoder level of a full-resolution U-Net of the official architecture at 175^3 (levels
0 and 1, the two largest): median time and allocated memory of ``decoder_cpu.reference``
(F.interpolate, addcmul, crop, cat) and of the fused kernel, channels-last inputs as the
inference network has them; the same for instance optimization's upsample-add, forward and
backward, and for its eval-mode BatchNorm, crop and concatenation (C++ against the PyTorch path
of ``model._EvalNormCropConcat``). End to end: ``Engine.predict_map`` (no IO, randomized official
weights, warm median) with the C++ warp alone and with the C++ warp and decoder, in one process.
Freed host memory kept for reuse, as the engine keeps it (:mod:`mgr_engine.host_memory`).

    .venv/bin/python benchmarks/bench_decoder_cpu.py
    .venv/bin/python benchmarks/bench_decoder_cpu.py --shape 96 96 96 --repeats 3   # quick

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
from bench_warp_cpu import allocated_mib, cpu_benchmark_parser, exit_unless_built, machine_line  # noqa: E402

from helpers import benchmark_engine, randomize_  # noqa: E402
from mgr_engine import host_memory, model, ops  # noqa: E402
from mgr_engine.kernels import decoder_cpu, warp_cpu  # noqa: E402


def level_inputs(shape, level, config):
    """(y, x, scale, skip) of decoder level ``level`` of a full-resolution U-Net, channels-last."""
    down, up = config.down_channels, config.up_channels
    grid = list(shape)
    for _ in range(level + 1):
        grid = [(n + 1) // 2 for n in grid]  # the encoder's stride-2 convolutions
    skip_grid = [(n + 1) // 2 for n in shape] if level else list(shape)
    for _ in range(level - 1):
        skip_grid = [(n + 1) // 2 for n in skip_grid]
    in_channels = down[level + 1] + (up[level + 1] if level + 1 < len(up) else 0)

    def tensor(*size):
        return torch.randn(*size).contiguous(memory_format=torch.channels_last_3d)

    return (tensor(1, up[level], *(2 * n for n in grid)), tensor(1, in_channels, *grid),
            torch.randn(1, up[level], 1, 1, 1), tensor(1, down[level], *skip_grid))


def main(argv=None) -> int:
    args = cpu_benchmark_parser(__doc__, end_to_end=False).parse_args(argv)
    exit_unless_built(warp_cpu.available(), "_trilinear_cpu")
    host_memory.keep_freed_memory()  # as the engine runs: outputs not paid again in page faults
    shape = tuple(args.shape)
    config = model.NetworkConfig(input_shape=shape)
    print(f"{machine_line()}, network input {shape}, median of {args.repeats}\n")
    print("| decoder level (x -> out) | PyTorch ops | C++ | speed-up | allocated PyTorch | allocated C++ | difference |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    with torch.no_grad():
        for level in (0, 1):
            y, x, scale, skip = level_inputs(shape, level, config)
            ours, reference = (lambda: decoder_cpu.upsample_add_concat(y, x, scale, skip),
                               lambda: decoder_cpu.reference(y, x, scale, skip))
            t_ref, t_ours = timed(reference, "cpu", args.repeats), timed(ours, "cpu", args.repeats)
            m_ref, m_ours = allocated_mib(reference), allocated_mib(ours)
            difference = float((ours() - reference()).abs().max())
            out = (y.shape[1] + skip.shape[1], *skip.shape[2:])
            print(f"| {level}: {tuple(x.shape[1:])} -> {out} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.0f} ms "
                  f"| {t_ref / t_ours:.2f}x | {m_ref:.0f} MiB | {m_ours:.0f} MiB | {difference:.1e} |")

    print("\nInstance optimization's decoder step, y + upsample(x) (BatchNorm not folded), forward + backward "
          "(gradients to y and x):\n")
    print("| decoder level (x -> y) | PyTorch ops | C++ | speed-up | allocated PyTorch | allocated C++ | difference (grad x) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for level in (0, 1):
        y, x, _, _ = level_inputs(shape, level, config)
        y, x = y.requires_grad_(), x.requires_grad_()
        grad = torch.randn(y.shape).contiguous(memory_format=torch.channels_last_3d)

        def torch_ops():
            up = torch.nn.functional.interpolate(x[:, : y.shape[1]], scale_factor=2, mode="trilinear")
            return torch.autograd.grad(y + up, (y, x), grad)

        def cpp():
            return torch.autograd.grad(decoder_cpu.upsample_add(y, x), (y, x), grad)

        t_ref, t_ours = timed(torch_ops, "cpu", args.repeats), timed(cpp, "cpu", args.repeats)
        m_ref, m_ours = allocated_mib(torch_ops), allocated_mib(cpp)
        difference = float((cpp()[1] - torch_ops()[1]).abs().max())
        print(f"| {level}: {tuple(x.shape[1:])} -> {tuple(y.shape[1:])} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.0f} ms "
              f"| {t_ref / t_ours:.2f}x | {m_ref:.0f} MiB | {m_ours:.0f} MiB | {difference:.1e} |")

    print("\nInstance optimization's BatchNorm (eval mode), crop and concatenation (model._EvalNormCropConcat), "
          "forward, and forward + backward (gradients to x, skip, BatchNorm's weight and bias):\n")
    print("| decoder level (x, skip -> out) | forward PyTorch | forward C++ | speed-up | forward + backward PyTorch "
          "| forward + backward C++ | speed-up | grad weight's error, PyTorch / C++ |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for level in (0, 1):
        x, _, _, skip = level_inputs(shape, level, config)
        x, skip = x.requires_grad_(), skip.requires_grad_()
        norm = randomize_(torch.nn.BatchNorm3d(x.shape[1]), seed=level).eval()
        grad = torch.randn(1, x.shape[1] + skip.shape[1], *skip.shape[2:]).contiguous(memory_format=torch.channels_last_3d)
        inputs = (x, skip, norm.weight, norm.bias)

        def forward():
            with torch.no_grad():
                return model._eval_norm_cropped_cat(x, skip, norm.weight, norm.bias, norm.running_mean,
                                                    norm.running_var, norm.eps)

        def both():
            return torch.autograd.grad(model.norm_crop_concat(norm, x, skip), inputs, grad)

        times = {}
        for side, cpp in (("torch", False), ("cpp", True)):
            with mock.patch.object(model, "use_cpp_norm_concat", lambda *tensors, cpp=cpp: cpp):
                times[side] = (timed(forward, "cpu", args.repeats), timed(both, "cpu", args.repeats), both()[2])
        (f_ref, b_ref, w_ref), (f_ours, b_ours, w_ours) = times["torch"], times["cpp"]
        # BatchNorm's weight gradient in float64: sum of grad * (x - mean) * invstd over the crop
        d, h, w = skip.shape[2:]
        centred = x.detach()[:, :, :d, :h, :w].double() - norm.running_mean.double().view(1, -1, 1, 1, 1)
        exact = (grad[:, : x.shape[1]].double() * centred).sum((0, 2, 3, 4)) * torch.rsqrt(norm.running_var.double()
                                                                                          + norm.eps)
        errors = [float((w_side.double() - exact).abs().max()) for w_side in (w_ref, w_ours)]
        out = (x.shape[1] + skip.shape[1], *skip.shape[2:])
        print(f"| {level}: {tuple(x.shape[1:])}, {tuple(skip.shape[1:])} -> {out} | {f_ref * 1e3:.0f} ms "
              f"| {f_ours * 1e3:.0f} ms | {f_ref / f_ours:.2f}x | {b_ref * 1e3:.0f} ms | {b_ours * 1e3:.0f} ms "
              f"| {b_ref / b_ours:.2f}x | {errors[0]:.1e} / {errors[1]:.1e} |")

    engine, moving, fixed = benchmark_engine(shape)
    repeats = max(2, args.repeats // 2)
    with ops.kernel_mode("cpp"):
        with mock.patch.object(model, "use_cpp_decoder", lambda *tensors: False):
            t_warp = timed(lambda: engine.predict_map(moving, fixed), "cpu", repeats)
            map_warp = engine.predict_map(moving, fixed)
        t_both = timed(lambda: engine.predict_map(moving, fixed), "cpu", repeats)
        map_both = engine.predict_map(moving, fixed)
    voxels = torch.tensor(shape).view(1, 3, 1, 1, 1) - 1
    difference = float(((map_both - map_warp) * voxels).abs().max())
    print(f"\nEngine.predict_map (no IO): C++ warp {t_warp:.2f} s, C++ warp and decoder {t_both:.2f} s "
          f"({t_warp / t_both:.2f}x); maps differ by at most {difference:.1e} voxel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
