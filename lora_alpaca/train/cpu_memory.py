"""On CPU, keep memory that a micro-step frees for the next one instead of returning it.

Why: torch on CPU has no caching allocator; every activation is a malloc and a free. glibc
gives the top of its heap back to the kernel as soon as more than its trim threshold (128 KiB,
raised on the fly to at most 64 MiB) is free there, which after every backward it is: the
step's activations, hundreds of MiB. The next micro-step then page-faults all of them back
in, each 4 KiB page zeroed by the kernel. Measured on SmolLM2, separate processes in pairs
(BENCHMARKS.md): `bench/speed_variants.py --keep_freed_memory false|true` 1.00-1.14x, mean
1.04x over four pairs, none slower; with the CPU dropout on, ~9,000 -> ~7,500 faults a
micro-step and 1.10x mean over five pairs. Freed memory stays mapped, so the resident size
stays at the training step's peak, which the next step reaches again anyway. Allocations above glibc's mmap threshold (its ceiling is 32 MiB) are
still mapped and unmapped each time: the loss keeps its own buffers for those (train/loss.py).

The C library's mallopt is used as is (ctypes: torch exposes no allocator setting on CPU; the
environment variables glibc reads, MALLOC_TRIM_THRESHOLD_, are read only at process start).
Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1  # a C int: free heap up to 2 GiB stays mapped


def keep_freed_memory() -> bool:
    """Raise glibc's trim threshold (and fix its mmap threshold at the ceiling, which also
    stops it from moving); True where the C library took both settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
