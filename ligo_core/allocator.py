"""Keep freed CPU memory for reuse, so large tensors stop paying for page faults.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it to the kernel when freed, so each training step's logits, their gradient and the
loss's buffers come back as new pages the kernel must zero on first touch. On the 2-core
benchmark machine that was 19% of a small GPT-2's CPU training step (196 -> 159 ms,
``bench/allocator.py``, docs/BENCHMARKS.md). Serving large blocks from the heap and never
trimming it makes them reusable; the process keeps its peak memory until it exits, which suits a
one-off training process, not a long-running service.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of returning it; False where the C
    library is not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # M_TRIM_THRESHOLD takes an int: the largest positive one stands for "never".
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
