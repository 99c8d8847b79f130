"""Host (CPU) allocator tuning: keep freed memory in the process instead of handing big blocks back to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` on free. A ViT-B/16 training step allocates and frees gigabytes of activations, so on CPU every step
page-faults all of them in again and the kernel zeroes each page. Turning mmap off and the heap trim threshold up
lets the allocator reuse the same pages: `vidret bench hostpath` (LoRA on ViT-B/16 x 24 frames, 2 threads) measured
843,826 -> 21,294 minor faults, 22.9 -> 3.3 s system time and 33.2 -> 13.6 s per step (benchmarks/efficiency.md).

The cost: the resident size stays at its high-water mark (freed memory is kept for reuse, not returned). The
``vidret`` command applies this at start-up on Linux/glibc; ``VIDRET_MALLOC=system`` keeps glibc's defaults
(the memory benchmark does that, so its peak RSS counts live bytes only). jemalloc or tcmalloc through
``LD_PRELOAD`` are an alternative with the same effect.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_KEEP = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free memory at the heap's top before trimming
_TOP_PAD = 64 * 2**20  # grow the heap in 64 MiB steps (fewer brk calls while a step's activations pile up)

ENV = "VIDRET_MALLOC"
_applied = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed pages instead of unmapping them (see the module docstring).

    Returns True when applied; False on other platforms / C libraries or when ``VIDRET_MALLOC=system``.
    Safe to call more than once. Affects allocations made after the call.
    """
    if os.environ.get(ENV, "").strip().lower() == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0)  # no mmap per allocation: big blocks come from the heap and go back to it
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    ok &= libc.mallopt(_M_TOP_PAD, _TOP_PAD)
    global _applied
    _applied = _applied or bool(ok)
    return bool(ok)


def allocator_mode() -> str:
    """For benchmark records: whether :func:`keep_freed_memory` is in effect in this process."""
    return "glibc, freed memory kept (vidret)" if _applied else "system default"
