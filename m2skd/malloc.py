"""Keep freed memory in the process (glibc's malloc) instead of mapping fresh pages for every large array.

By default glibc serves blocks above a threshold (128 kB, raised up to 32 MB as such blocks are
freed) with a fresh mapping, returns it on free, and trims its heaps when their free top grows.
Prepare allocates and frees tens of MB a scan in two threads (scan bytes, lookup results, chunk
buffers, compressed chunks): each fresh page is a fault and zeroing, and each return a TLB flush
on both cores. Serving blocks up to 64 MB from the heap and trimming only beyond 256 MB free
saved 1.7 ms of CPU a scan, a quarter of prepare's (docs/results.md). A no-op off glibc."""
from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def retain_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set glibc's thresholds for this process (once); False where the C library is not glibc."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
    return _done
