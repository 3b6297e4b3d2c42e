"""Moments of each step's way through a stage, for `benchmarks/ring_timeline.py` (where a token's time goes).

Off unless `LAYERHIVE_STEP_TRACE` names a file prefix when this module loads: a mark then costs one check. On, each
process keeps `(CLOCK_MONOTONIC ns, event, position)` in memory and writes them to `<prefix>.<pid>` every
`FLUSH_EVERY` marks and at exit. The clock is the machine's, so the files of nodes on one machine line up. A write
per mark would cost each step tens of microseconds on the cold caches of an idling stage, the very time measured.
"""

from __future__ import annotations

import atexit
import os
import time

FLUSH_EVERY = 4096
_prefix = os.environ.get("LAYERHIVE_STEP_TRACE") or None
_marks: list[tuple[int, str, int]] = []


def mark(event: str, position: int = -1) -> None:
    if _prefix is None:
        return
    _marks.append((time.monotonic_ns(), event, position))
    if len(_marks) >= FLUSH_EVERY:
        flush()


def flush() -> None:
    if _prefix is None or not _marks:
        return
    with open(f"{_prefix}.{os.getpid()}", "a") as out:
        out.writelines(f"{at} {event} {position}\n" for at, event, position in _marks)
    _marks.clear()


atexit.register(flush)
