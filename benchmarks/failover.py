"""Recovery time per failure: SmolLM2 on a local swarm with replicas, a stage SIGKILLed mid-answer.

Each generation kills one stage of its chain at a random token; a fresh node takes the
dead one's place in the background. Prints every failure's recovery time (from noticing
the failure to the retried step's answer: re-route, reopen, replay, step) and the stall
the user sees (the longest gap between two tokens: noticing included) next to the
undisturbed per-token time measured in the same run, and checks each answer against
the undisturbed one. Answers run as rings (the default) or with --client-samples.

Usage: python benchmarks/failover.py [--generations 8] [--new-tokens 32] [--replicas 2] [--client-samples]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.app.chaos import ChaosRunner  # noqa: E402
from node.app.local_swarm import LocalSwarm, even_split  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402


async def run(swarm: LocalSwarm, ranges, prompt_ids: list[int], args) -> None:
    source = swarm.source
    async with connect(swarm.initial_peers, source) as client:
        runner = ChaosRunner(swarm, client, ClientHead(source) if args.client_samples else None, seed=args.seed)
        params = SamplingParams(max_new_tokens=args.new_tokens)
        t0 = time.perf_counter()
        undisturbed = await runner.generate(prompt_ids, params, kill_at=None)
        per_token_s = (time.perf_counter() - t0) / args.new_tokens
        print(f"undisturbed: {per_token_s * 1000:.1f} ms per token (prefill included)")
        print(f"{'run':>4} {'killed after':>13} {'failovers':>10} {'recovery ms':>12} {'x token':>8} "
              f"{'stall ms':>9} {'answer':>10}")
        recoveries, stalls = [], []
        for index in range(args.generations):
            await runner.wait_for_replicas(ranges, at_least=2)
            result = await runner.generate(prompt_ids, params, kill_at=runner.rng.randrange(1, args.new_tokens - 1))
            for event in result.events:
                recoveries.append(event.recovery_s)
            recovery = sum(e.recovery_s for e in result.events)
            stalls.append(result.longest_gap_s)
            same = "identical" if result.tokens == undisturbed.tokens else "DIFFERENT"
            print(f"{index:4d} {result.killed_at:13d} {len(result.events):10d} {recovery * 1000:12.1f} "
                  f"{recovery / per_token_s:8.1f} {result.longest_gap_s * 1000:9.1f} {same:>10}")
        print(f"recovery per failure: median {statistics.median(recoveries) * 1000:.1f} ms, "
              f"max {max(recoveries) * 1000:.1f} ms over {len(recoveries)} failures; "
              f"median = {statistics.median(recoveries) / per_token_s:.1f}x one token; longest stall per answer: "
              f"median {statistics.median(stalls) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--client-samples", action="store_true", help="the client embeds and samples (no ring)")
    args = parser.parse_args()
    source = resolve_model(args.model)
    ranges = even_split(source.num_layers, 3)
    prompt_ids = chat_template_ids(load_tokenizer(source), [Message("user", "Tell me about honeybees.")])
    with LocalSwarm(args.model, ranges * args.replicas, threads_per_node=1) as swarm:
        asyncio.run(run(swarm, ranges, prompt_ids, args))


if __name__ == "__main__":
    main()
