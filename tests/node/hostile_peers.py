"""Hostile peers, as real processes: `python -m tests.node.hostile_peers ATTACK --initial-peers ... [options]`.

The hostile-peer tests and `benchmarks/hostile.py` start these against a swarm of real nodes. Each attack
prints `ready` once it runs and then keeps attacking until killed or its `--duration` ends; it prints a line
`result {json}` with what it saw (codes of the refusals it got, sessions it could open) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from node.model.checkpoint import resolve_model
from node.serve.node import Node, NodeConfig
from swarm.records import MAX_EPOCH

ATTACKS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict]]] = {}


def attack(name: str):
    def register(fn):
        ATTACKS[name] = fn
        return fn

    return register


def ready() -> None:
    print("ready", flush=True)


async def until_done(duration_s: float) -> None:
    await asyncio.sleep(duration_s if duration_s > 0 else float("inf"))


# --- lying records ---------------------------------------------------------------------------------------


class LyingNode(Node):
    """A node that serves its layers (slowly, if asked) but announces absurd claims: a layer in 0.1 us, 50 TB
    of memory, and the largest epoch a record may carry."""

    async def _announce(self, state: str | None = None) -> None:
        self.record = dataclasses.replace(self.record, state=state or self.record.state, layer_latency_s=1e-7,
                                          prefill_s_per_token_per_layer=1e-9, memory_bytes=5e13, epoch=MAX_EPOCH,
                                          free_kv_tokens=1 << 20)
        await self.peer.announce(self.record, ttl_s=self.config.ttl_s)


@attack("lying-record")
async def lying_record(args: argparse.Namespace) -> dict:
    start, end = (int(x) for x in args.layers.split(":"))
    node = LyingNode(resolve_model(args.model), NodeConfig(
        start=start, end=end, initial_peers=args.initial_peers, test_slowdown_s=args.slowdown_ms / 1000,
        ttl_s=args.ttl, bench=False))
    await node.start()
    print(f"peer {node.record.peer_id}", flush=True)
    ready()
    try:
        await until_done(args.duration)
    finally:
        await node.stop()
    return {"steps_served": node.steps_served}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--target", default=None, help="the peer id attacked")
    parser.add_argument("--layers", default="0:1", help="START:END the attack names (or serves, for a lying node)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until killed")
    parser.add_argument("--slowdown-ms", type=float, default=0.0)
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=64, help="how many streams, sessions or connections")
    parser.add_argument("--size-mb", type=float, default=64.0, help="how large an oversized message is")
    args = parser.parse_args(argv)
    result = asyncio.run(ATTACKS[args.attack](args))
    print("result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
