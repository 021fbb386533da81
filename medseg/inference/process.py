"""The prediction process's memory: what it may still allocate, its peak, and its allocator.

Hand-written because it is about this process on Linux/glibc (``/proc`` and ``mallopt``), which no
library we depend on exposes; elsewhere the functions fall back to what they can know.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from functools import cache

from medseg.io._limits import available_memory as kernel_available_memory

#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` field (in kB) of a ``/proc`` status file as bytes, or None."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def available_memory() -> int | None:
    """Bytes this process can allocate without swapping, or None: what the kernel says is available
    (``MemAvailable``) plus what the process's allocator holds free for reuse (glibc's free heap,
    which :func:`tune_allocator` keeps instead of returning it, e.g. after an earlier case)."""
    kernel = kernel_available_memory()
    return None if kernel is None else kernel + _free_heap_bytes()


def _free_heap_bytes() -> int:
    """Free bytes inside glibc's heap (``mallinfo2().fordblks``), 0 where that is not available."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    fn = getattr(_libc(), "mallinfo2", None)  # glibc >= 2.33
    if fn is None:
        return 0
    fn.restype = MallInfo2
    return int(fn().fordblks)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` from ``/proc/self/status`` where there is one.

    Not ``getrusage().ru_maxrss``: on Linux that also counts the parent's peak when the process was
    started by fork/exec (the high-water mark of the address space replaced by exec is kept), so a
    child of a big process reports the parent's peak. Falls back to it where there is no ``/proc``.
    """
    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def tune_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc): no ``mmap`` for large blocks, no trimming.

    On this kind of VM every fresh page costs a fault (freed memory goes back to the host, ≈ 2 s/GiB to
    touch again), and sliding-window inference allocates and frees window-sized tensors thousands of times;
    with glibc's defaults each large one is a fresh ``mmap``. Measured with
    ``scripts/bench_inference_memory.py``: 512×512×1000 predicted in 40 s instead of 69 s, for a peak about
    20 % higher (docs/benchmarks.md). ``medseg predict`` calls this for its own process; it is not the
    default of the library because the same settings made a training step several times slower. Set
    ``MEDSEG_MALLOC=default`` to leave the allocator alone. Returns whether the settings were applied
    (False elsewhere than glibc).
    """
    libc = _libc()
    if os.environ.get("MEDSEG_MALLOC", "").lower() == "default" or libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
