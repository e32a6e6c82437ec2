"""Keep freed host memory in the process (glibc), so that a CPU training step does not
page-fault its large tensors back in at every step.

glibc hands every allocation above its mmap threshold (at most 32 MiB) to the kernel as a
fresh mapping and unmaps it when freed. A conservative step on a 108-atom cell makes
hundreds of per-edge tensors of that size, so each step pays the kernel for zeroing them
again page by page. With mmap off and the heap never trimmed, freed blocks are reused
instead, at a small cost in peak resident memory (figures in benchmarks/README.md,
"Host memory"). GPU tensors do not go through malloc and are unaffected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_MAX = -4


@functools.cache
def keep_freed_host_memory() -> bool:
    """Serve every allocation from glibc's heap and never return freed memory to the kernel.
    Process-wide and idempotent; returns False where the C library is not glibc (macOS, musl),
    whose allocator is left as it is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 never trims (mallopt(3)); any positive int is at most 2 GiB, which
    # a large model's freed step memory exceeds, and glibc then gives it back at every step.
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
