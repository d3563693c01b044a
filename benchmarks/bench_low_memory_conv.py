#!/usr/bin/env python
"""The U-Net's convolutions that keep the least for backward (``mgr_engine.model.low_memory_conv``
and ``decoder_output_recipe``) against autograd's path.

Autograd keeps, per layer, the leaky ReLU's input and output, and each decoder level's output
for the layer after it. ``low_memory_conv`` keeps the activation's input alone and, given a
recipe, nothing of a decoder level's output, which it recomputes in the backward pass.

Per layer of a full-resolution U-Net of the official architecture (the largest ones, inputs
channels-last as in IO): forward + backward time (median) and the bytes autograd keeps for the
backward pass. End to end, each variant in a fresh process: one IO step
(``Engine.instance_optimize`` with one iteration, randomized official weights) timed after a
warm-up, the activations it keeps (walking its autograd graph) and the process's peak resident
memory with freed host memory returned to the system (``cache_host_memory=False``: the peak
then follows what is alive).

    .venv/bin/python benchmarks/bench_low_memory_conv.py
    .venv/bin/python benchmarks/bench_low_memory_conv.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_host_memory import peak_rss_gib  # noqa: E402
from bench_kernels import timed  # noqa: E402  (median after two warm-ups)
from bench_warp_cpu import cpu_benchmark_parser  # noqa: E402
from helpers import benchmark_engine, kept_for_backward  # noqa: E402
from profile_io_memory import io_step_loss  # noqa: E402

from mgr_engine import model  # noqa: E402

VARIANTS = {"autograd": "autograd's path", "activations": "activations' inputs only",
            "low_memory": "and decoder outputs recomputed (the engine)",
            "checkpointing": "Engine(io_checkpointing=True): U-Nets recomputed whole"}


def autograd_path(conv, x, activation=True, recompute_x=None):
    return conv(F.leaky_relu(x, model.LEAKY_SLOPE) if activation else x)


def use_variant(variant: str) -> None:
    """Patch the model to run ``variant`` of :data:`VARIANTS` in this process."""
    if variant == "autograd":
        model.low_memory_conv = autograd_path
    if variant in ("autograd", "activations"):
        model.decoder_output_recipe = lambda *args: None


def layer_rows(shape, repeats):
    """(name, input shape, {path: (seconds, kept MiB)}) for the U-Net's largest layers at network
    input ``shape``: the first strided convolution (on the images) and the last two transposed ones."""
    config = model.NetworkConfig(input_shape=shape)
    unet = model.UNet(config.down_channels, config.up_channels).to(memory_format=torch.channels_last_3d)
    half = [(n + 1) // 2 for n in shape]
    quarter = [(n + 1) // 2 for n in half]
    down, up = config.down_channels, config.up_channels
    layers = [("down 0", unet.downConvs[0], (down[0], *shape)),
              ("up 0", unet.upConvs[0], (down[1] + up[1], *half)),
              ("up 1", unet.upConvs[1], (down[2] + up[2], *quarter))]
    for name, conv, size in layers:
        x = torch.randn(1, *size).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        grad = torch.randn_like(autograd_path(conv, x).detach())
        inputs = (x, conv.weight, conv.bias)
        results = {}
        for path_name, path in (("autograd", autograd_path), ("low_memory", model.low_memory_conv)):
            seconds = timed(lambda path=path: torch.autograd.grad(path(conv, x), inputs, grad), "cpu", repeats)
            results[path_name] = (seconds, kept_for_backward(path(conv, x))[0] / 2**20)
        yield name, tuple(x.shape[1:]), results


def measure_io(shape, variant: str) -> dict:
    """One warm IO step's time, the activations it keeps and the process's peak resident memory."""
    use_variant(variant)
    engine, moving, fixed = benchmark_engine(shape, cache_host_memory=False,
                                             io_checkpointing=variant == "checkpointing")
    times = []
    for _ in range(2):  # the first call touches its memory for the first time
        start = time.perf_counter()
        _, _, losses = engine.instance_optimize(moving, fixed, iterations=1, progress=False,
                                                generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    result = {"seconds": times[-1], "peak_gib": peak_rss_gib(), "kept_gib": None, "losses": [float(v) for v in losses]}
    if variant != "checkpointing":  # (walking a checkpointed graph would recompute it)
        result["kept_gib"] = kept_for_backward(io_step_loss(engine, moving, fixed))[0] / 2**30
    return result


def main(argv=None) -> int:
    parser = cpu_benchmark_parser(__doc__)
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(measure_io(shape, args.child)))
        return 0
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"network input {shape}, median of {args.repeats}\n")
    print("| layer (input) | autograd: fwd+bwd | low-memory: fwd+bwd | speed-up | kept: autograd | low-memory |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, size, results in layer_rows(shape, args.repeats):
        (t_plain, kept_plain), (t_low, kept_low) = results["autograd"], results["low_memory"]
        print(f"| {name} {size} | {t_plain * 1e3:.0f} ms | {t_low * 1e3:.0f} ms | {t_plain / t_low:.2f}x "
              f"| {kept_plain:.0f} MiB | {kept_low:.0f} MiB |")
    if args.skip_end_to_end:
        return 0
    print("\nOne IO step (instance_optimize, 1 iteration, second call), each variant in a fresh process, freed "
          "host memory returned:\n")
    print("| variant | IO step | activations kept for backward | peak RSS | losses as autograd's |")
    print("|---|--:|--:|--:|---|")
    first = None
    for variant, label in VARIANTS.items():
        command = [sys.executable, __file__, "--child", variant, "--shape", *map(str, shape)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        first = first or result
        kept = "n/a" if result["kept_gib"] is None else f"{result['kept_gib']:.2f} GiB"
        print(f"| {label} | {result['seconds']:.1f} s | {kept} | {result['peak_gib']:.2f} GiB "
              f"| {'equal' if result['losses'] == first['losses'] else 'DIFFERENT'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
