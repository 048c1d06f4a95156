"""captioning.cpu_memory: glibc's malloc thresholds and torch's transparent huge pages."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from captioning import cpu_memory

BEAM_JOBS = Path(__file__).resolve().parents[2] / "beam_jobs"


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


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages")
def test_huge_pages_are_set_before_torch_loads_and_used_by_its_tensors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh interpreter: the setting only works before torch is imported.
    script = (
        "from captioning import cpu_memory\n"
        "took = cpu_memory.use_huge_pages()\n"
        "import torch\n"
        "t = torch.ones(64 * 1024 * 1024 // 4)\n"
        "huge = [int(line.split()[1]) for line in open('/proc/self/smaps_rollup')\n"
        "        if line.startswith('AnonHugePages:')][0]\n"
        "print(took, huge)\n")
    env = {k: v for k, v in os.environ.items() if k != cpu_memory.HUGE_PAGES_ENV}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=BEAM_JOBS).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) >= 2048  # at least one 2 MB page, in kB
    import torch  # noqa: F401 - once torch is loaded, the setting can no longer apply

    monkeypatch.delenv(cpu_memory.HUGE_PAGES_ENV, raising=False)
    assert cpu_memory.use_huge_pages() is False
