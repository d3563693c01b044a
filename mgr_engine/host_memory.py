"""Keep freed host memory for reuse: glibc's malloc tuned as PyTorch's CUDA caching allocator
behaves on the GPU.

glibc serves every allocation above 32 MiB (at 175^3 most tensors of the network) by a fresh
``mmap`` and returns it to the system on free, so each new tensor is paid again in page faults
(the kernel zeroes 4 KiB at a time). Measured at 175^3 on the 2-core AMD CPU, randomized
official weights (``benchmarks/bench_host_memory.py``, 2026-11-30, after the low-memory IO of
:func:`mgr_engine.model.low_memory_conv`): ``Engine.predict_map`` 2.40 -> 1.44 s and an IO step
with the final forward 26.9 -> 16.1 s once freed memory stays in the process, at a higher peak
(after IO 7.2 -> 10.1 GiB, after no IO 2.6 -> 3.2 GiB). The heap fragments:
torch asks for 64-byte aligned blocks, for which glibc wants a little more than a freed block of
the same size, so the heap first grows by a few blocks before freed space is reused.

:func:`keep_freed_memory` makes malloc take large blocks from its heap and keep what is freed
there; it is process-wide and lasts until :func:`release_freed_memory`.

:class:`mgr_engine.Engine` calls it on the CPU unless told not to (``cache_host_memory=False``
or ``MGR_ENGINE_CACHE_HOST_MEMORY=0``). Elsewhere than glibc (macOS, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's default number of mmap'd chunks
# mallopt(3): -1 disables trimming. The largest positive int (2 GiB) still let free() hand back
# the heap's top whenever more than that lay free there, after each IO backward pass: 2 GiB of
# page faults per warm IO call (2 steps, 175^3, 2-core AMD EPYC), measured by getrusage.
NEVER_TRIM = -1

_state = {"keeping": False}


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (mallopt and malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def available() -> bool:
    """Whether this process's malloc can be tuned (glibc)."""
    return _glibc() is not None


def keeping_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` is in effect."""
    return _state["keeping"]


def keep_freed_memory() -> bool:
    """Serve large allocations from malloc's heap and keep freed memory there for reuse.
    Process-wide. Returns whether it took effect (False where malloc is not glibc's)."""
    libc = _glibc()
    if libc is None:
        return False
    if not _state["keeping"]:
        if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
            log.warning("mallopt refused the settings: freed host memory is not kept")
            return False
        _state["keeping"] = True
        log.info("host memory: freed blocks are kept for reuse (faster on the CPU, higher peak); "
                 "Engine(cache_host_memory=False) or MGR_ENGINE_CACHE_HOST_MEMORY=0 to opt out, "
                 "mgr_engine.release_host_memory() to return it")
    return True


def release_freed_memory() -> None:
    """Undo :func:`keep_freed_memory`: malloc's defaults again (large blocks mapped on their
    own, the heap trimmed), and the free memory of the heap returned to the system now."""
    libc = _glibc()
    if libc is None:
        return
    if _state["keeping"]:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        _state["keeping"] = False
    libc.malloc_trim(0)
