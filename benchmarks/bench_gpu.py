#!/usr/bin/env python
"""End-to-end engine against the reference network on one device, on tensors (no itk needed).

The GPU runner has no itk, so this benchmark works on preprocessed 175^3 tensors: the
reference is the authors' ``GradientICONSparse`` (what ``register_pair`` runs) with the
same randomized checkpoint, called as ``register_pair`` calls it; ours is
``Engine.predict_map`` (no IO) and ``Engine.instance_optimize`` (IO).

Measured, all in one run on one device:
* no IO: cold (first call of a network, after a process warm-up: each side in a fresh child
  process of its own, and both in this one, ours first, where the reference then finds cuDNN's
  plans for the shapes both share made) and warm latency (median), peak memory;
* IO: ``--io-steps`` Adam steps (reference ``finetune_execute``, ours ``instance_optimize``,
  with and without U-Net checkpointing, with its maps kept instead of recomputed in the
  backward pass (``recompute_maps`` off), with the U-Nets' finest decoder levels kept instead
  of recomputed (``recompute_finest_levels`` off; a GPU's default recomputes them), seeded: the
  regularizer's noise drawn on the CPU as the reference draws it, and on a GPU with TF32
  convolutions and with the transposed convolutions' forward as ConvTranspose3d instead of
  sub-pixel), time per step and peak memory;
* precision: TF32 and bf16-autocast forwards of ours against fp32, largest point
  difference in network voxels (1 voxel = 1 mm for a 175 mm field of view);
* transposed convolutions: ours as ConvTranspose3d and in sub-pixel form (one convolution, a
  shuffle; the engine's on CUDA), warm latency and peak memory;
* layout: ours with the networks channels-last and contiguous (the engine's choice by device,
  ``ops.network_memory_format``), on a GPU also each with ``cudnn.benchmark``: warm no-IO
  latency and a few IO steps (``--layout-io-steps``);
* ``Engine(compile=True)`` (torch.compile; CUDA graphs on a GPU): cold (compiling) and warm
  latency, printed after the main table so that a failure or a slow compile loses nothing
  else (``--skip-compile`` leaves it out, ``--compile-only`` runs it alone).

Where the reference does not import (a GPU image without one of its dependencies), the
reference's cells say so and ours are measured all the same.

IO is timed after one warm-up step on each side, so that neither side's timing includes
one-time set-up (Triton's compilation of our backward kernels, cuDNN's plans).

Peak memory of a side is what that side would hold alone: its own weights (ours: the network
IO tunes and the folded inference copy) plus the most the call allocated on top of what was
allocated before it. Both sides live in one process, so the plain peak would also count the
other side's weights.

    python benchmarks/bench_gpu.py --results benchmarks/RESULTS.md       # GPU, 175^3
    python benchmarks/bench_gpu.py --device cpu --shape 72 72 72 --io-steps 1 --repeats 1 --skip-compile   # CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def warm_up_process(device) -> None:
    """The process-wide set-up whichever side runs first would pay alone (cuDNN's and cuBLAS'
    handles, CUDA's lazy loading of their libraries): small convolutions, transposed
    convolutions, pooling, upsampling and sampling on ``device``. It does not make one process'
    first calls comparable (on an H200 ours, first, 896 ms; the reference's 355 ms after it, 519
    ms in a process of its own), hence :func:`first_call_in_fresh_process`."""
    x = torch.rand(1, 2, 8, 8, 8, device=device)
    y = torch.nn.functional.conv3d(x, torch.rand(4, 2, 3, 3, 3, device=device), padding=1)
    y = torch.nn.functional.conv_transpose3d(y, torch.rand(4, 2, 4, 4, 4, device=device), stride=2, padding=1)
    y = torch.nn.functional.avg_pool3d(y, 2) + torch.nn.functional.interpolate(x, scale_factor=1.0, mode="trilinear")
    torch.nn.functional.grid_sample(y, torch.rand(1, 8, 8, 8, 3, device=device) * 2 - 1, align_corners=True)
    sync(device)


def resident_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage counted once."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def reset_peak(device):
    """Start a peak measurement; returns the bytes allocated now, which the peak leaves out."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(device, allocated_before, own_modules):
    """The peak since :func:`reset_peak` above ``allocated_before``, plus the weights of
    ``own_modules``: what one side holds at its peak, without the other side's weights."""
    if device != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() - allocated_before + resident_bytes(*own_modules)) / 2**30


def first_call_alone(side: str, device: str, shape: tuple) -> None:
    """In this (fresh) process: the process-wide set-up (:func:`warm_up_process`), then one
    side's network built and its first call timed, printed as ``first call: <seconds>``. Run in
    a child process per side by :func:`first_call_in_fresh_process`: in one process, whichever
    side runs second finds set-up the first left (cuDNN's, for the shapes both share)."""
    from helpers import import_reference, random_network, smooth_volume

    from mgr_engine import Engine
    from mgr_engine.model import official_state_dict

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    net = random_network(shape, seed=1, displacement_scale=0.3)
    moving, fixed = (torch.from_numpy(smooth_volume(shape, seed))[None, None].to(device) for seed in (1, 2))
    warm_up_process(device)
    if side == "ours":
        engine = Engine(weights=official_state_dict(net), config=net.config, device=device)
        cached = triton_cache_entries()
        seconds = clock(lambda: engine.predict_map(moving, fixed), device)[0]
        print(f"Triton kernels compiled by the first call: {triton_cache_entries() - cached}")
    else:
        from icon_registration import config as icon_config

        icon_config.device = torch.device(device)
        reference = import_reference()(net).to(device)
        with torch.no_grad():
            seconds = clock(lambda: reference(moving, fixed), device)[0]
    print(f"first call: {seconds}")


def triton_cache_entries() -> int:
    """How many kernels Triton's on-disk cache holds (one folder each)."""
    import os

    try:
        from triton import knobs

        folder = knobs.cache.dir
    except (ImportError, AttributeError):
        folder = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def first_call_in_fresh_process(side: str, device: str, shape: tuple) -> float:
    """Seconds of ``side``'s first no-IO call in a child process of its own (:func:`first_call_alone`);
    nan where the child fails (its error printed)."""
    import subprocess

    child = subprocess.run([sys.executable, __file__, "--first-call-of", side, "--device", device,
                            "--shape", *map(str, shape)], capture_output=True, text=True, timeout=600)
    found = [line for line in child.stdout.splitlines() if line.startswith("first call: ")]
    print(f"{side}, first call in a fresh process: " + "; ".join(
        line for line in child.stdout.splitlines() if line.startswith(("first call: ", "Triton kernels"))), flush=True)
    if child.returncode != 0 or not found:
        print(f"{side}'s first call in a fresh process failed:\n{child.stdout[-2000:]}{child.stderr[-3000:]}", flush=True)
        return float("nan")
    return float(found[-1].split(": ")[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    p.add_argument("--io-steps", type=int, default=10, help="IO steps per side (the paper uses 50)")
    p.add_argument("--repeats", type=int, default=10, help="warm no-IO calls to take the median of")
    p.add_argument("--skip-io", action="store_true")
    p.add_argument("--layout-io-steps", type=int, default=3, help="IO steps per layout row (0: no IO there)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the Engine(compile=True) row")
    p.add_argument("--compile-only", action="store_true", help="only the Engine(compile=True) row")
    p.add_argument("--results", type=Path)
    p.add_argument("--first-call-of", choices=("ours", "reference"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    if args.first_call_of:
        first_call_alone(args.first_call_of, args.device, tuple(args.shape))
        return
    device, shape = args.device, tuple(args.shape)

    from helpers import import_reference, random_network, smooth_volume

    from mgr_engine import Engine, model
    from mgr_engine.model import inference_network, official_state_dict, uses_subpixel_upconvs
    from mgr_engine.ops import network_memory_format

    # Plain fp32 everywhere unless a row says otherwise (cuDNN would use TF32 for convolutions).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    net = random_network(shape, seed=1, displacement_scale=0.3)
    state = official_state_dict(net)
    moving = torch.from_numpy(smooth_volume(shape, 1))[None, None].to(device)
    fixed = torch.from_numpy(smooth_volume(shape, 2))[None, None].to(device)
    voxels = (torch.tensor(shape, device=device, dtype=torch.float32) - 1).view(1, 3, 1, 1, 1)
    rows = []

    # --- no IO; a first call is a new network's first call, in a process that has run a convolution
    warm_up_process(device)
    engine = Engine(weights=state, config=net.config, device=device)
    ours = (engine.network, engine.inference_network)
    before = reset_peak(device)
    cold, phi = clock(lambda: engine.predict_map(moving, fixed), device)
    if args.compile_only:
        compiled_rows(state, net.config, device, moving, fixed, phi, voxels, args.repeats, args.results)
        return
    warm = statistics.median(clock(lambda: engine.predict_map(moving, fixed), device)[0] for _ in range(args.repeats))
    ours_peak = peak_gib(device, before, ours)

    missing = float("nan")
    ref_cold = ref_warm = ref_peak = agreement = missing
    try:
        reference_network = import_reference()
        from icon_registration import config as icon_config
        from icon_registration import itk_wrapper
    except Exception as error:  # e.g. a module the GPU image lacks: measure ours all the same
        reference, reference_error = None, f"{type(error).__name__}: {error}"
        print(f"the reference does not import ({reference_error}); measuring mgr_engine alone", flush=True)
    else:
        icon_config.device = torch.device(device)
        reference, reference_error = reference_network(net).to(device), None

        def reference_forward():
            with torch.no_grad():  # register_pair without IO: both directions and the loss
                reference(moving, fixed)
                return reference.phi_AB_vectorfield

        before = reset_peak(device)
        ref_cold, ref_phi = clock(reference_forward, device)
        ref_warm = statistics.median(clock(reference_forward, device)[0] for _ in range(args.repeats))
        ref_peak = peak_gib(device, before, (reference,))
        agreement = ((phi - ref_phi) * voxels).abs().max().item()
    fresh = {side: first_call_in_fresh_process(side, device, shape) if reference is not None or side == "ours"
             else missing for side in ("reference", "ours")}
    rows += [("no IO, first call, each side in a fresh process of its own", fresh["reference"], fresh["ours"]),
             ("no IO, first call in this process (ours first)", ref_cold, cold),
             (f"no IO, warm (median of {args.repeats})", ref_warm, warm)]

    # --- precision
    precision = []
    for name, setup in (("TF32", "tf32"), ("bf16 autocast", "bf16")):
        if device != "cuda" and setup == "tf32":
            continue
        # Through the engine's own setting: predict_map applies it and would override (switch
        # off) TF32 flags or an autocast region set around the call.
        engine.precision = setup
        try:
            t, phi_low = clock(lambda: engine.predict_map(moving, fixed), device)
            t = statistics.median(clock(lambda: engine.predict_map(moving, fixed), device)[0] for _ in range(max(1, args.repeats // 2)))
        finally:
            engine.precision = "fp32"
        precision.append((name, t, ((phi_low.float() - phi) * voxels).abs().max().item()))

    # --- the transposed convolutions as ConvTranspose3d and in sub-pixel form (model.SubpixelConvTranspose3d):
    # cuDNN ran the former as a slow dgrad kernel, half of a no-IO registration's GPU time on an H200
    default_network = engine.inference_network
    upconvs = []
    try:
        for name, subpixel in (("ConvTranspose3d", False), ("sub-pixel: conv3d into 8 parities, shuffle", True)):
            engine.inference_network = inference_network(engine.network, subpixel_upconvs=subpixel).to(
                device, memory_format=network_memory_format(device))
            _, phi_form = clock(lambda: engine.predict_map(moving, fixed), device)
            form_warm = statistics.median(clock(lambda: engine.predict_map(moving, fixed), device)[0]
                                          for _ in range(args.repeats))
            before = reset_peak(device)
            engine.predict_map(moving, fixed)
            form_peak = peak_gib(device, before, (engine.network, engine.inference_network))
            default = " (the engine's)" if subpixel == uses_subpixel_upconvs(device) else ""
            upconvs.append((name + default, form_warm, form_peak, ((phi_form - phi) * voxels).abs().max().item()))
            engine.inference_network = None  # its memory back before the next form's copy
    finally:
        engine.inference_network = default_network

    # --- IO
    io_rows = []
    if not args.skip_io:
        engine.instance_optimize(moving, fixed, iterations=1, similarity="lncc", progress=False)  # warm-up, not timed
        if reference is not None:
            itk_wrapper.finetune_execute(reference, moving, fixed, 1, 2e-5)
            reference.zero_grad(set_to_none=True)  # left by the warm-up: not part of what the call holds
            before = reset_peak(device)
            torch.manual_seed(0)
            t, _ = clock(lambda: itk_wrapper.finetune_execute(reference, moving, fixed, args.io_steps, 2e-5), device)
            io_rows.append(("reference finetune_execute", t, peak_gib(device, before, (reference,))))
        else:
            io_rows.append(("reference finetune_execute (did not import)", missing, missing))
        # Unseeded, the regularizer's noise is drawn on the GPU; seeded, on the CPU (16.1M samples
        # per step at 175^3, the reference's stream): the third row shows what that costs.
        # TF32: time only (IO with randomized weights is chaotic at float32 rounding, so a point
        # difference against fp32 would measure that, not TF32).
        # "maps kept": recompute_maps off (None: recomputed on a GPU), what recomputing the
        # compositions' and warps' maps in the backward pass saves and costs;
        # "finest levels": recompute_finest_levels forced either way (None: recomputed on a GPU)
        # "ConvTranspose3d forward": the transposed convolutions' forward as cuDNN's dgrad kernel,
        # not in sub-pixel form (model.uses_subpixel_upconvs), as IO ran before the 39th session
        defaults = {"checkpoint_unets": False, "recompute_maps": None, "recompute_finest_levels": None}
        maps = (" (maps kept, not recomputed)", {"recompute_maps": False}, None, "fp32")
        finest = (" (finest levels kept, not recomputed)", {"recompute_finest_levels": False}, None, "fp32")
        if device != "cuda":
            maps = (" (maps recomputed, a GPU's default)", {"recompute_maps": True}, None, "fp32")
            finest = (" (finest levels recomputed, a GPU's default)", {"recompute_finest_levels": True}, None, "fp32")
        # "tf32x3": IO's convolutions and their gradients as three TF32 products (float32's accuracy)
        gpu_only = [(" (TF32 convolutions)", {}, None, "tf32"), (" (tf32x3: three TF32 products)", {}, None, "tf32x3"),
                    (" (ConvTranspose3d forward, not sub-pixel)", {"subpixel": False}, None, "fp32")]
        variants = (("", {}, None, "fp32"), (" (U-Net checkpointing)", {"checkpoint_unets": True}, None, "fp32"),
                    maps, finest,
                    (" (seeded: noise drawn on the CPU)", {}, torch.Generator().manual_seed(0), "fp32"),
                    *(gpu_only if device == "cuda" else []))
        for label, settings, generator, io_precision in variants:
            settings = dict(settings)
            subpixel = settings.pop("subpixel", None)
            for name, value in {**defaults, **settings}.items():
                setattr(engine.network, name, value)
            before = reset_peak(device)
            torch.manual_seed(0)
            with mock.patch.object(model, "uses_subpixel_upconvs", lambda _: subpixel) if subpixel is not None \
                    else contextlib.nullcontext():
                t, _ = clock(lambda: engine.instance_optimize(moving, fixed, iterations=args.io_steps,
                                                              similarity="lncc", generator=generator, progress=False,
                                                              precision=io_precision), device)
            io_rows.append((f"mgr_engine instance_optimize{label}", t, peak_gib(device, before, ours)))
        for name, value in defaults.items():
            setattr(engine.network, name, value)

    # --- layout: the engine's choice by device (ops.network_memory_format) against the other,
    # and on a GPU each with cuDNN's autotuning (cudnn.benchmark: it times every algorithm of a
    # convolution shape on its first call; the engine leaves the flag as the user set it)
    layouts = []
    engines_layout = network_memory_format(device)
    variants = [(name, layout, False) for name, layout in (("channels-last 3-D", torch.channels_last_3d),
                                                            ("contiguous", torch.contiguous_format))]
    if device == "cuda":
        variants += [(f"{name}, cudnn.benchmark", layout, True) for name, layout, _ in variants]
    try:
        for layout_name, layout, autotuned in variants:
            layout_name += " (the engine's)" if layout == engines_layout and not autotuned else ""
            torch.backends.cudnn.benchmark = autotuned
            for network in (engine.network, engine.inference_network):
                network.to(memory_format=layout)
            engine.predict_map(moving, fixed)  # not timed: with autotuning, its first call tunes
            warm_layout = statistics.median(clock(lambda: engine.predict_map(moving, fixed), device)[0]
                                            for _ in range(args.repeats))
            io_layout = float("nan")
            if not args.skip_io and args.layout_io_steps > 0:
                engine.instance_optimize(moving, fixed, iterations=1, similarity="lncc", progress=False)  # likewise
                io_layout = clock(lambda: engine.instance_optimize(moving, fixed, iterations=args.layout_io_steps,
                                                                   similarity="lncc", progress=False), device)[0]
            layouts.append((layout_name, warm_layout, io_layout))
    finally:
        torch.backends.cudnn.benchmark = False
        for network in (engine.network, engine.inference_network):
            network.to(memory_format=engines_layout)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [f"## End to end on tensors, {name}, network {'x'.join(map(str, shape))}", "",
             f"torch {torch.__version__}; randomized official-architecture weights; reference = GradientICONSparse "
             "as register_pair calls it (both directions and the loss); fp32 with TF32 off unless stated.", "",
             *([f"The reference did not import ({reference_error}): its cells are nan.", ""] if reference_error else []),
             "| no instance optimization | reference | mgr_engine | reference / mgr_engine |", "|---|--:|--:|--:|"]
    lines += [f"| {label} | {r * 1e3:.1f} ms | {o * 1e3:.1f} ms | {r / o:.2f}x |" for label, r, o in rows]
    lines += [f"| peak memory (own weights + the call's peak) | {ref_peak:.2f} GiB | {ours_peak:.2f} GiB | "
              f"{ref_peak / ours_peak:.2f}x |", "",
              f"Largest difference between both maps: {agreement:.2e} voxel.", "",
              "| precision (mgr_engine, no IO) | warm latency | largest point difference against fp32 |", "|---|--:|--:|"]
    lines += [f"| {n} | {t * 1e3:.1f} ms | {d:.3f} voxel |" for n, t, d in precision]
    lines += ["", f"| transposed convolutions (mgr_engine, no IO, fp32) | warm (median of {args.repeats}) | "
              "peak memory (own weights + the call's peak) | largest point difference against the engine's |",
              "|---|--:|--:|--:|"]
    lines += [f"| {n} | {t * 1e3:.1f} ms | {m:.2f} GiB | {d:.2e} voxel |" for n, t, m, d in upconvs]
    if io_rows:
        base_t, base_m = io_rows[0][1], io_rows[0][2]
        lines += ["", f"| IO, {args.io_steps} steps + final forward, LNCC | time | per step | peak memory (own weights + "
                  "the call's peak) | speed-up | memory vs reference |",
                  "|---|--:|--:|--:|--:|--:|"]
        lines += [f"| {n} | {t:.2f} s | {t / args.io_steps:.3f} s | {m:.2f} GiB | {base_t / t:.2f}x | {m / base_m:.0%} |"
                  for n, t, m in io_rows]
    lines += ["", f"| layout of the networks (mgr_engine) | no IO, warm (median of {args.repeats}) | "
              f"IO, {args.layout_io_steps} steps + final forward |", "|---|--:|--:|"]
    lines += [f"| {n} | {w * 1e3:.1f} ms | {t:.2f} s |" for n, w, t in layouts]
    write_table(lines, args.results)
    if not args.skip_compile:
        compiled_rows(state, net.config, device, moving, fixed, phi, voxels, args.repeats, args.results)


def write_table(lines, results, continues=False):
    """Print ``lines`` and append them to ``results``: a new block after a blank line, or with
    ``continues`` the next rows of the table written last."""
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if results:
        with open(results, "a") as f:
            f.write(table if continues else "\n" + table)


def compiled_rows(state, config, device, moving, fixed, phi, voxels, repeats, results):
    """``Engine(compile=True)``: cold (the first call compiles) and warm latency, and its
    largest difference from the eager map, each row written as soon as it is measured; a
    failure is reported, not raised. On CUDA twice: with our Triton kernels inside the graph
    (that Dynamo captures them is checked on the CPU, tests/test_kernels_compile.py; that
    inductor and CUDA graphs run them, only here), then with the PyTorch ops, which inductor
    compiles itself."""
    from mgr_engine import Engine, ops

    mode = "torch.compile, mode reduce-overhead (CUDA graphs)" if device == "cuda" else "torch.compile"
    write_table([f"| no IO, {mode} | first call (compiles) | warm (median of {repeats}) | largest point difference against eager |",
                 "|---|--:|--:|--:|"], results)
    kernel_modes = {"auto": "mgr_engine, Triton kernels in the graph", "torch": "mgr_engine, PyTorch ops (inductor)"}
    for kernel_mode, label in kernel_modes.items() if device == "cuda" else [("auto", "mgr_engine")]:
        try:
            with ops.kernel_mode(kernel_mode):
                engine = Engine(weights=state, config=config, device=device, compile=True)
                cold, compiled_phi = clock(lambda: engine.predict_map(moving, fixed), device)
                warm = statistics.median(clock(lambda: engine.predict_map(moving, fixed), device)[0] for _ in range(repeats))
            difference = ((compiled_phi - phi) * voxels).abs().max().item()
            row = f"| {label} | {cold:.1f} s | {warm * 1e3:.1f} ms | {difference:.2e} voxel |"
        except Exception as error:  # report it: the rest of the run was already written
            row = f"| {label} | failed: {type(error).__name__}: {str(error)[:300]} | | |"
        write_table([row], results, continues=True)


if __name__ == "__main__":
    main()
