"""captioning.cpu_memory sets glibc's malloc thresholds (this project's CI runs on glibc)."""

from __future__ import annotations

import ctypes
import platform

import pytest

from captioning import cpu_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_thresholds_are_set_and_freed_blocks_are_reused() -> None:
    assert cpu_memory.keep_freed_memory() is True
    assert cpu_memory.keep_freed_memory() is True  # once per process, idempotent
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 * 1024 * 1024  # over glibc's default mmap threshold, under the new one
    first = libc.malloc(size)
    libc.free(first)
    second = libc.malloc(size)
    libc.free(second)
    # From the heap, the freed block comes back; from mmap, it would be unmapped on free.
    assert first == second

