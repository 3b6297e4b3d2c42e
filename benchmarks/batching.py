"""Aggregate decode speed of N concurrent sessions on one stage: batched (StepBatcher) vs one at a time.

Decode is memory-bound: each pass reads every weight of the stage once, whatever the number of tokens
in it, so batching N sessions' steps should multiply aggregate tokens/s by up to N while the weight
bytes read per second stay near the machine's memory bandwidth (gpt-fast's yardstick). We report that
achieved bandwidth next to a measured copy (read+write) and read-only bandwidth of this machine.

Sequential is what a server without batching does: one compute thread, steps run one after another.
Medians over --runs. Usage: python benchmarks/batching.py [--layers 10] [--sessions 1,2,4,8] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.model.checkpoint import DEFAULT_MODEL, resolve_model  # noqa: E402
from node.model.stage import KVCache, Stage  # noqa: E402
from node.serve.batching import StepBatcher  # noqa: E402

GB = 1e9


def median_times(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median wall time of each of `fns`, run interleaved so that a load spike on a shared box hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, samples in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return [statistics.median(samples) for samples in times]


def copy_and_read(nbytes: int = 256 << 20) -> tuple[Callable[[], object], Callable[[], object]]:
    """A tensor copy (moves nbytes in and nbytes out) and a sum (reads nbytes): the machine's yardsticks."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), (lambda: src.sum())


def prefilled_caches(stage: Stage, n: int, prompt: int, max_length: int) -> list[KVCache]:
    caches = [stage.new_cache(max_length) for _ in range(n)]
    for cache in caches:
        stage.forward(torch.randn(1, prompt, stage.shape.hidden_size), 0, cache)
    return caches


def rewind(caches: list[KVCache], prompt: int) -> None:
    """Back to just after the prompt, so every run decodes at the same context length."""
    for cache in caches:
        cache.length = prompt


def sequential(stage: Stage, caches: list[KVCache], prompt: int, steps: int) -> None:
    rewind(caches, prompt)
    x = torch.randn(1, 1, stage.shape.hidden_size)
    for _ in range(steps):
        for cache in caches:
            stage.forward(x, cache.length, cache)


def batched(batcher: StepBatcher, caches: list[KVCache], prompt: int, steps: int) -> None:
    rewind(caches, prompt)
    x = torch.randn(1, 1, batcher.stage.shape.hidden_size)

    async def session(cache: KVCache) -> None:
        for _ in range(steps):
            await batcher.run(cache, x, cache.length)

    async def all_sessions() -> None:
        await asyncio.gather(*(session(cache) for cache in caches))

    asyncio.run(all_sessions())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=10, help="stage = layers [0, LAYERS)")
    parser.add_argument("--sessions", default="1,2,4,8")
    parser.add_argument("--prompt", type=int, default=64, help="context length before decoding")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per session per run")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared, loaded box more threads mostly wait)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model(args.model)
    stage = Stage(source, 0, args.layers, dtype=torch.float32, device=torch.device("cpu"))
    weight_bytes = sum(p.numel() * p.element_size() for p in stage.layers.parameters())
    sessions = [int(n) for n in args.sessions.split(",")]
    print(f"{source.name}, layers 0:{args.layers}, fp32 CPU, {args.threads} thread(s), "
          f"weights {weight_bytes / 1e6:.0f} MB, context {args.prompt}, {args.steps} steps/session, "
          f"medians of {args.runs} interleaved runs, load average {os.getloadavg()[0]:.1f}")

    # Everything is timed interleaved, run after run, so load spikes on a shared box hit all rows alike.
    copy, read = copy_and_read()
    fns: list[Callable[[], object]] = [copy, read]
    batchers = {}
    for n in sessions:
        caches = prefilled_caches(stage, n, args.prompt, args.prompt + args.steps)
        batchers[n] = StepBatcher(stage, max_batch_size=n)
        fns += [partial(sequential, stage, caches, args.prompt, args.steps),
                partial(batched, batchers[n], caches, args.prompt, args.steps)]
    copy_time, read_time, *times = median_times(fns, args.runs)
    copy_bw, read_bw = (256 << 20) / copy_time, (256 << 20) / read_time
    print(f"memory: copy {copy_bw / GB:.1f} GB/s copied ({2 * copy_bw / GB:.1f} GB/s read+write), "
          f"read (sum) {read_bw / GB:.1f} GB/s\n")

    print(f"{'sessions':>8} {'sequential tok/s':>17} {'batched tok/s':>14} {'batched/seq':>12} "
          f"{'passes/s':>9} {'weights GB/s':>13} {'% of read bw':>13}")
    batched_rate: dict[int, float] = {}
    for i, n in enumerate(sessions):
        seq, bat = n * args.steps / times[2 * i], n * args.steps / times[2 * i + 1]
        sizes = batchers[n].batch_sizes  # every decode pass reads all the weights once
        passes_per_s = bat * sum(sizes.values()) / sum(size * count for size, count in sizes.items())
        batchers[n].shutdown()
        batched_rate[n] = bat
        print(f"{n:>8} {seq:>17.1f} {bat:>14.1f} {bat / seq:>11.2f}x {passes_per_s:>9.1f} "
              f"{passes_per_s * weight_bytes / GB:>13.2f} {100 * passes_per_s * weight_bytes / read_bw:>12.0f}%")

    if 1 in batched_rate and len(batched_rate) > 1:
        most = max(batched_rate)
        print(f"\naggregate decode, {most} sessions vs 1 session (batched): "
              f"{batched_rate[most] / batched_rate[1]:.2f}x")


if __name__ == "__main__":
    main()
