"""Clients that abandon answers mid-stream: do the nodes keep serving everyone else?

A local swarm of the tests' tiny model (2 nodes: layers 0:3 and 3:6, a ring sharing the LM head), and `--clients`
clients asking for answers back to back (random prompts of 2-40 tokens, 2-30 new tokens). With probability
`--abandon` per token a client stops reading and closes the session (a user who closes the chat mid-answer).
Each arm runs in a fresh swarm for `--seconds`. Printed per arm: answers completed, answers abandoned, failovers
(a stage that stopped answering: "no answer in 20 s"), and answers that failed. The arm without abandonment is
the baseline: any failover in another arm is a node that stopped answering for sessions still reading.

Found with it (session 13): a first caller of the LM head's batch, cancelled as its session closed, hung every
later caller on that node (node/model/head.py; 0 answers failed without abandonment, a stall within 10-40 s with
it). Usage: python benchmarks/abandoned.py [--seconds 120] [--abandon 0 0.1] [--clients 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.failover import ResilientSession  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from tests.conftest import build_tiny_checkpoint  # noqa: E402


def client_loop(swarm: LocalSwarm, seed: int, abandon: float, stop: threading.Event, counts: dict) -> None:
    rng = random.Random(seed)

    async def run() -> None:
        async with connect(swarm.initial_peers, swarm.source) as client:
            while not stop.is_set():
                prompt = [rng.randint(3, 200) for _ in range(rng.randint(2, 40))]
                tokens = rng.randint(2, 30)
                session = ResilientSession(client, max_length=len(prompt) + tokens, step_timeout_s=20)
                try:
                    async for _ in session.generate(prompt, SamplingParams(max_new_tokens=tokens), None):
                        if rng.random() < abandon:
                            counts["abandoned"] += 1
                            break
                    else:
                        counts["answers"] += 1
                except Exception as e:  # the answer failed: what this benchmark counts
                    counts["failed"] += 1
                    print(f"  client {seed}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                finally:
                    counts["failovers"] += len(session.events)
                    await session.close()

    asyncio.run(run())


def run_arm(model: Path, abandon: float, clients: int, seconds: float) -> dict:
    counts = {"answers": 0, "abandoned": 0, "failovers": 0, "failed": 0}
    with LocalSwarm(str(model), [(0, 3), (3, 6)], threads_per_node=1, node_args=["--ttl", "6"]) as swarm:
        stop = threading.Event()
        threads = [threading.Thread(target=client_loop, args=(swarm, seed, abandon, stop, counts), daemon=True)
                   for seed in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(90)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--abandon", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    model = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="abandoned-")), "llama", num_layers=6)
    rows = [(p, run_arm(model, p, args.clients, args.seconds)) for p in args.abandon]
    print(f"{args.clients} clients, {args.seconds:g} s per arm, 2 nodes of a tiny model (0:3, 3:6)")
    print(f"{'abandon/token':>13} {'answers':>8} {'abandoned':>9} {'failovers':>9} {'failed':>7}")
    for p, c in rows:
        print(f"{p:13.2f} {c['answers']:8d} {c['abandoned']:9d} {c['failovers']:9d} {c['failed']:7d}")


if __name__ == "__main__":
    main()
