"""What this installation has: ``mgr-engine info``, the lines to paste into a bug report and the
checks to run on a new machine (are the C++ kernels built, does torch see the GPU, does Triton
import, which checkpoint would each model load).

Versions come from the installed packages' metadata, so itk, onnx and the rest are not imported
(itk's first import alone takes a second); torch is, for its devices.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys

# The C++ extensions setup.py builds (kernels/*.cpp), each with what it computes.
CPP_EXTENSIONS = {
    "_trilinear_cpu": "trilinear warp, decoder epilogue",
    "_last_conv_cpu": "U-Net last convolution",
    "_gaussian_blur_cpu": "LNCC window",
    "_resample_cpu": "full-resolution resampling",
    "_jacobian_cpu": "Jacobian determinant",
    "_mind_ssc_cpu": "MIND-SSC descriptor",
    "_upconv_cpu": "transposed convolutions (Winograd forward, weight gradient)",
    "_encoder_cpu": "U-Net first encoder level",
}
# Packages the engine uses where installed, each with what for.
OPTIONAL_PACKAGES = {
    "itk": "image and transform files",
    "triton": "GPU kernels (CUDA)",
    "onnx": "export-onnx",
    "onnxruntime": "backend onnxruntime (CPU)",
    "onnxruntime-gpu": "backend onnxruntime (CUDA, TensorRT)",
    "nibabel": "FreeSurfer .mgz, nibabel images",
    "SimpleITK": "SimpleITK images",
    "isal": "fast .nii.gz compression",
    "numpy": "arrays",
}


# The instruction sets the C++ kernels' vector widths stand for (kernels/cpu_kernel.h).
VECTOR_ISA = {64: "AVX-512", 32: "AVX2 + FMA", 16: "SSE2 or the platform's baseline"}


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """The installation as a JSON-ready dict: ``mgr_engine``, ``python``, ``torch`` (version,
    threads, CUDA and its devices), ``kernels`` (the mode in force, each C++ extension built or
    not, the vector width in bytes the C++ kernels run in, which implementation the ops take on
    the CPU and on CUDA), ``packages`` (version or None)
    and ``weights`` (each model's checkpoint file, or where it was looked for)."""
    import torch

    from . import __version__
    from .engine import MODELS, resolve_weights, weights_search_path
    from .errors import WeightsNotFoundError
    from .kernel_modes import cpp_extensions_built, current_kernel_mode, usable_cores
    from .ops import triton_available

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append({"name": properties.name, "capability": f"sm_{properties.major}{properties.minor}",
                            "memory_gib": round(properties.total_memory / 2**30, 1)})
    built = {}
    for module in CPP_EXTENSIONS:
        try:
            importlib.import_module(f".{module}", __package__)
            built[module] = True
        except ImportError:
            built[module] = False
    vector_bytes = None
    if built.get("_last_conv_cpu"):
        from .kernels import last_conv_cpu

        vector_bytes = last_conv_cpu.vector_bytes()
    mode = current_kernel_mode()
    cpp = "C++ kernels (PyTorch where one does not apply)" if cpp_extensions_built() else None
    cpu_ops = {"auto": cpp or "PyTorch (C++ kernels not built)", "cpp": cpp or "nothing: mode cpp without C++ kernels "
               "raises", "torch": "PyTorch", "triton": "Triton (in its interpreter only: TRITON_INTERPRET=1)"}[mode]
    triton = "Triton kernels (warp, composition, LNCC, IO's BatchNorm backward)"
    cuda_ops = {"auto": triton if triton_available() else "PyTorch (triton not installed)", "cpp": "PyTorch",
                "torch": "PyTorch", "triton": triton}[mode]
    weights = {}
    for model in MODELS:
        try:
            weights[model] = {"found": True, "path": str(resolve_weights(model))}
        except WeightsNotFoundError:
            weights[model] = {"found": False, "looked_in": [str(p) for p in weights_search_path(model)]}
    return {
        "mgr_engine": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform(), "usable_cores": usable_cores()},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads(),
                  # a ROCm build has no CUDA version; torch.cuda is its HIP devices
                  "cuda": torch.version.cuda or (getattr(torch.version, "hip", None) and f"HIP {torch.version.hip}"),
                  "cuda_available": torch.cuda.is_available(), "devices": devices},
        "kernels": {"mode": mode, "mode_from_environment": "MGR_ENGINE_KERNELS" in os.environ,
                    "cpp_extensions": built, "cpu_vector_bytes": vector_bytes, "cpu_ops": cpu_ops,
                    "cuda_ops": cuda_ops},
        "packages": {package: _version(package) for package in OPTIONAL_PACKAGES},
        "weights": weights,
    }


def format_report(report: dict) -> str:
    """:func:`collect`'s dict as the lines ``mgr-engine info`` prints."""
    torch_info, kernels = report["torch"], report["kernels"]
    lines = [f"mgr_engine {report['mgr_engine']['version']} ({report['mgr_engine']['path']})",
             f"Python {report['python']['version']} ({report['python']['executable']}), "
             f"{report['python']['platform']}, {report['python']['usable_cores']} usable cores",
             f"torch {torch_info['version']}, {torch_info['threads']} threads; CUDA "
             + (f"{torch_info['cuda']}, " + "; ".join(
                 f"cuda:{i} {d['name']} ({d['capability']}, {d['memory_gib']} GiB)"
                 for i, d in enumerate(torch_info["devices"]))
                if torch_info["cuda_available"] else
                f"not available ({'a CPU-only build' if torch_info['cuda'] is None else 'no GPU seen'})"),
             f"kernel mode {kernels['mode']}" + (" (MGR_ENGINE_KERNELS)" if kernels["mode_from_environment"] else "")
             + f": ops on the CPU run {kernels['cpu_ops']}, on CUDA {kernels['cuda_ops']}",
             "C++ extensions" + (f" (vectors of {kernels['cpu_vector_bytes']} bytes: "
                                 f"{VECTOR_ISA[kernels['cpu_vector_bytes']]})" if kernels["cpu_vector_bytes"] else "")
             + ":"]
    for module, what in CPP_EXTENSIONS.items():
        state = "built" if kernels["cpp_extensions"][module] else "NOT BUILT (reinstall where a C++ compiler is found)"
        lines.append(f"  {module:<20} {state:<14} {what}")
    lines.append("packages:")
    for package, what in OPTIONAL_PACKAGES.items():
        lines.append(f"  {package:<20} {report['packages'][package] or 'not installed':<14} {what}")
    lines.append("weights (nothing is downloaded):")
    for model, weights in report["weights"].items():
        lines.append(f"  {model:<20} " + (weights["path"] if weights["found"] else
                                          "not found; looked in " + ", ".join(weights["looked_in"])))
    return "\n".join(lines) + "\n"
