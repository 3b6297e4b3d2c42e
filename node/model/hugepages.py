"""A CPU stage's weights on 2 MB pages (Linux), so streaming them does not walk page tables.

Decode streams every weight of a stage once per token: 140 MB for 10 SmolLM2 layers, 35,000 pages of 4 KB, far
more than the TLB holds, so each page costs a page-table walk. Back to back the page tables (280 KB) stay in the
caches; after a stage idles through its network legs they do not, and every walk goes to memory. On 2 MB pages the
same weights are 70 pages. Measured with benchmarks/huge_pages.py (2-core AMD EPYC VM, 1 torch thread, two copies of
10 SmolLM2 layers in one process, their decode steps interleaved, medians of 30-60 each; three runs): after 100 ms
asleep 0.86x, 0.90x and 0.90x the time on small pages; back to back 0.89x, 1.01x and 0.89x.

Where the kernel's transparent huge pages are only on request (`madvise`, the usual default) the weights' memory
must ask: MADV_HUGEPAGE marks a mapping, and MADV_COLLAPSE (Linux 6.1+) moves what it already holds onto huge pages
at once. The weights are allocated by torch and oneDNN, whose opaque tensors give no address, so this asks for every
2 MB chunk of the process's private anonymous memory that is all resident: the weights, read whole at load, are;
thread stacks and reserved but untouched heap are not, and stay on small pages (a huge page there would make their
untouched memory resident). Elsewhere, or when the kernel refuses (no THP, no free huge pages), nothing
changes: this is a speed-up, never a condition.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Collection
from dataclasses import dataclass

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE_PAGES_FROM_BYTES = 32 << 20  # a stage with fewer weight bytes is left as it is (tiny test models)
MAX_SCANNED = 4 << 30  # a partly resident mapping larger than this (a reservation) is not read page by page
PAGE = mmap.PAGESIZE


@dataclass
class _Mapping:
    start: int
    end: int
    resident: int = 0  # bytes
    huge: int = 0  # bytes already on huge pages


def _private_anonymous_mappings(smaps: str) -> list[_Mapping]:
    """The private, writable, anonymous mappings (no file, not the stack) of a /proc/<pid>/smaps text."""
    mappings: list[_Mapping] = []
    current: _Mapping | None = None
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):  # a mapping's header line
            anonymous = len(fields) == 5 or fields[5] == "[heap]" or fields[5].startswith("[anon")
            current = None
            if anonymous and fields[1].startswith("rw") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = _Mapping(start, end)
                mappings.append(current)
        elif current is not None and fields[0] == "Rss:":
            current.resident = int(fields[1]) << 10
        elif current is not None and fields[0] == "AnonHugePages:":
            current.huge = int(fields[1]) << 10
    return mappings


def huge_page_bytes() -> int:
    """This process's anonymous memory on huge pages (0 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def private_anonymous_spans() -> set[tuple[int, int]]:
    """(start, end) of this process's private anonymous mappings now (empty off Linux)."""
    try:
        with open("/proc/self/smaps") as smaps:
            return {(m.start, m.end) for m in _private_anonymous_mappings(smaps.read())}
    except OSError:
        return set()


def _present_chunks(pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """The 2 MB chunks of [start, end) (aligned) whose every small page is resident, coalesced into ranges."""
    small = HUGE_PAGE // PAGE
    ranges: list[tuple[int, int]] = []
    for chunk in range(start, end, HUGE_PAGE):
        pagemap.seek(chunk // PAGE * 8)
        entries = memoryview(pagemap.read(small * 8)).cast("Q")
        if len(entries) == small and all(entry >> 63 for entry in entries):  # bit 63: the page is present
            if ranges and ranges[-1][1] == chunk:
                ranges[-1] = (ranges[-1][0], chunk + HUGE_PAGE)
            else:
                ranges.append((chunk, chunk + HUGE_PAGE))
    return ranges


def move_weights_to_huge_pages(leave: Collection[tuple[int, int]] = ()) -> int:
    """Asks the kernel to put this process's resident private anonymous memory on 2 MB pages, in whole 2 MB chunks
    (see the module docstring), but for the mappings spanning exactly `leave` (benchmarks compare the two in one
    process). Returns the bytes now on huge pages that were not before (0 off Linux, or if refused)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps") as smaps:
            mappings = [m for m in _private_anonymous_mappings(smaps.read()) if (m.start, m.end) not in leave]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 (closed below)
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = huge_page_bytes()
    with pagemap:
        for mapping in mappings:
            start = -(-mapping.start // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the mapping
            end = mapping.end // HUGE_PAGE * HUGE_PAGE
            if end <= start or mapping.resident < HUGE_PAGE or mapping.huge >= end - start:
                continue
            if mapping.resident >= mapping.end - mapping.start:
                ranges = [(start, end)]
            elif end - start <= MAX_SCANNED:  # partly resident (the kernel merges neighbouring mappings): by chunk
                ranges = _present_chunks(pagemap, start, end)
            else:
                continue
            for a, b in ranges:
                # Both may fail (EINVAL before Linux 6.1 or with THP off, EAGAIN/ENOMEM without free huge pages):
                # then the memory stays as it is.
                madvise(a, b - a, MADV_HUGEPAGE)
                madvise(a, b - a, MADV_COLLAPSE)
    return max(0, huge_page_bytes() - before)
