"""What oneDNN's per-shape primitive caches hold: the anonymous memory a stage's process grows by as steps of new
row counts arrive, for several cache sizes (each in a fresh process: the size is read when the first primitive is
made).

A node's projections run on oneDNN (node.model.projection), which makes a primitive (a descriptor and JIT-compiled
kernels) per input shape and keeps it in two LRU caches. Every row count a step brings (prefills, failover replays,
batches of sessions) is a new shape for each weight shape of a layer. This is the churn soak's "RSS drift per node"
(benchmarks/soak.py; `memray attach --native` on a soak node: 28 of the 31.5 MB allocated in 200 s and still live
were oneDNN primitive descriptors and kernels): the caches filling up to their bound, not a leak.

Measured (SmolLM2-135M, 3 layers, `--rows 96 --entries 16 32 64 --cycle 1 4 8 12`, under the benchmark lock): the
caches hold 6.5 / 14.1 / 29.1 MB at 16 / 32 / 64 entries once ~16 row counts have been seen, and stop there (oneDNN's
default, 1,024, grew 235 MB at 96 row counts). A smaller bound costs time once steps alternate between more row counts
than it keeps: cycling over 8 or 12 row counts, 16 or 32 entries took 1.34-1.35x the step time of 64 (primitives made
again on every miss); 1 row count: no difference. So 64 (node.model.projection) stays: ~29 MB per node, bounded.

With `--cycle K [K ...]` it also times what a smaller cache costs: steps cycling over row counts 1..K (as decode
batches of 1..K sessions would), per step, against the largest size given (measured in the same run).

Usage: python benchmarks/onednn_cache.py [--rows 160] [--entries 16 64 1024] [--layers 3] [--model NAME]
                                         [--cycle 4 12]
(--model: a model `layerhive` resolves, e.g. SmolLM2-135M-Instruct; the default is the tests' tiny llama)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak import anonymous_bytes  # noqa: E402
from node.model.projection import ONEDNN_CACHE_ENV  # noqa: E402

CHECKPOINTS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 256, 512)


def anonymous_mb() -> float:
    """This process's anonymous memory, after glibc has returned its free pages (what is left is in use)."""
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL(None).malloc_trim(0)
    return anonymous_bytes(os.getpid()) / 2**20


def _stage(layers: int, model: str | None):
    """A stage of the first `layers` layers of `model` (None: the tests' tiny llama) on 1 CPU thread; its width."""
    import torch

    sys.path.insert(0, str(ROOT))
    from node.model.checkpoint import resolve_model
    from node.model.stage import Stage
    from tests.conftest import build_tiny_checkpoint

    torch.set_num_threads(1)
    if model is None:
        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="onednn-tiny-")), "llama", num_layers=layers))
    source = resolve_model(model)
    return Stage(source, 0, layers, dtype=torch.float32, device=torch.device("cpu")), source.hidden_size


def measure(rows: int, layers: int, model: str | None) -> dict[int, float]:
    """In this process: a stage of `layers` layers of `model` (None: the tiny one) stepped at row counts 1..`rows`;
    growth (MB) by count."""
    import torch

    stage, hidden = _stage(layers, model)
    start, growth = anonymous_mb(), {}
    for count in range(1, rows + 1):
        with torch.no_grad():
            stage.forward(torch.randn(1, count, hidden), 0, stage.new_cache(count))
        if count in CHECKPOINTS or count == rows:
            growth[count] = anonymous_mb() - start
    return growth


def time_cycles(rows: int, layers: int, model: str | None, cycles: list[int], rounds: int = 60) -> dict[int, float]:
    """Milliseconds per step of `layers` layers cycling over row counts 1..K, for each K in `cycles` (median of
    `rounds` rounds, after one round to warm up)."""
    import statistics
    import time

    import torch

    stage, hidden = _stage(layers, model)
    per_step = {}
    for k in cycles:
        inputs = {count: torch.randn(1, count, hidden) for count in range(1, k + 1)}
        times = []
        for _ in range(rounds + 1):
            caches = {count: stage.new_cache(count) for count in inputs}  # made before the clock starts
            started = time.perf_counter()
            with torch.no_grad():
                for count, cache in caches.items():
                    stage.forward(inputs[count], 0, cache)
            times.append((time.perf_counter() - started) / k)
        per_step[k] = 1e3 * statistics.median(times[1:])
    return per_step


def _child(args: list[str], env: dict[str, str]) -> dict[int, float]:
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=160, help="distinct row counts stepped: 1..ROWS")
    parser.add_argument("--entries", type=int, nargs="+", default=[16, 64, 1024],
                        help="cache sizes to compare (64: node.model.projection's; 1024: oneDNN's default)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model to load instead of the tiny one")
    parser.add_argument("--cycle", type=int, nargs="*", default=[], help="also time steps cycling over 1..K rows")
    parser.add_argument("--child", choices=["growth", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "growth":
        print(json.dumps(measure(args.rows, args.layers, args.model)))
        return 0
    if args.child == "time":
        print(json.dumps(time_cycles(args.rows, args.layers, args.model, args.cycle)))
        return 0
    results, timings = {}, {}
    common = ["--rows", str(args.rows), "--layers", str(args.layers), *(["--model", args.model] if args.model else [])]
    for entries in args.entries:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **dict.fromkeys(ONEDNN_CACHE_ENV, str(entries))}
        results[entries] = _child(["--child", "growth", *common], env)
        if args.cycle:  # in a process of its own: the growth is measured from empty caches
            timings[entries] = _child(["--child", "time", *common, "--cycle", *map(str, args.cycle)], env)
    counts = sorted(next(iter(results.values())))
    print(f"anonymous memory grown (MB) after steps of row counts 1..N, {args.layers} layers of "
          f"{args.model or 'the tiny llama'}, 1 thread")
    print(f"{'cache entries':>14} " + " ".join(f"{'N=' + str(n):>7}" for n in counts))
    for entries, growth in results.items():
        print(f"{entries:>14} " + " ".join(f"{growth[n]:7.1f}" for n in counts))
    if args.cycle:
        largest = max(args.entries)
        print(f"\nms per step cycling over row counts 1..K, and its ratio to {largest} entries")
        print(f"{'cache entries':>14} " + " ".join(f"{'K=' + str(k):>14}" for k in args.cycle))
        for entries, per_step in timings.items():
            print(f"{entries:>14} " + " ".join(f"{per_step[k]:7.2f} {per_step[k] / timings[largest][k]:5.2f}x"
                                              for k in args.cycle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
