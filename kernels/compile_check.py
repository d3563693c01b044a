"""Compile every Triton kernel specialization for a CUDA GPU, on a machine without one.

CI has no GPU, so the kernels' tests run in Triton's interpreter, which executes the Python
body with numpy and accepts programs the compiler rejects (types it cannot lower, ops a
dtype does not support). This runs Triton's whole pipeline ahead of time, down to ptxas'
cubin for the given architecture, for every combination of each kernel's ``constexpr``
arguments in float32 and float64, and reads registers, stack and local (spilled) memory of
each cubin with ``cuobjdump -res-usage``. It needs Triton's NVIDIA backend (part of the Linux
wheel, ptxas included) but no driver.

    python -m mgr_engine.kernels.compile_check              # sm_90 (H100, H200)
    python -m mgr_engine.kernels.compile_check --arch 80    # A100
    python -m mgr_engine.kernels.compile_check --sass warp  # + the warp kernels' memory instructions

It must run without ``TRITON_INTERPRET=1``: under it ``triton.jit`` builds interpreted
functions, which do not compile.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import triton
import triton.language as tl

from . import lncc, mind_ssc, norm_crop_concat, warp

FLOAT_TYPES = {"fp32": tl.float32, "fp64": tl.float64}


def kernel_specializations():
    """``(kernel, constexpr domains)`` for each Triton kernel of the package: every constexpr
    argument with the values its launch sites may pass. ``ACC`` follows the pointer type."""
    flags = (False, True)
    return [
        (warp.warp_fwd_kernel, {"ZERO_PAD": flags, "ADD_COORDS": flags, "BLOCK": (warp.BLOCK,)}),
        (warp.warp_bwd_kernel, {"ZERO_PAD": flags, "ADD_COORDS": flags, "NEED_IMG_GRAD": flags,
                                "BLOCK": (warp.BLOCK,)}),
        (lncc.blur_axis_kernel, {"FROM_IMAGES": flags,
                                 "EPILOGUE": (lncc.STORE, lncc.LOSS_SUMS, lncc.MOMENT_GRADS, lncc.INPUT_GRADS),
                                 "SQUARED": flags, "HAS_MASK": flags, "CHANNELS": (3, 5),
                                 "ACC": ("follows the pointers",),
                                 "TAPS": (lncc.LNCC_TAPS,), "BLOCK": (lncc.BLOCK,)}),
        (norm_crop_concat.norm_grad_kernel, {"INPUT_GRAD": flags, "ACC": ("follows the pointers",),
                                             "BLOCK": (norm_crop_concat.BLOCK,),
                                             "ROUNDS": (norm_crop_concat.ROUNDS,)}),
        (mind_ssc.squares_kernel, {"GRAD": flags, "BLOCK": (mind_ssc.BLOCK,)}),
        (mind_ssc.box_axis_kernel, {"RADIUS": (2,), "ADJOINT": flags, "BLOCK": (mind_ssc.BLOCK,)}),
        (mind_ssc.normalize_kernel, {"GRAD": flags, "FROM_TARGET": flags, "HAS_WEIGHT": flags,
                                     "BLOCK": (mind_ssc.BLOCK,)}),
        (mind_ssc.distance_kernel, {"HAS_WEIGHT": flags, "BLOCK": (mind_ssc.BLOCK,)}),
        (mind_ssc.gather_pairs_kernel, {"BLOCK": (mind_ssc.BLOCK,)}),
    ]


# Arguments that are not what signature_of assumes (a float pointer, or a 32-bit integer): the
# MIND-SSC kernels' table of pair offsets and the patch mean's scale.
SIGNATURE_OVERRIDES = {
    "squares_kernel": {"offsets_ptr": "*i32"},
    "gather_pairs_kernel": {"offsets_ptr": "*i32"},
    "box_axis_kernel": {"scale": "fp32"},
}


@dataclass
class CompiledKernel:
    name: str
    float_type: str
    constexprs: dict
    registers: int
    stack_bytes: int
    local_bytes: int  # spilled registers live in local memory
    seconds: float
    atomic_orders: tuple = ()  # memory orders of the atomic adds in the PTX ("relaxed", "acq_rel")
    memory_instructions: dict | None = None  # {"loads", "stores", "atomics"}: global ones in the SASS, static


def _cuobjdump(cubin: bytes, option: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, option, f.name], capture_output=True, text=True, check=True).stdout


def signature_of(kernel, float_type: str) -> dict:
    """Triton's signature for ``kernel``: ``*_ptr`` arguments point to ``float_type``, the other
    runtime arguments are 32-bit integers (sizes and strides), constexprs are marked so; except
    where :data:`SIGNATURE_OVERRIDES` says otherwise."""
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = f"*{float_type}"
        else:
            signature[param.name] = "i32"
    return signature | SIGNATURE_OVERRIDES.get(kernel.__name__, {})


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK and LOCAL of the one function in ``cubin``, from ``cuobjdump -res-usage``."""
    report = _cuobjdump(cubin, "-res-usage")
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report)}


def memory_instructions(cubin: bytes) -> dict:
    """Global loads (LDG), stores (STG) and atomics (ATOMG, REDG) in ``cubin``'s SASS
    (``cuobjdump -sass``), counted where they are written, not as they run: a loop body counts
    once, a loop the compiler unrolled or peeled as often as it appears."""
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", _cuobjdump(cubin, "-sass"))
    return {"loads": opcodes.count("LDG"), "stores": opcodes.count("STG"),
            "atomics": sum(opcodes.count(op) for op in ("ATOMG", "REDG"))}


def compile_all(arch: int = 90, float_types=("fp32", "fp64"), sass_of: str | None = None):
    """Compile every specialization of :func:`kernel_specializations` for ``sm_<arch>``; a
    failure raises RuntimeError naming the kernel and its constexprs, from Triton's error.
    ``sass_of``: the kernels whose name contains it also count their memory instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: interpreted kernels do not compile")
    target = GPUTarget("cuda", arch, 32)
    compiled = []
    for kernel, domains in kernel_specializations():
        missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in domains]
        if missing:
            raise ValueError(f"{kernel.__name__}: no values listed for constexpr {', '.join(missing)}")
        names = list(domains)
        for float_type in float_types:
            for values in itertools.product(*(domains[n] for n in names)):
                constexprs = dict(zip(names, values))
                if "ACC" in constexprs:
                    constexprs["ACC"] = FLOAT_TYPES[float_type]
                started = time.perf_counter()
                source = ASTSource(fn=kernel, signature=signature_of(kernel, float_type), constexprs=constexprs)
                try:
                    binary = triton.compile(source, target=target)
                except Exception as error:
                    raise RuntimeError(f"{kernel.__name__} ({float_type}, {constexprs}) does not compile for "
                                       f"sm_{arch}: {error}") from error
                usage = resource_usage(binary.asm["cubin"])
                orders = tuple(sorted(set(re.findall(r"\b(?:atom|red)\.global\.\w+\.(\w+)\.", binary.asm["ptx"]))))
                counts = memory_instructions(binary.asm["cubin"]) if sass_of and sass_of in kernel.__name__ else None
                compiled.append(CompiledKernel(kernel.__name__, float_type, constexprs, usage["REG"], usage["STACK"],
                                               usage["LOCAL"], time.perf_counter() - started, orders, counts))
    return compiled


def summary(compiled) -> str:
    """One Markdown row per kernel and float type: how many specializations, the most registers,
    stack and local memory among them, and the memory orders of their atomic adds (Triton's
    default, acq_rel, fences each one)."""
    lines = ["| kernel | float | specializations | registers (max) | stack bytes (max) | local (spill) bytes (max) "
             "| atomic adds' memory order |",
             "|---|---|--:|--:|--:|--:|---|"]
    groups = itertools.groupby(compiled, key=lambda c: (c.name, c.float_type))
    for (name, float_type), group in groups:
        group = list(group)
        lines.append(f"| {name} | {float_type} | {len(group)} | {max(c.registers for c in group)} | "
                     f"{max(c.stack_bytes for c in group)} | {max(c.local_bytes for c in group)} | "
                     f"{', '.join(sorted({o for c in group for o in c.atomic_orders})) or '-'} |")
    return "\n".join(lines)


def sass_table(compiled) -> str:
    """One Markdown row per specialization with :func:`memory_instructions` counted."""
    lines = ["| kernel | float | constexprs | registers | global loads | global stores | global atomics |",
             "|---|---|---|--:|--:|--:|--:|"]
    for c in compiled:
        if c.memory_instructions:
            flags = ", ".join(f"{k}={v}" for k, v in c.constexprs.items() if k not in ("BLOCK", "ACC", "TAPS"))
            counts = c.memory_instructions
            lines.append(f"| {c.name} | {c.float_type} | {flags} | {c.registers} | {counts['loads']} | "
                         f"{counts['stores']} | {counts['atomics']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number: 80, 90, ...")
    parser.add_argument("--sass", metavar="NAME",
                        help="also count the global memory instructions in the SASS of the kernels whose name "
                             "contains NAME (static counts: a loop body once)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    compiled = compile_all(args.arch, sass_of=args.sass)
    print(f"Triton {triton.__version__}, sm_{args.arch}: {len(compiled)} specializations compiled in "
          f"{time.perf_counter() - started:.0f} s\n")
    print(summary(compiled))
    if args.sass:
        print("\n" + sass_table(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
