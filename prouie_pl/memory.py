"""Resident memory on a CPU: hand freed heap pages back to the system, and read the process's peak.

PyTorch allocates CPU tensors with the C library's ``malloc``.  glibc keeps the pages of freed blocks below its
mmap threshold in the heap, and a training step frees gigabytes of activations in blocks of many sizes, so a
process's resident set grows step after step towards the sum of every shape it has seen (measured on Gemma 3
270M, CM on the demo data: 2.4 GB after the first micro-batch, 4.7 GB after sixteen, 6.4 GB after sixty) while
what it holds live stays near 1.5 GB.  ``malloc_trim(0)`` returns those pages (RSS back to about 1.5 GB), at a
price: the next step faults them in again (trimming after every micro-batch made SFT about 10% slower), so the
training modules trim only once the resident set has grown by ``UIEModule.heap_slack_mb`` since the last trim.
A fixed small mmap threshold would return every page too, but made SFT steps about 70% slower.
"""

from __future__ import annotations

import gc
import sys
from typing import Optional

_LIBC = None


def trim_heap(collect: bool = False) -> bool:
    """Return the heap's free pages to the system (glibc only; elsewhere a no-op returning False).  With
    ``collect`` run the garbage collector first, for reference cycles that hold tensors (a finished Lightning
    trainer and its module, for example)."""
    global _LIBC
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:  # not glibc (musl, for one)
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def peak_rss_mb() -> Optional[int]:
    """The process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb / 1024) if sys.platform != "darwin" else int(kb / 2 ** 20)  # macOS counts bytes


def rss_mb() -> Optional[float]:
    """The resident set now, in MB (Linux; None elsewhere)."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, AttributeError):
        return None
