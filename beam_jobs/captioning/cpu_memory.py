"""Let a CPU worker reuse freed tensor memory instead of page-faulting fresh memory.

glibc's malloc gives every freed block above its mmap threshold back to the kernel, and
trims the top of the heap beyond its trim threshold. Inference frees and reallocates the
same activation sizes thousands of times per batch, so each new tensor first page-faults
through freshly zeroed pages: about a million minor faults for one BLIP batch of 12 images
on the benchmark box, where a fault costs microseconds (a VM). Pinning both thresholds high
keeps freed blocks up to 32 MB (glibc's cap for the mmap threshold) in the heap for reuse.

Same results; the cost is that up to the largest set of transient activations stays mapped
between batches (the next batch maps it again anyway). A no-op where the C library is not
glibc.

Transparent huge pages for torch's tensors (``THP_MEM_ALLOC_ENABLE=1``) were tried as well:
fewer faults, but slower overall on the benchmark box (the kernel compacts memory on the
fault path), so they are not used (``docs/PERFORMANCE.md``).
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc refuses more (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process; whether they were set."""
    try:
        # The process's own symbols include its C library's: no ldconfig subprocess to find it.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt (macOS): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
