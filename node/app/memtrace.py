"""A diagnostic for memory growth: with $LAYERHIVE_TRACEMALLOC=<path prefix>, a process traces its Python
allocations (tracemalloc) from its first SIGUSR1 on (growth after start-up is what is looked for, and tracing the
start-up's imports would slow it several-fold). On each SIGUSR1 it writes `<prefix>.<pid>.<n>.snapshot` (for
`tracemalloc.Snapshot.load(...).compare_to(...)`) and one line to `<prefix>.<pid>.log`: its RSS, what tracemalloc
traces, and glibc's heap in use and held free (`mallinfo2`), which tells Python objects from native memory and
from allocator fragmentation. Off (and free) unless the variable is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import tracemalloc

import psutil

TRACE_ENV = "LAYERHIVE_TRACEMALLOC"
FRAMES = 8  # enough to tell the caller of a shared helper; tracing slows the process (diagnostics only)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_bytes() -> tuple[int, int, int] | None:
    """glibc's (bytes in use, bytes free but held in its arenas, bytes in mmapped blocks), or None elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks, info.fordblks, info.hblkhd


def install_from_env() -> None:
    """Installs the SIGUSR1 dump if $LAYERHIVE_TRACEMALLOC is set (call from the main thread)."""
    prefix = os.environ.get(TRACE_ENV)
    if not prefix:
        return
    started, dumps = time.monotonic(), 0

    def dump(_signum: int, _frame: object) -> None:
        nonlocal dumps
        pid = os.getpid()
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        tracemalloc.take_snapshot().dump(f"{prefix}.{pid}.{dumps}.snapshot")
        traced, _peak = tracemalloc.get_traced_memory()
        heap = malloc_bytes() or (0, 0, 0)
        with open(f"{prefix}.{pid}.log", "a") as log:
            log.write(f"{dumps} t={time.monotonic() - started:.0f}s rss={psutil.Process().memory_info().rss >> 20}MB "
                      f"traced={traced >> 20}MB malloc_in_use={heap[0] >> 20}MB malloc_free_held={heap[1] >> 20}MB "
                      f"mmapped={heap[2] >> 20}MB\n")
        dumps += 1

    signal.signal(signal.SIGUSR1, dump)
