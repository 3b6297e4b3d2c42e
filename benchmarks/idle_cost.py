"""What idling costs a stage: its next step's compute and one hop's Python work, back to back against after a gap.

On a WAN ring each stage idles between its steps (about 100 ms of every 119 at 20 ms legs on 3 stages), while the
single-process engine that sets the ring's physical limit never idles. This measures, in one process with one torch
thread: a decode step of `--layers` layers of the model, and one hop's Python work (the sender signs and packs a
step, the receiver parses it, digests it and checks its signature: node.net.protocol, node.net.evidence), each
run back to back, after `--gap-ms` asleep, and after `--gap-ms` of a busy Python loop (the CPU kept awake, so what
is lost is not the core sleeping). Medians; the ratio of each against back to back.
Usage: python benchmarks/idle_cost.py [--layers 10] [--gap-ms 100] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from node.model.checkpoint import DEFAULT_MODEL, resolve_model  # noqa: E402
from node.model.stage import Stage  # noqa: E402
from node.net.evidence import ReceiptSigner, check_receipt, wire_digest  # noqa: E402
from node.net.protocol import digest, pack, parse_step  # noqa: E402


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timed(run: Callable[[int], None], steps: int, before: Callable[[float], None] | None, gap_s: float) -> float:
    """Median ms of `run(step)` over `steps` steps (the first 4 dropped), each after `before(gap_s)` if given."""
    times = []
    for step in range(steps + 4):
        if before is not None:
            before(gap_s)
        started = time.perf_counter()
        run(step)
        times.append(time.perf_counter() - started)
    return statistics.median(times[4:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = resolve_model(args.model)
    stage = Stage(source, 0, args.layers, dtype=torch.float32, device=torch.device("cpu"))
    hidden = torch.randn(1, 1, source.config.hidden_size)
    caches = {}

    def compute(step: int) -> None:
        cache = caches.setdefault("cache", stage.new_cache(4096))
        if step == 0:
            cache.truncate(0)
        stage.forward(hidden, step, cache)

    signer = ReceiptSigner(RSAPrivateKey(), session="s", client="c", start=0, end=args.layers, dtype="float32",
                           quant="none", wire="none")
    public = signer._key.public_key()

    def hop(step: int) -> None:
        signer.step(step, 1, "ab" * 16)
        receipt = signer.receipt(wire_digest(hidden, "none"))
        raw = pack({"position": step, "receipt": receipt}, [hidden]).SerializeToString()
        parsed = parse_step(runtime_pb2.ExpertRequest.FromString(raw), hidden_size=source.config.hidden_size,
                            expected_position=step, max_length=4096)
        check_receipt(public, step, 1, parsed.receipt, digest(parsed.hidden))

    gap_s = args.gap_ms / 1000
    print(f"{source.name}, {args.layers} layers, 1 torch thread, gaps of {args.gap_ms:g} ms; median ms (ratio)")
    print(f"{'work':<34} {'back to back':>12} {'after sleep':>16} {'after busy loop':>16}")
    for name, run in ((f"decode step, {args.layers} layers", compute), ("one hop: sign, pack, parse, verify", hop)):
        caches.clear()
        warm = timed(run, args.steps, None, 0)
        asleep = timed(run, args.steps, _sleep, gap_s)
        busy = timed(run, args.steps, _spin, gap_s)
        print(f"{name:<34} {warm:12.3f} {asleep:9.3f} ({asleep / warm:4.2f}x) {busy:9.3f} ({busy / warm:4.2f}x)")


if __name__ == "__main__":
    main()
