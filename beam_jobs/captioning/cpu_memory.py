"""Let a CPU worker reuse freed tensor memory, and fault fresh memory in 2 MB pages.

Two process-wide settings, same results, measured on the benchmark box (a VM, where a page
fault costs microseconds; ``docs/PERFORMANCE.md``):

* :func:`use_huge_pages`: torch asks the kernel for transparent huge pages for every tensor
  of 2 MB or more (``THP_MEM_ALLOC_ENABLE``, read once when torch first allocates, so it
  must be set before torch is imported). A BLIP batch of 12 images faulted 540,000 pages
  without it, 200,000 with it, and ran about 2 s faster.
* :func:`keep_freed_memory`: glibc's malloc gives every freed block above its mmap threshold back to the kernel, and
trims the top of the heap beyond its trim threshold. Inference frees and reallocates the
same activation sizes thousands of times per batch, so each new tensor first page-faults
through freshly zeroed pages: about 250,000 minor faults per BLIP batch of 12 images on the
benchmark box, where a fault costs microseconds (a VM). Pinning both thresholds high keeps
freed blocks up to 32 MB (glibc's cap for the mmap threshold) in the heap for reuse.

Same results; the cost is that up to the largest set of transient activations stays mapped
between batches (it would be mapped again by the next batch anyway). A no-op where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc refuses more (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process; whether they were set."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def use_huge_pages() -> bool:
    """Ask torch for transparent huge pages, unless the environment already says otherwise.

    Returns whether it took effect: False when torch was already imported (then the
    setting comes from the environment the process started with).
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return "torch" not in sys.modules
