#!/usr/bin/env python
"""Per-kernel benchmark: Triton kernels against the PyTorch reference op and its torch.compile.

For each op (trilinear warp, map composition, LNCC^2 loss, MIND-SSC descriptor and loss) at full size (175^3 by default):
median time of forward and of forward+backward, peak GPU memory of forward+backward, and
the effective bandwidth of the Triton forward against the GPU's datasheet peak and against a
device-to-device copy measured in the same run (ideal traffic: every input read once, every
output written once). A 0.2 ms call's time with CUDA events includes the host's launch
overhead; a second table gives the GPU time of the kernels alone (torch.profiler), and the
bandwidth from it. LNCC^2 also against the authors' ``SquaredLNCC``
(separable conv3d), the baseline of issue 3's target (>= 10x forward+backward, <= 1/4 of its
peak memory), where icon_registration imports. Everything in float32, TF32 off. The warp and
composition at two maps: jittered independently at every point (neighbours gather from
unrelated cache lines, the worst case) and smooth (as a registration's). Then both for several
``BLOCK:warps`` configurations (``--blocks``; none: no sweep), LNCC^2 for several numbers
of slabs its passes run in (``--lncc-slabs``), the backward pass of IO's eval-mode
BatchNorm, crop and concatenation at the U-Net's two finest levels, and IO's convolutions at a
full-resolution U-Net's layers in fp32, TF32 and tf32x3 (three TF32 products).

    python benchmarks/bench_kernels.py                 # on a CUDA machine
    python benchmarks/bench_kernels.py --results benchmarks/RESULTS.md
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke   # CPU: checks the script runs, times mean nothing

Needs no itk.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgr_engine import losses, ops  # noqa: E402

# Peak HBM bandwidth (GB/s) by device name, for the bandwidth fraction; --peak-gbs overrides.
PEAK_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def timed(fn, device, repeats, warmups: int = 2):
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmups`` runs."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def milliseconds(seconds) -> str:
    """A table cell: ``seconds`` in ms, or "-" where not measured (None)."""
    return f"{seconds * 1e3:.3f} ms" if seconds else "-"


def kernel_seconds(fn, repeats):
    """GPU time per call of the kernels (and copies) ``fn()`` launches, from torch.profiler: what
    the device spends, without the host's launch overhead that :func:`timed` includes for short
    ops. None where the profiler saw no GPU activity."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    # the device's own events (kernels, copies, fills): a host event also counts the kernels it launched
    busy_us = sum(event.device_time_total for event in profile.events()
                  if event.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / repeats / 1e6 if busy_us else None


def print_and_append(table: str, results) -> None:
    """Print a benchmark's Markdown table and, given ``--results``, append it to that file."""
    print(table)
    if results:
        with open(results, "a") as f:
            f.write("\n" + table)


def peak_memory(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def smooth_displacement(shape, generator, amplitude: float = 0.02, knots: int = 6):
    """A displacement of the kind a registration produces: random at ``knots``^3 points, trilinear
    in between, ``amplitude`` (standard deviation, [0, 1] units: 3.5 voxels at 175) at the knots."""
    coarse = amplitude * torch.randn(1, 3, knots, knots, knots, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def make_inputs(shape, device):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, *shape, generator=gen)
    target = (0.7 * image + 0.3 * torch.rand(1, 1, *shape, generator=gen))
    identity = ops.identity_map(shape)
    # independent jitter at every point: neighbouring points gather from unrelated cache lines (the worst case)
    coords = identity + 0.02 * torch.randn(1, 3, *shape, generator=gen)
    field = 0.02 * torch.randn(1, 3, *shape, generator=gen)
    # smooth, as the engine's maps and fields are: neighbouring points share their corners' cache lines
    smooth_coords = identity + smooth_displacement(shape, gen)
    smooth_field = smooth_displacement(shape, gen)
    return [t.to(device) for t in (image, target, coords, field, smooth_coords, smooth_field)]


def cases(shape, device):
    image, target, coords, field, smooth_coords, smooth_field = make_inputs(shape, device)
    n = image.numel()
    with torch.no_grad():
        target_descriptor = losses.mind_ssc(target)
    warp_bytes, compose_bytes = 4 * n * (3 + 1 + 1), 4 * n * (3 + 3 + 3)
    return {
        # name: (function of (mode-setting wrapper), differentiable inputs, ideal forward bytes)
        "warp (1 channel, zeros), jittered map": (lambda: ops.warp(image, coords, "zeros"), (image, coords), warp_bytes),
        "warp (1 channel, zeros), smooth map": (
            lambda: ops.warp(image, smooth_coords, "zeros"), (image, smooth_coords), warp_bytes),
        "compose_maps (3 channels, border), jittered": (
            lambda: ops.compose_maps(field, coords), (field, coords), compose_bytes),
        "compose_maps (3 channels, border), smooth": (
            lambda: ops.compose_maps(smooth_field, smooth_coords), (smooth_field, smooth_coords), compose_bytes),
        "lncc2_loss": (lambda: losses.lncc2_loss(image, target), (image,), 4 * n * 2),
        # the image read, 12 channels written
        "mind_ssc descriptor": (lambda: losses.mind_ssc(image), (image,), 4 * n * 13),
        # IO's MIND-SSC loss against the target's descriptor (computed once, as IO does): the image
        # and the target's 12 channels read
        "mind_ssc loss": (lambda: losses.mind_distance(image, target_descriptor), (image,), 4 * n * 13),
    }


def reference_lncc2(shape, device):
    """The authors' 1-LNCC^2 (icon_registration's SquaredLNCC: separable conv3d blurs), the
    baseline issue 3 names for the LNCC^2 kernel; None where icon_registration is missing."""
    try:
        from icon_registration.losses import SquaredLNCC
    except ImportError:
        return None
    image, target, *_ = make_inputs(shape, device)
    loss = SquaredLNCC(sigma=5)
    return (lambda: loss(image, target)), (image,)


def gradients_of(fn, inputs):
    """A function that runs ``fn()`` and returns the gradients of its sum to ``inputs``."""
    def forward_backward():
        for t in inputs:
            t.requires_grad_(True)
        grads = torch.autograd.grad(fn().sum(), inputs)
        for t in inputs:
            t.requires_grad_(False)
        return grads

    return forward_backward


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("bench_kernels needs a CUDA GPU (use --smoke with TRITON_INTERPRET=1 to check the script on a CPU)")
    # cuDNN would run the reference's conv3d blurs in TF32 by default: compare float32 with float32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    shape = tuple(args.shape) if not args.smoke else (12, 10, 14)
    repeats = args.repeats if not args.smoke else 1
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: times are meaningless)"
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    copy_gbs = copy_bandwidth(device, repeats) if device == "cuda" else None
    rows = []
    for op, (fn, inputs, ideal_bytes) in cases(shape, device).items():
        forward_backward = gradients_of(fn, inputs)
        result = {"op": op}
        for mode in ("torch", "compile", "triton"):
            if mode == "compile" and (args.no_compile or args.smoke):
                continue
            with ops.kernel_mode("triton" if mode == "triton" else "torch"):
                f = torch.compile(fn) if mode == "compile" else fn
                fb = torch.compile(forward_backward) if mode == "compile" else forward_backward
                with torch.no_grad():
                    result[f"{mode} fwd"] = timed(f, device, repeats)
                result[f"{mode} fwd+bwd"] = timed(fb, device, repeats)
                result[f"{mode} MiB"] = peak_memory(fb, device)
                if device == "cuda" and mode != "compile":
                    with torch.no_grad():
                        result[f"{mode} fwd kernels"] = kernel_seconds(f, repeats)
                    result[f"{mode} fwd+bwd kernels"] = kernel_seconds(fb, repeats)
        result["bandwidth"] = ideal_bytes / result["triton fwd"] / 1e9
        if result.get("triton fwd kernels"):
            result["kernel bandwidth"] = ideal_bytes / result["triton fwd kernels"] / 1e9
        rows.append(result)
    reference, ref = reference_lncc2(shape, device), None
    if reference is not None:
        fn, inputs = reference
        reference_forward_backward = gradients_of(fn, inputs)
        with torch.no_grad():
            ref_fwd = timed(fn, device, repeats)
        ref = {"fwd": ref_fwd, "fwd+bwd": timed(reference_forward_backward, device, repeats),
               "MiB": peak_memory(reference_forward_backward, device)}

    lines = [f"## Kernels, {name}, volume {'x'.join(map(str, shape))}, float32", "",
             f"torch {torch.__version__}; median of {repeats} runs; memory = peak extra GPU memory of forward+backward; "
             f"bandwidth against the datasheet's peak ({peak or '?'} GB/s) and against a device-to-device copy "
             f"measured here ({f'{copy_gbs:.0f}' if copy_gbs else '-'} GB/s, bytes read and written).", "",
             "| op | torch fwd | compile fwd | triton fwd | torch fwd+bwd | compile fwd+bwd | triton fwd+bwd | "
             "speed-up fwd+bwd vs torch | memory torch / triton (MiB) | triton fwd GB/s (of peak, of copy) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def ms(r, key):
        return milliseconds(r.get(key))

    for r in rows:
        fractions = [f"{r['bandwidth'] / ceiling:.0%}" for ceiling in (peak, copy_gbs) if ceiling]
        frac = f" ({', '.join(fractions)})" if fractions else ""
        lines.append(
            f"| {r['op']} | {ms(r, 'torch fwd')} | {ms(r, 'compile fwd')} | {ms(r, 'triton fwd')} | "
            f"{ms(r, 'torch fwd+bwd')} | {ms(r, 'compile fwd+bwd')} | {ms(r, 'triton fwd+bwd')} | "
            f"{r['torch fwd+bwd'] / r['triton fwd+bwd']:.1f}x | {r['torch MiB']:.0f} / {r['triton MiB']:.0f} | "
            f"{r['bandwidth']:.0f}{frac} |")
    if any("kernel bandwidth" in r for r in rows):
        lines += ["", "| op, GPU time of the kernels alone (profiler) | torch fwd | triton fwd | torch fwd+bwd | "
                  "triton fwd+bwd | triton fwd GB/s (of peak, of copy) |", "|---|--:|--:|--:|--:|--:|"]
        for r in rows:
            gbs = r.get("kernel bandwidth")
            fractions = ", ".join(f"{gbs / ceiling:.0%}" for ceiling in (peak, copy_gbs) if ceiling and gbs)
            bandwidth = f"{gbs:.0f} ({fractions})" if gbs else "-"
            lines.append(f"| {r['op']} | {ms(r, 'torch fwd kernels')} | {ms(r, 'triton fwd kernels')} | "
                         f"{ms(r, 'torch fwd+bwd kernels')} | {ms(r, 'triton fwd+bwd kernels')} | {bandwidth} |")
    if ref is not None:
        ours = next(r for r in rows if r["op"] == "lncc2_loss")
        lines += ["", "| lncc2_loss against the reference's SquaredLNCC (conv3d) | reference | triton | reference / triton |",
                  "|---|--:|--:|--:|",
                  f"| forward | {ref['fwd'] * 1e3:.3f} ms | {ours['triton fwd'] * 1e3:.3f} ms | {ref['fwd'] / ours['triton fwd']:.1f}x |",
                  f"| forward + backward | {ref['fwd+bwd'] * 1e3:.3f} ms | {ours['triton fwd+bwd'] * 1e3:.3f} ms | "
                  f"{ref['fwd+bwd'] / ours['triton fwd+bwd']:.1f}x |",
                  f"| peak extra memory, forward + backward | {ref['MiB']:.0f} MiB | {ours['triton MiB']:.0f} MiB | "
                  f"{ref['MiB'] / ours['triton MiB']:.1f}x |"]
    if args.blocks:
        lines += ["", *block_sweep(shape, device, repeats, args.blocks)]
    if args.lncc_slabs:
        lines += ["", *slab_sweep(shape, device, repeats, args.lncc_slabs, ref)]
    lines += ["", *norm_backward_sweep(shape, device, repeats, peak, copy_gbs)]
    lines += ["", *convolution_precision_sweep(shape, device, repeats)]
    print_and_append("\n".join(lines) + "\n", args.results)


def copy_bandwidth(device, repeats, gib: float = 2.0) -> float:
    """GB/s of a device-to-device copy of ``gib`` GiB (bytes read plus written): the bandwidth a
    memory-bound kernel can reach on this GPU, below the datasheet's peak (about 4.3 of 4.8 TB/s
    on an H200 here, KINDS.md)."""
    n = int(gib * 2**30) // 4
    source, target = torch.empty(n, device=device), torch.empty(n, device=device)
    seconds = timed(lambda: target.copy_(source), device, repeats)
    return 2 * n * 4 / seconds / 1e9


def block_sweep(shape, device, repeats, configurations):
    """Forward+backward time of the Triton warp and composition for each configuration
    ``BLOCK[:NUM_WARPS]`` (map points and warps per program): the float32 backward holds 213
    registers a thread at BLOCK 256 and 93 at BLOCK 128 on sm_90 (kernels.compile_check), so
    fewer points a program may hide more latency."""
    from mgr_engine.kernels import warp as kwarp

    ops_under_test = {op: gradients_of(fn, inputs) for op, (fn, inputs, _) in cases(shape, device).items()
                      if op.startswith(("warp", "compose"))}  # the warp kernels' BLOCK; the others have their own
    lines = ["| BLOCK:warps | " + " | ".join(f"{op} fwd+bwd, call / kernels" for op in ops_under_test) + " |",
             "|--:|" + "--:|" * len(ops_under_test)]
    default = kwarp.BLOCK, kwarp.NUM_WARPS
    try:
        for configuration in configurations:
            block, _, warps = configuration.partition(":")
            kwarp.BLOCK, kwarp.NUM_WARPS = int(block), int(warps or default[1])
            cells = []
            for forward_backward in ops_under_test.values():
                with ops.kernel_mode("triton"):
                    call = timed(forward_backward, device, repeats)
                    kernels = kernel_seconds(forward_backward, repeats) if device == "cuda" else None
                cells.append(f"{milliseconds(call)} / {milliseconds(kernels)}")
            is_default = (kwarp.BLOCK, kwarp.NUM_WARPS) == default
            lines.append(f"| {kwarp.BLOCK}:{kwarp.NUM_WARPS}{' (default)' if is_default else ''} | "
                         + " | ".join(cells) + " |")
    finally:
        kwarp.BLOCK, kwarp.NUM_WARPS = default
    return lines


def slab_sweep(shape, device, repeats, slab_counts, ref):
    """lncc2_loss forward+backward (a gradient to the image) for each number of slabs its passes
    run in (``kernels.lncc.SLABS``): more slabs, less scratch (3 volumes + 10 / SLABS, at least
    the gradient's 4) and more launches (8 x SLABS + 1); 1 is the whole volume at once (13
    volumes at the peak). Against the reference's SquaredLNCC where ``ref`` has its figures."""
    from mgr_engine.kernels import lncc as klncc

    fn, inputs, _ = cases(shape, device)["lncc2_loss"]
    forward_backward = gradients_of(fn, inputs)
    lines = ["| lncc2_loss, SLABS | fwd+bwd, call / kernels | peak extra memory | against the reference (time, memory) |",
             "|--:|--:|--:|--:|"]
    default = klncc.SLABS
    try:
        for slabs in slab_counts:
            klncc.SLABS = slabs
            with ops.kernel_mode("triton"):
                call = timed(forward_backward, device, repeats)
                kernels = kernel_seconds(forward_backward, repeats) if device == "cuda" else None
                mib = peak_memory(forward_backward, device)
            against = f"{ref['fwd+bwd'] / call:.1f}x, {mib / ref['MiB']:.0%}" if ref else "-"
            lines.append(f"| {slabs}{' (default)' if slabs == default else ''} | {milliseconds(call)} / "
                         f"{milliseconds(kernels)} | {mib:.0f} MiB | {against} |")
    finally:
        klncc.SLABS = default
    return lines


def norm_backward_sweep(shape, device, repeats, peak, copy_gbs):
    """The backward pass of IO's eval-mode BatchNorm, crop and concatenation (the U-Net decoder's
    two finest levels as an IO step meets them: one sample, 16 channels on the grid one voxel
    larger than the input's, cropped to it; 32 channels at half resolution), torch's (its CUDA
    BatchNorm backward reduces each channel in one thread block) against the Triton kernel's;
    and the forward + backward. Bandwidth of the Triton backward's kernels (the skip's gradient,
    a copy, included) for its ideal traffic: the gradient's and x's C channels read, x's
    gradient written."""
    from mgr_engine.model import norm_crop_concat, randomize_weights

    half = tuple(-(-n // 2) for n in shape)
    levels = {"16 ch, full resolution": (16, tuple(n + 1 for n in shape), shape, 2),
              "32 ch, half resolution": (32, half, half, 16)}
    lines = ["| eval BatchNorm + crop + concat, 1 sample | torch bwd, call / kernels | triton bwd, call / kernels | "
             "speed-up bwd (kernels) | torch fwd+bwd | triton fwd+bwd | memory fwd+bwd torch / triton (MiB) | "
             "triton bwd kernels GB/s (of peak, of copy) |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    gen = torch.Generator().manual_seed(1)
    for level, (channels, grid, skip_grid, skip_channels) in levels.items():
        norm = randomize_weights(torch.nn.BatchNorm3d(channels), seed=channels).eval().to(device)
        x = torch.randn(1, channels, *grid, generator=gen).to(device).requires_grad_()
        skip = torch.randn(1, skip_channels, *skip_grid, generator=gen).to(device).requires_grad_()
        inputs = (x, skip, norm.weight, norm.bias)
        grad = torch.randn(1, channels + skip_channels, *skip_grid, generator=gen).to(device)
        cells = {}
        for mode in ("torch", "triton"):
            with ops.kernel_mode(mode):
                # the backward alone: of one forward's graph, kept
                backward = functools.partial(torch.autograd.grad, norm_crop_concat(norm, x, skip), inputs, grad,
                                             retain_graph=True)

                def forward_backward():
                    return torch.autograd.grad(norm_crop_concat(norm, x, skip), inputs, grad)

                cells[mode] = {"bwd": timed(backward, device, repeats), "fwd+bwd": timed(forward_backward, device, repeats),
                               "bwd kernels": kernel_seconds(backward, repeats) if device == "cuda" else None,
                               "MiB": peak_memory(forward_backward, device)}
                del backward  # and the graph it holds
        torch_, triton_ = cells["torch"], cells["triton"]
        ideal_bytes = 4 * channels * (math.prod(skip_grid) + 2 * math.prod(grid))
        kernels = triton_["bwd kernels"]
        speed_up = f"{torch_['bwd kernels'] / kernels:.1f}x" if kernels else "-"
        gbs = ideal_bytes / kernels / 1e9 if kernels else None
        fractions = ", ".join(f"{gbs / ceiling:.0%}" for ceiling in (peak, copy_gbs) if ceiling and gbs)
        lines.append(f"| {level} ({'x'.join(map(str, grid))}) | {milliseconds(torch_['bwd'])} / "
                     f"{milliseconds(torch_['bwd kernels'])} | {milliseconds(triton_['bwd'])} / {milliseconds(kernels)} | "
                     f"{speed_up} | {milliseconds(torch_['fwd+bwd'])} | {milliseconds(triton_['fwd+bwd'])} | "
                     f"{torch_['MiB']:.0f} / {triton_['MiB']:.0f} | {f'{gbs:.0f} ({fractions})' if gbs else '-'} |")
    return lines


def convolution_precision_sweep(shape, device, repeats):
    """IO's convolutions forward + backward (gradients of x and the weight, as an IO step takes
    them through ``model.low_memory_conv``) at the layers of a full-resolution U-Net, in each
    TF32 setting of the engine's sections: ``fp32`` (CUDA cores), ``tf32`` (one TF32 product),
    ``tf32x3`` (three TF32 products of split operands, float32's accuracy: ``model.tf32x3``);
    time, GPU time of the kernels, peak extra memory, and each setting's largest differences
    against fp32 of the output, the input gradient and the weight gradient, each relative to its
    largest value. On the CPU no setting changes the arithmetic (a dry run of the script)."""
    from mgr_engine import model
    from mgr_engine.engine import _TF32_SWITCHES

    half, quarter = (tuple(-(-n // f) for n in shape) for f in (2, 4))
    one_larger = tuple(n + 1 for n in shape)
    layers = {  # name: (layer, input grid): the official widths (down 2, 16, 32, ...; up 16, 32, ...)
        "down 2 -> 16, stride 2": (torch.nn.Conv3d(2, 16, 3, stride=2, padding=1), shape),
        "down 16 -> 32, stride 2": (torch.nn.Conv3d(16, 32, 3, stride=2, padding=1), half),
        "up 96 -> 32, transposed": (torch.nn.ConvTranspose3d(96, 32, 4, stride=2, padding=1), quarter),
        "up 48 -> 16, transposed": (torch.nn.ConvTranspose3d(48, 16, 4, stride=2, padding=1), half),
        "last 18 -> 3": (torch.nn.Conv3d(18, 3, 3, padding=1), one_larger),
    }
    lines = ["| IO convolution, fwd+bwd, 1 sample | fp32 call / kernels | tf32 call / kernels | tf32x3 call / kernels "
             "| tf32x3 speed-up (kernels) vs fp32 | peak MiB fp32 / tf32 / tf32x3 "
             "| tf32 vs fp32: output / input gradient / weight gradient | tf32x3 vs fp32: the same |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    gen = torch.Generator().manual_seed(2)
    for name, (layer, grid) in layers.items():
        layer = model.randomize_weights(layer, seed=3).to(device)
        x = torch.randn(1, layer.in_channels, *grid, generator=gen).to(device).requires_grad_()
        with torch.no_grad():
            grad = torch.randn(layer(x).shape, generator=gen).to(device)
        cells, results = {}, {}
        for setting in ("fp32", "tf32", "tf32x3"):
            with _TF32_SWITCHES.set_to(setting):
                def forward_backward():
                    out = model.low_memory_conv(layer, x)
                    return out.detach(), *torch.autograd.grad(out, (x, layer.weight), grad)

                results[setting] = forward_backward()
                cells[setting] = (timed(forward_backward, device, repeats),
                                  kernel_seconds(forward_backward, repeats) if device == "cuda" else None,
                                  peak_memory(forward_backward, device))
        fp32_kernels, x3_kernels = cells["fp32"][1], cells["tf32x3"][1]
        speed_up = f"{fp32_kernels / x3_kernels:.2f}x" if x3_kernels else "-"
        differences = " | ".join(" / ".join(f"{((ours - exact).abs().max() / exact.abs().max()).item():.1e}"
                                            for ours, exact in zip(results[s], results["fp32"]))
                                 for s in ("tf32", "tf32x3"))
        lines.append(f"| {name} ({'x'.join(map(str, grid))}) | "
                     + " | ".join(f"{milliseconds(call)} / {milliseconds(kernels)}" for call, kernels, _ in cells.values())
                     + f" | {speed_up} | " + " / ".join(f"{mib:.0f}" for _, _, mib in cells.values())
                     + f" | {differences} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(175, 175, 175))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peak-gbs", type=float, help="the GPU's peak memory bandwidth in GB/s")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--blocks", nargs="*", default=["64", "128", "256", "128:2", "256:8"],
                   help="BLOCK[:NUM_WARPS] of the warp kernels to compare (none: no sweep)")
    p.add_argument("--lncc-slabs", type=int, nargs="*", default=[1, 3, 5, 7, 10],
                   help="numbers of slabs the LNCC kernel's passes run in, to compare (none: no sweep)")
    p.add_argument("--smoke", action="store_true", help="tiny volume, one repeat: check the script runs")
    p.add_argument("--results", type=Path, help="append the table to this file")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
