"""What 2 MB pages give a CPU stage's decode (node.model.hugepages), measured as A/B in one process.

Two copies of the same `--layers` layers are loaded in one process, one left on the 4 KB pages it was allocated on,
the other moved onto 2 MB pages, and their decode steps are interleaved in a random order, back to back and after
`--gap-ms` asleep (as a ring's stage idles through its legs): one process and one stretch of time for both, so the
drift of a shared VM (5-15% between runs) falls on both alike. Medians, and huge against small.
Usage: python benchmarks/huge_pages.py [--layers 10] [--gap-ms 100] [--rounds 60]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from node.model.checkpoint import DEFAULT_MODEL, resolve_model  # noqa: E402
from node.model.hugepages import huge_page_bytes, move_weights_to_huge_pages, private_anonymous_spans  # noqa: E402
from node.model.stage import Stage  # noqa: E402

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Every weight its own mapping (glibc otherwise raises its mmap threshold as memory is freed, and puts later
    # weights in a heap the two copies share), so the second copy's weights can be moved alone.
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10)
    source = resolve_model(args.model)
    small = Stage(source, 0, args.layers, dtype=torch.float32, device=torch.device("cpu"), with_ends=False,
                  huge_pages=False)
    spans = private_anonymous_spans()
    huge = Stage(source, 0, args.layers, dtype=torch.float32, device=torch.device("cpu"), with_ends=False,
                 huge_pages=False)
    moved = move_weights_to_huge_pages(leave=spans)
    weights = huge.layer_bytes * args.layers
    print(f"{source.name}, {args.layers} layers ({weights / 2**20:.0f} MB) twice, 1 torch thread; "
          f"{moved / 2**20:.0f} MB of the second copy's memory moved onto 2 MB pages "
          f"({huge_page_bytes() / 2**20:.0f} MB in the process)")
    if moved < 0.8 * weights:
        print("the kernel did not move the weights (no MADV_COLLAPSE, THP off, or no free huge pages): "
              "the comparison below is of two copies on small pages")

    stages = {"small": small, "huge": huge}
    caches = {name: stage.new_cache(4096) for name, stage in stages.items()}
    positions = dict.fromkeys(stages, 0)
    hidden = torch.randn(1, 1, source.config.hidden_size)

    def step(name: str) -> None:
        if positions[name] >= 4000:
            caches[name].truncate(0)
            positions[name] = 0
        stages[name].forward(hidden, positions[name], caches[name])
        positions[name] += 1

    for _ in range(4):
        step("small"), step("huge")
    times: dict[tuple[str, str], list[float]] = {(name, how): [] for name in stages for how in ("b2b", "idle")}
    for _ in range(args.rounds):
        order = list(times)
        random.shuffle(order)
        for name, how in order:
            if how == "b2b":
                step(name)  # the step before, so the timed one comes right after one of its own
            else:
                time.sleep(args.gap_ms / 1000)
            started = time.perf_counter()
            step(name)
            times[name, how].append(time.perf_counter() - started)
    print(f"decode step of {args.layers} layers, median ms of {args.rounds}")
    print(f"{'':26} {'4 KB pages':>11} {'2 MB pages':>11} {'ratio':>7}")
    for how, label in (("b2b", "back to back"), ("idle", f"after {args.gap_ms:g} ms asleep")):
        small_ms, huge_ms = (statistics.median(times[name, how]) * 1e3 for name in ("small", "huge"))
        print(f"{label:26} {small_ms:11.2f} {huge_ms:11.2f} {huge_ms / small_ms:6.2f}x")


if __name__ == "__main__":
    main()
