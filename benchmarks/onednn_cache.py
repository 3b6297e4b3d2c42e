"""What oneDNN's per-shape primitive caches hold: the anonymous memory a stage's process grows by as steps of new
row counts arrive, for several cache sizes (each in a fresh process: the size is read when the first primitive is
made).

A node's projections run on oneDNN (node.model.projection), which makes a primitive (a descriptor and JIT-compiled
kernels) per input shape and keeps it in two LRU caches. Every row count a step brings (prefills, failover replays,
batches of sessions) is a new shape for each weight shape of a layer. This is the churn soak's "RSS drift per node"
(benchmarks/soak.py; `memray attach --native` on a soak node: 28 of the 31.5 MB allocated in 200 s and still live
were oneDNN primitive descriptors and kernels): the caches filling up to their bound, not a leak.

Usage: python benchmarks/onednn_cache.py [--rows 160] [--entries 16 64 1024] [--layers 3] [--model NAME]
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
CHECKPOINTS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 256, 512)
CACHE_ENV = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")  # as node.model.projection sets them


def anonymous_mb() -> float:
    """This process's anonymous memory, after glibc has returned its free pages (what is left is in use)."""
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Anonymous:")) / 1024


def measure(rows: int, layers: int, model: str | None) -> dict[int, float]:
    """In this process: a stage of `layers` layers of `model` (None: the tiny one) stepped at row counts 1..`rows`;
    growth (MB) by count."""
    import torch

    sys.path.insert(0, str(ROOT))
    from node.model.checkpoint import resolve_model
    from node.model.stage import Stage
    from tests.conftest import build_tiny_checkpoint

    torch.set_num_threads(1)
    if model is None:
        model = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="onednn-tiny-")), "llama", num_layers=layers))
    source = resolve_model(model)
    stage = Stage(source, 0, layers, dtype=torch.float32, device=torch.device("cpu"))
    start, growth = anonymous_mb(), {}
    for count in range(1, rows + 1):
        with torch.no_grad():
            stage.forward(torch.randn(1, count, source.hidden_size), 0, stage.new_cache(count))
        if count in CHECKPOINTS or count == rows:
            growth[count] = anonymous_mb() - start
    return growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=160, help="distinct row counts stepped: 1..ROWS")
    parser.add_argument("--entries", type=int, nargs="+", default=[16, 64, 1024],
                        help="cache sizes to compare (64: node.model.projection's; 1024: oneDNN's default)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model to load instead of the tiny one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.rows, args.layers, args.model)))
        return 0
    results = {}
    for entries in args.entries:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **dict.fromkeys(CACHE_ENV, str(entries))}
        model = ["--model", args.model] if args.model else []
        out = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows), "--layers",
                              str(args.layers), *model], env=env, capture_output=True, text=True, check=True).stdout
        results[entries] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    counts = sorted(next(iter(results.values())))
    print(f"anonymous memory grown (MB) after steps of row counts 1..N, {args.layers} layers of "
          f"{args.model or 'the tiny llama'}, 1 thread")
    print(f"{'cache entries':>14} " + " ".join(f"{'N=' + str(n):>7}" for n in counts))
    for entries, growth in results.items():
        print(f"{entries:>14} " + " ".join(f"{growth[n]:7.1f}" for n in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
