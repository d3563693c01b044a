"""Which implementation the ops take (the kernel mode), and how many threads the C++ kernels run.

Kept apart from :mod:`mgr_engine.ops` (which documents the modes and re-exports
:func:`set_kernel_mode` and :func:`kernel_mode`) because it does not import torch:
``mgr-engine warp`` and ``jacobian`` run the C++ kernels on numpy arrays, and with torch they
took 3.9-5.1 s instead of 2.4-2.8 s on a 512x512x300 CT (2-core AMD EPYC).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from .errors import InvalidOptionError

KERNEL_MODES = ("auto", "triton", "cpp", "torch")
_kernel_mode = os.environ.get("MGR_ENGINE_KERNELS", "auto")
if _kernel_mode not in KERNEL_MODES:
    # A typo ("CPP") ran neither Triton nor C++ kernels (1.4-3x slower on the CPU), without a word;
    # an error here would make the package unimportable, `mgr-engine info` included.
    logging.getLogger("mgr_engine").warning("MGR_ENGINE_KERNELS=%r is not a kernel mode (%s): using 'auto'",
                                            _kernel_mode, ", ".join(KERNEL_MODES))
    _kernel_mode = "auto"


def current_kernel_mode() -> str:
    """The mode in force: one of :data:`KERNEL_MODES`."""
    return _kernel_mode


def set_kernel_mode(mode: str) -> None:
    """Choose the implementation of warp, composition and LNCC: "auto", "triton", "cpp" or "torch"."""
    global _kernel_mode
    if mode not in KERNEL_MODES:
        raise InvalidOptionError(f"unknown kernel mode {mode!r}: choose one of {', '.join(KERNEL_MODES)}")
    _kernel_mode = mode


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Context manager form of :func:`set_kernel_mode`."""
    previous = _kernel_mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


try:
    from . import _trilinear_cpu  # noqa: F401
    _CPP_EXTENSIONS_BUILT = True
except ImportError:  # no C++ compiler at install time
    _CPP_EXTENSIONS_BUILT = False


def cpp_extensions_built() -> bool:
    """Whether ``setup.py`` built the C++ extensions (it builds all or none). A constant, not an
    ``lru_cache``: torch.compile traces through this and warns about a cache it ignores."""
    return _CPP_EXTENSIONS_BUILT


def cpp_kernels_allowed() -> bool:
    """Whether the current mode lets the C++ kernels run (each then checks its inputs): built, and
    mode "auto" or "cpp"; :class:`InvalidOptionError` in mode "cpp" where they were not built."""
    if _kernel_mode not in ("auto", "cpp"):
        return False
    if _kernel_mode == "cpp" and not cpp_extensions_built():
        raise InvalidOptionError("kernel mode 'cpp' needs the C++ extension, which was not built: reinstall "
                                 "mgr_engine where a C++ compiler is found (pip install -e .)")
    return cpp_extensions_built()


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity), at most ``OMP_NUM_THREADS`` where that is
    set: the limit a shared machine's job gives torch holds for the C++ kernels and the outputs'
    compression too."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:  # an empty, zero or malformed value is ignored
        cores = min(cores, int(requested))
    return cores


def cpu_threads() -> int:
    """The threads a C++ kernel runs on: torch's intra-op threads where torch is loaded (so
    ``torch.set_num_threads`` holds for the kernels too), else :func:`usable_cores`."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else usable_cores()
