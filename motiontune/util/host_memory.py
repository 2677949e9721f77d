"""Giving freed host memory back to the system.

glibc's malloc keeps memory a program frees inside its heaps for reuse, so a process's resident size stays at its
highest even when most of it is free. When an encoder is released before training, `malloc_trim(0)` hands its free
pages back, so training starts from the weights it needs rather than from the encoders' high-water mark. (After
every step it would keep the training process about 100 MB lower in benchmarks/peers.py's job, but the step then
takes about 0.1 s longer re-faulting the pages it reuses: not done.)"""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on (no ldconfig lookup)
    except (OSError, AttributeError):  # another C library (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc); elsewhere nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
