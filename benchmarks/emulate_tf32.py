#!/usr/bin/env python
"""TF32 convolutions emulated on the CPU: how far they move a registration's points against fp32.

Issue 3 keeps a precision mode off by default where it moves points by more than 0.1 voxel. On
a GPU, TF32 tensor cores round each convolution's inputs and weights to a 10-bit mantissa and
accumulate in fp32; this rounds them so (to nearest, ``--rounding nearest``) in the inference
network's convolutions on the CPU (the network as the engine runs it on CUDA: BatchNorm folded,
sub-pixel transposed convolutions), and reports the largest, the 99.99th percentile and the mean
point difference of ``predict_map`` against fp32, in voxels of the 175^3 grid: with every
convolution rounded, and with each U-Net's last convolution (18 -> 3 channels, a sliver of the
network's work) left in fp32. Needs no GPU and no itk.

The figure depends on the weights: give the official checkpoint (``--weights``) for the answer
that matters; without it, randomized official-architecture weights for each ``--seeds`` (fields
scaled by 0.3, as ``bench_gpu.py``; its seed 1 is the network whose TF32 difference the H200
measured, 0.106 and 0.112 voxel in two runs: emulated, 0.116 rounding to nearest, 0.372
truncating).

    .venv/bin/python benchmarks/emulate_tf32.py                          # seeds 1-4, 20 s each on 2 cores
    .venv/bin/python benchmarks/emulate_tf32.py --weights Step_2_final.trch
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mgr_engine import Engine, NetworkConfig, ops  # noqa: E402
from mgr_engine.model import (SubpixelConvTranspose3d, inference_network, official_state_dict,  # noqa: E402
                               round_to_tf32)
from helpers import truncate_to_tf32  # noqa: E402


def to_tf32(t: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``t`` (float32) with its mantissa cut to TF32's 10 bits, rounded to nearest (ties away from
    zero, :func:`mgr_engine.model.round_to_tf32`) or truncated; same strides."""
    return round_to_tf32(t) if rounding == "nearest" else truncate_to_tf32(t)


def tf32_emulated(network, rounding: str, fp32_last_conv: bool):
    """A copy of the inference ``network`` whose convolutions round their weights (once) and their
    inputs (each call) as TF32 tensor cores do; each U-Net's last convolution too unless
    ``fp32_last_conv``."""
    network = copy.deepcopy(network)
    for unet in network.unets:
        for conv in [*unet.downConvs, *unet.upConvs, *([] if fp32_last_conv else [unet.lastConv])]:
            if not isinstance(conv, (torch.nn.Conv3d, SubpixelConvTranspose3d)):
                raise TypeError(f"not a convolution the engine runs on CUDA: {conv}")
            with torch.no_grad():
                conv.weight.copy_(to_tf32(conv.weight, rounding))
            conv.register_forward_pre_hook(lambda module, args: (to_tf32(args[0], rounding), *args[1:]))
    return network


def point_differences(engine, moving, fixed, rounding):
    """``{variant: (max, p99.99, mean)}`` in voxels of predict_map against fp32."""
    shape = moving.shape[2:]
    voxels = torch.tensor(shape).view(1, 3, 1, 1, 1) - 1
    fp32_network = inference_network(engine.network, subpixel_upconvs=True)  # as on CUDA
    with ops.kernel_mode("torch"):  # every convolution a module call (no C++ last convolution)
        engine.inference_network = fp32_network
        phi = engine.predict_map(moving, fixed).clone()
        results = {}
        for name, fp32_last_conv in (("every convolution TF32", False), ("each U-Net's last convolution fp32", True)):
            engine.inference_network = tf32_emulated(fp32_network, rounding, fp32_last_conv)
            distance = ((engine.predict_map(moving, fixed) - phi) * voxels).abs().flatten()
            results[name] = (distance.max().item(), distance.kthvalue(int(0.9999 * distance.numel())).values.item(),
                             distance.mean().item())
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="a checkpoint (Step_2_final.trch); default: randomized weights")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="randomized weights' seeds")
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175), help="randomized weights' network input")
    p.add_argument("--rounding", choices=("nearest", "truncate"), default="nearest")
    args = p.parse_args(argv)
    from helpers import random_network, smooth_volume

    shape = tuple(args.shape)
    if args.weights:  # the official network's own input shape
        networks = {f"`{args.weights.name}`": (str(args.weights), None)}
        shape = NetworkConfig().input_shape
    else:
        networks = {f"randomized, seed {seed}": (official_state_dict(random_network(shape, seed=seed, displacement_scale=0.3)),
                                                 NetworkConfig(input_shape=shape)) for seed in args.seeds}
    moving, fixed = (torch.from_numpy(smooth_volume(shape, seed))[None, None] for seed in (1, 2))
    print(f"TF32 emulated on the CPU (rounding {args.rounding}), network input {shape}, torch {torch.__version__}\n")
    print("| weights | every convolution TF32: max / p99.99 / mean (voxel) | each U-Net's last convolution fp32 |")
    print("|---|--:|--:|")
    for name, (weights, config) in networks.items():
        engine = Engine(weights=weights, config=config, device="cpu")
        cells = [" / ".join(f"{v:.4f}" for v in figures)
                 for figures in point_differences(engine, moving, fixed, args.rounding).values()]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
