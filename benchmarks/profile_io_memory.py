#!/usr/bin/env python
"""What an IO step keeps for its backward pass, by the autograd node that keeps it; with
``--peak``, the peak of a whole IO call, against the reference's.

Kept for backward: builds the GradICON objective of one instance-optimization step as
``Engine.instance_optimize`` does (randomized official weights, two smooth volumes, 1-LNCC^2),
then walks the autograd graph from the loss: every tensor a node saved for backward, each
storage counted once (for the first node that holds it, in the walk's order from the loss),
summed per node type and per tensor shape, the weights left out. This is the activation memory
a step holds at the end of its forward pass; the weights, their gradients and Adam's moments
come on top. ``--reference`` walks one step of the reference's ``finetune_execute`` too
(``GradientICONSparse`` in eval mode, same weights, pair and similarity).

Peak (``--peak``): one whole IO call, ``instance_optimize(iterations=N)`` against the
reference's ``finetune_execute(steps=N)`` (``--io-steps``, default 2: from the second step on,
Adam's moments exist and the previous step's graph may still be alive; the final forward; the
weights copied and restored), under ``torch.profiler``'s memory timeline: the most tensor
memory alive at once on the device, split by the profiler's categories at that moment, after a
warm-up call. What tensors a computation holds depends on the code, not on the device, so on
the CPU this forecasts the ratio that ``bench_gpu.py`` measures with
``torch.cuda.max_memory_allocated`` (the GPU adds cuDNN's workspaces; the CPU path keeps LNCC's
intermediates, which the Triton LNCC kernel does not, so the forecast errs against mgr_engine).

    .venv/bin/python benchmarks/profile_io_memory.py                       # CPU, 175^3
    python benchmarks/profile_io_memory.py --device cuda                   # GPU
    .venv/bin/python benchmarks/profile_io_memory.py --shape 96 96 96      # quick
    .venv/bin/python benchmarks/profile_io_memory.py --reference --peak    # against the reference

Needs no itk.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TIMELINE_CATEGORIES, peak_memory  # noqa: E402

GIB, MIB = 2**30, 2**20


def io_step_loss(engine, moving: torch.Tensor, fixed: torch.Tensor, similarity: str = "lncc2") -> torch.Tensor:
    """The loss of one IO step's forward pass on ``engine``'s network, built as
    ``Engine.instance_optimize`` builds it (fp32, seeded regularizer noise), its autograd graph
    alive. Leaves the network's parameters requiring gradients."""
    from mgr_engine.engine import gradicon_objective
    from mgr_engine.losses import similarity_by_name, with_constant_targets

    network = engine.network.requires_grad_(True)
    with engine._precision("fp32"):
        loss, _, _ = gradicon_objective(network, moving, fixed, with_constant_targets(similarity_by_name(similarity)),
                                        generator=torch.Generator().manual_seed(0))
    return loss


class _RecomputationRefused(Exception):
    pass


def kept_for_backward_refusing_recomputation(loss, ignore):
    """``helpers.kept_for_backward`` of ``loss``'s graph, in which the maps of IO's compositions
    and warps (``GradICONNetwork.recompute_maps``) and the U-Nets' finest decoder levels
    (``recompute_finest_levels``) are recomputed in the backward pass: reading a node's saved
    tensors there would recompute its region, so the compositions and the decoder levels'
    BatchNorm refuse to run during the walk and those nodes count as keeping nothing. The
    regions' inputs (the fields d1 to d4, the images, the second-finest levels' BatchNorm
    inputs), which the regions hold, count where other nodes keep them too."""
    from unittest import mock

    import mgr_engine.model
    from helpers import kept_for_backward

    def refuse(*args, **kwargs):
        raise _RecomputationRefused

    with mock.patch.object(mgr_engine.model, "compose_maps", refuse), \
            mock.patch.object(mgr_engine.model, "norm_crop_concat", refuse):
        return kept_for_backward(loss, ignore=ignore, unreadable=(_RecomputationRefused,))


def reference_model(shape, device: str, similarity: str) -> torch.nn.Module:
    """The reference's ``GradientICONSparse`` (eval mode, lambda 1.5) with the weights
    ``benchmark_engine`` gives the engine, on ``device``."""
    import icon_registration as icon
    from helpers import import_reference, random_network
    from icon_registration import config as icon_config

    reference_network = import_reference()
    icon_config.device = torch.device(device)
    loss_fn = {"lncc": icon.LNCC, "lncc2": icon.SquaredLNCC}[similarity](sigma=5)
    return reference_network(random_network(shape, seed=1, displacement_scale=0.3), loss_fn).to(device)


def print_kept(title: str, total: int, by_shape: dict, rows: int) -> None:
    by_type = collections.Counter()
    for (kind, _), (_, nbytes) in by_shape.items():
        by_type[kind] += nbytes
    print(f"{title}: kept for backward {total / GIB:.2f} GiB\n")
    print("| node that keeps it | MiB | share |")
    print("|---|--:|--:|")
    for kind, nbytes in by_type.most_common():
        if nbytes >= MIB:
            print(f"| {kind} | {nbytes / MIB:.0f} | {nbytes / total:.0%} |")
    print("\n| node, tensor shape | tensors | MiB |")
    print("|---|--:|--:|")
    for (kind, size), (count, nbytes) in sorted(by_shape.items(), key=lambda item: -item[1][1])[:rows]:
        print(f"| {kind} {size} | {count} | {nbytes / MIB:.0f} |")
    print()


def print_peaks(peaks: dict, io_steps: int) -> None:
    print(f"| one IO call ({io_steps} steps + final forward) | peak | " + " | ".join(TIMELINE_CATEGORIES) + " |")
    print("|---|--:|" + "--:|" * len(TIMELINE_CATEGORIES))
    for name, (peak, by_category) in peaks.items():
        cells = " | ".join(f"{by_category[c] / GIB:.2f}" for c in TIMELINE_CATEGORIES)
        print(f"| {name} | {peak / GIB:.2f} GiB | {cells} |")
    if len(peaks) == 2:
        (_, (ours, _)), (_, (theirs, _)) = peaks.items()
        print(f"\nmgr_engine's peak is {ours / theirs:.0%} of the reference's.")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    parser.add_argument("--rows", type=int, default=15, help="rows of the per-shape tables")
    parser.add_argument("--similarity", choices=("lncc2", "lncc"), default="lncc2")
    parser.add_argument("--reference", action="store_true", help="the reference's finetune_execute too")
    parser.add_argument("--peak", action="store_true", help="the peak of a whole IO call, under the profiler")
    parser.add_argument("--io-steps", type=int, default=2, help="IO steps of the --peak call")
    parser.add_argument("--checkpointing", action="store_true", help="Engine(io_checkpointing=True)")
    parser.add_argument("--finest-levels", choices=("recomputed", "kept"), default="recomputed",
                        help="GradICONNetwork.recompute_finest_levels: recomputed (a GPU's default, forecast here "
                             "on any device) or kept (the CPU's default)")
    parser.add_argument("--maps", choices=("recomputed", "kept"), default="recomputed",
                        help="GradICONNetwork.recompute_maps: recomputed (a GPU's default, forecast here on any "
                             "device) or kept (the CPU's default)")
    parser.add_argument("--precision", choices=("fp32", "tf32x3"), default="fp32",
                        help="instance_optimize's precision; tf32x3 splits IO's convolutions into three products "
                             "on any device here (on the CPU, float32 products: the same tensors held)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.precision == "tf32x3" and args.device == "cpu":
        from mgr_engine import model

        model.splits_tf32 = lambda x: x.dtype == torch.float32

    from helpers import benchmark_engine, kept_for_backward

    engine, moving, fixed = benchmark_engine(shape, args.device, cache_host_memory=False,
                                             io_checkpointing=args.checkpointing)
    engine.network.recompute_finest_levels = args.finest_levels == "recomputed"
    engine.network.recompute_maps = args.maps == "recomputed"
    parameters = sum(p.numel() * p.element_size() for p in engine.network.parameters())
    print(f"{args.device}, torch {torch.__version__}, network input {shape}, 1-{args.similarity.upper()}; weights "
          f"{parameters / GIB:.2f} GiB (with their gradients and Adam's two moments, {4 * parameters / GIB:.2f} GiB)\n")
    ours = "mgr_engine instance_optimize" + (" (io_checkpointing)" if args.checkpointing else
                                             f" (maps {args.maps}, finest levels {args.finest_levels})") + (
        " in tf32x3" if args.precision == "tf32x3" else "")
    # Each graph is counted and freed before the next is built: two alive would double the peak.
    # Not under checkpointing: reading a checkpointed node's saved tensors recomputes them.
    kept = None if args.checkpointing else kept_for_backward_refusing_recomputation(
        io_step_loss(engine, moving, fixed, args.similarity), ignore=engine.network.parameters())
    if kept:
        print_kept(ours, *kept, args.rows)
    peaks = {}
    if args.peak:
        def io_call(steps=args.io_steps):
            engine.instance_optimize(moving, fixed, iterations=steps, similarity=args.similarity,
                                     progress=False, precision=args.precision)

        io_call(1)  # warm-up: caches and first-call allocations
        peaks[ours] = peak_memory(io_call, args.device)
    if args.reference:
        del engine
        reference = reference_model(shape, args.device, args.similarity)
        from icon_registration import itk_wrapper  # after reference_model: imports itk, or its stub

        reference_kept = kept_for_backward(reference(moving, fixed)[0], ignore=reference.parameters())
        print_kept("reference finetune_execute", *reference_kept, args.rows)
        if kept:
            print(f"mgr_engine keeps {kept[0] / reference_kept[0]:.0%} of what the reference keeps, outside its "
                  "recomputed regions, whose inputs this walk does not count (--peak counts everything).\n")
        if args.peak:
            def reference_io_call(steps=args.io_steps):
                itk_wrapper.finetune_execute(reference, moving, fixed, steps, 2e-5)

            reference_io_call(1)
            peaks["reference finetune_execute"] = peak_memory(reference_io_call, args.device)
    if peaks:
        print_peaks(peaks, args.io_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
