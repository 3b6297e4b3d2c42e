"""A CPU stage's weights on 2 MB pages (node.model.hugepages): resident memory moves, untouched memory does not."""

from __future__ import annotations

import ctypes
import json
import mmap
import subprocess
import sys

from node.model.hugepages import (
    HUGE_PAGE,
    MADV_COLLAPSE,
    _private_anonymous_mappings,
    move_weights_to_huge_pages,
)

SMAPS = """\
55d0c0a00000-55d0c0e00000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                  64 kB
AnonHugePages:         0 kB
7f0001000000-7f0001400000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
Size:               4096 kB
Rss:                4096 kB
7f0002000000-7f0002400000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
Rss:                4096 kB
7ffc00000000-7ffc00200000 rw-p 00000000 00:00 0                          [stack]
Rss:                2048 kB
"""


def _mapping_of(address: int) -> dict[str, int]:
    """Rss and AnonHugePages (bytes) of the mapping holding `address`."""
    with open("/proc/self/smaps") as smaps:
        mappings = _private_anonymous_mappings(smaps.read())
    found = next(m for m in mappings if m.start <= address < m.end)
    return {"rss": found.resident, "huge": found.huge}


def _present_pages(address: int, length: int) -> int:
    """How many of the pages in [address, address + length) are resident (/proc/self/pagemap, bit 63)."""
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // page * 8)
        entries = pagemap.read(length // page * 8)
    return sum(int.from_bytes(entries[i: i + 8], "little") >> 63 for i in range(0, len(entries), 8))


def _collapse_supported() -> bool:
    """Whether this kernel moves a resident private mapping onto huge pages when asked (Linux 6.1+, THP not off)."""
    probe = mmap.mmap(-1, 4 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe.write(b"\1" * len(probe))
    address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    supported = libc.madvise(start, HUGE_PAGE, MADV_COLLAPSE) == 0
    probe.close()
    return supported


def test_smaps_are_read_for_private_anonymous_mappings_only():
    mappings = _private_anonymous_mappings(SMAPS)
    assert [(m.start, m.end - m.start, m.resident) for m in mappings] == [
        (0x55D0C0A00000, 4 << 20, 4 << 20),  # the heap
        (0x7F0000000000, 8 << 20, 64 << 10),  # a thread's stack, say: mostly untouched
    ]  # not a library, a shared mapping, or the main stack


def test_resident_memory_moves_and_untouched_memory_stays_small():
    if not sys.platform.startswith("linux"):
        assert move_weights_to_huge_pages() == 0  # nothing to ask elsewhere
        return
    full = mmap.mmap(-1, 16 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    full.write(b"\7" * len(full))
    sparse = mmap.mmap(-1, 32 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, len(sparse), 64 * mmap.PAGESIZE):  # 1 page in 64 touched, like a thread's stack
        sparse[offset] = 1
    full_at = ctypes.addressof(ctypes.c_char.from_buffer(full))
    sparse_at = ctypes.addressof(ctypes.c_char.from_buffer(sparse))
    assert _present_pages(sparse_at, len(sparse)) == len(sparse) // (64 * mmap.PAGESIZE)
    move_weights_to_huge_pages()
    # (The kernel may merge either mapping with a neighbour, so the sparse one is read page by page.)
    assert _present_pages(sparse_at, len(sparse)) == len(sparse) // (64 * mmap.PAGESIZE)
    assert full[:] == b"\7" * len(full)  # moved or not, the contents are the same
    if _collapse_supported():  # this machine's kernel (6.18) does: the path the nodes take here runs
        assert _mapping_of(full_at)["huge"] >= 15 * HUGE_PAGE  # all whole huge pages inside it


_LOAD_A_STAGE = """
import json, sys, torch
from node.model.checkpoint import resolve_model
from node.model.hugepages import huge_page_bytes
from node.model.stage import Stage
source = resolve_model(sys.argv[1])
before = huge_page_bytes()
stage = Stage(source, 0, 3, dtype=torch.float32, device=torch.device("cpu"), with_ends=False)
moved = huge_page_bytes() - before
output = stage.forward(torch.randn(1, 2, source.config.hidden_size), 0, stage.new_cache(8))
print(json.dumps({"moved": moved, "weights": stage.layer_bytes * 3, "finite": bool(torch.isfinite(output).all())}))
"""


def test_a_cpu_stage_of_the_model_holds_its_weights_on_huge_pages(smollm2):
    """Three SmolLM2 layers (42 MB) loaded in a fresh process, as a node loads its stage: their weights are on huge
    pages once the stage has loaded, where the kernel moves memory when asked (this machine's does; elsewhere the
    stage loads as before). (In a test worker, new weights may reuse memory an earlier test's stage had moved.)"""
    supported = sys.platform.startswith("linux") and _collapse_supported()
    done = subprocess.run([sys.executable, "-c", _LOAD_A_STAGE, smollm2.name], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["moved"] >= 0.8 * result["weights"] if supported else result["moved"] >= 0
