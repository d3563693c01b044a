#!/usr/bin/env python
"""The U-Net's ``conv(leaky_relu(x))`` that keeps only ``x`` for backward
(``mgr_engine.model.leaky_relu_conv``) against autograd's path, which keeps the activation's
output too.

Per layer of a full-resolution U-Net of the official architecture (the largest ones, inputs
channels-last as in IO): forward + backward time (median) and the bytes autograd keeps for
the backward pass. End to end, each path in a fresh process: one IO step
(``Engine.instance_optimize`` with one iteration, randomized official weights) timed after a
warm-up, and the process's peak resident memory with freed host memory returned to the system
(``cache_host_memory=False``: the peak then follows what is alive).

    .venv/bin/python benchmarks/bench_leaky_relu_conv.py
    .venv/bin/python benchmarks/bench_leaky_relu_conv.py --shape 96 96 96 --repeats 3   # quick

Needs no itk. Times on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

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

from mgr_engine import model  # noqa: E402


def autograd_path(conv, x):
    return conv(F.leaky_relu(x, model.LEAKY_SLOPE))


def kept_for_backward_mib(fn) -> float:
    """MiB of the distinct storages autograd keeps for backward while ``fn()`` runs."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(kept.values()) / 2**20


def layer_rows(shape, repeats):
    """(name, x) of the U-Net's largest layers at network input ``shape``: the first strided
    convolution (on the images, which need no gradient) and the last two transposed ones."""
    config = model.NetworkConfig(input_shape=shape)
    unet = model.UNet(config.down_channels, config.up_channels).to(memory_format=torch.channels_last_3d)
    half = [(n + 1) // 2 for n in shape]
    quarter = [(n + 1) // 2 for n in half]
    down, up = config.down_channels, config.up_channels
    layers = [("down 0", unet.downConvs[0], (down[0], *shape), False),
              ("up 0", unet.upConvs[0], (down[1] + up[1], *half), True),
              ("up 1", unet.upConvs[1], (down[2] + up[2], *quarter), True)]
    for name, conv, size, input_grad in layers:
        x = torch.randn(1, *size).contiguous(memory_format=torch.channels_last_3d).requires_grad_(input_grad)
        grad = None
        results = {}
        for path_name, path in (("autograd", autograd_path), ("fused", model.leaky_relu_conv)):
            if grad is None:
                grad = torch.randn_like(path(conv, x))
            inputs = [t for t in (x, conv.weight, conv.bias) if t.requires_grad]

            def step(path=path):
                return torch.autograd.grad(path(conv, x), inputs, grad)

            results[path_name] = (timed(step, "cpu", repeats), kept_for_backward_mib(lambda path=path: path(conv, x)))
        yield name, tuple(x.shape[1:]), results


def measure_io(shape, plain: bool) -> dict:
    """One warm IO step's time and the process's peak resident memory, in this process."""
    from helpers import random_network, smooth_volume

    from mgr_engine import Engine

    if plain:
        model.leaky_relu_conv = autograd_path
    net = random_network(shape, seed=1, displacement_scale=0.3)
    engine = Engine(weights=model.official_state_dict(net), config=net.config, device="cpu", cache_host_memory=False)
    del net
    moving = torch.from_numpy(smooth_volume(shape, 1))[None, None]
    fixed = torch.from_numpy(smooth_volume(shape, 2))[None, None]
    times = []
    for _ in range(2):  # the first call touches its memory for the first time
        start = time.perf_counter()
        _, _, losses = engine.instance_optimize(moving, fixed, iterations=1, progress=False,
                                                generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    return {"seconds": times[-1], "peak_gib": peak_rss_gib(), "losses": [float(v) for v in losses]}


def main(argv=None) -> int:
    parser = cpu_benchmark_parser(__doc__)
    parser.add_argument("--child", choices=("autograd", "fused"), help=__import__("argparse").SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(measure_io(shape, plain=args.child == "autograd")))
        return 0
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"network input {shape}, median of {args.repeats}\n")
    print("| layer (input) | autograd: fwd+bwd | fused: fwd+bwd | speed-up | kept for backward: autograd | fused |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, size, results in layer_rows(shape, args.repeats):
        (t_plain, kept_plain), (t_fused, kept_fused) = results["autograd"], results["fused"]
        print(f"| {name} {size} | {t_plain * 1e3:.0f} ms | {t_fused * 1e3:.0f} ms | {t_plain / t_fused:.2f}x "
              f"| {kept_plain:.0f} MiB | {kept_fused:.0f} MiB |")
    if args.skip_end_to_end:
        return 0
    io = {}
    for path in ("autograd", "fused"):
        command = [sys.executable, __file__, "--child", path, "--shape", *map(str, shape)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        io[path] = json.loads(output.splitlines()[-1])
    plain, fused = io["autograd"], io["fused"]
    print(f"\nOne IO step (instance_optimize, 1 iteration, second call; each path in a fresh process, freed host "
          f"memory returned): autograd's path {plain['seconds']:.1f} s, peak RSS {plain['peak_gib']:.2f} GiB; "
          f"fused {fused['seconds']:.1f} s, {fused['peak_gib']:.2f} GiB "
          f"({plain['peak_gib'] - fused['peak_gib']:.2f} GiB less); losses equal: {plain['losses'] == fused['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
