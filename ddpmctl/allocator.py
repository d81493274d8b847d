"""Keep glibc malloc from handing big tensors back to the OS after every use (CPU speed; benchmarks/README.md).

glibc serves a request above its mmap threshold with a fresh mapping and unmaps it on free, and trims the heap
top above its trim threshold. A U-Net forward pass allocates and frees feature maps of several MiB per layer, so
with the defaults every call page-faults its temporaries back in: a GroupNorm round trip at 16 x 128 x 32 x 32
took 6.3 ms instead of 0.5 ms, and `generate()` of config (a) at batch 64 ran 10-20% slower (fresh processes,
interleaved, 2 threads: fp32 71-77 vs 80-85 image-steps/s, bf16 107-121 vs 125-141). Raising both thresholds
keeps freed blocks in the heap for reuse; the process's peak RSS is unchanged, it just stays at its high-water
mark. ``DDPMCTL_MALLOC_TUNING=0`` leaves malloc alone; other C libraries and preloaded allocators are untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are still
# mapped, which micro-batched inference (ddpmctl.inference) keeps rare.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    if os.environ.get("DDPMCTL_MALLOC_TUNING", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also turns off glibc's dynamic adjustment of both.
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
