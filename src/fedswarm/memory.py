"""A process's memory: what glibc's allocator keeps after large tensors are freed, and what /proc reports."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 << 10   # glibc mallopt: allocations above go to mmap


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def return_freed_memory_to_os() -> bool:
    """Pin glibc's mmap threshold at 128 KiB: tensors and buffers above it are mmapped and go back to the OS
    when freed (glibc's dynamic threshold otherwise rises to 32 MiB and keeps freed tensors in per-thread
    arenas, so RSS stays at its high-water mark). False where this is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc else None
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def trim() -> bool:
    """Hand the free memory of every malloc arena back to the OS (glibc's malloc_trim): after a large set of
    tensors was freed, e.g. the old stage of a peer that switched. False where this is not glibc."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None) if libc else None
    if malloc_trim is None:
        return False
    malloc_trim(0)   # 1 if it released memory, 0 if there was none to release
    return True


def proc_memory_mb(pid: int | str = "self") -> dict[str, float] | None:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB, from /proc; None once it has exited (a zombie
    has no memory lines, a reaped process no /proc entry, and one that exits mid-read fails the read with ESRCH)."""
    fields = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    if "VmRSS" not in fields:
        return None
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_mb": round(fields["VmHWM"], 1)}


def rss_summary() -> str:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), for logs; '?' off Linux."""
    mb = proc_memory_mb()
    return f"{mb['rss_mb']:.0f} MiB (peak {mb['peak_mb']:.0f} MiB)" if mb else "?"
