"""Decode speed and time to first token: a local 3-node swarm against single-process generation.

Both are measured in the same run on the same model and prompt; medians over several
runs. With --delay-ms D every message any peer sends is held D ms (an emulated WAN
link per leg; this kernel has no netem) and the table compares stage-to-stage push
with client relaying against the physical limit: local compute + (stages + 1) x D.

Usage: python benchmarks/pipeline.py [--model NAME] [--runs 5] [--new-tokens 64] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.chat import Message, chat_template_ids  # noqa: E402
from node.checkpoint import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from node.client import SwarmClient  # noqa: E402
from node.generate import SamplingParams, decode_one_token, prefill, sample  # noqa: E402
from node.head import ClientHead  # noqa: E402
from node.local_swarm import LocalSwarm  # noqa: E402
from node.node import start_dht  # noqa: E402


def local_run(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of plain transformers with a KV cache."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        ttft = time.perf_counter() - t0
        cache = out.past_key_values
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        decode = (new_tokens - 1) / (time.perf_counter() - t1)
    return ttft, decode


async def swarm_run(client: SwarmClient, head: ClientHead, prompt_ids: list[int], new_tokens: int, relay: bool):
    params = SamplingParams(max_new_tokens=new_tokens)
    t0 = time.perf_counter()
    session = await client.open_session(await client.choose_chain(), max_length=len(prompt_ids) + new_tokens,
                                        relay=relay)
    try:
        token = sample(await prefill(session, head, prompt_ids, 0), params, None)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
            token = sample(await decode_one_token(session, head, token, position), params, None)
        decode = (new_tokens - 1) / (time.perf_counter() - t1)
    finally:
        await session.close()
    return ttft, decode


async def aggregate_rate(client: SwarmClient, head: ClientHead, prompt_ids: list[int], new_tokens: int,
                         sessions: int) -> float:
    """Tokens/s of `sessions` concurrent greedy generations on the chain, prefill included."""
    t0 = time.perf_counter()
    await asyncio.gather(*(swarm_run(client, head, prompt_ids, new_tokens, relay=False) for _ in range(sessions)))
    return sessions * new_tokens / (time.perf_counter() - t0)


def decode_passes(before: dict, after: dict) -> dict[int, int]:
    """{decode steps in a pass: passes} a node ran between two of its info answers."""
    sizes = {int(k) for k in after["decode_batches"]}
    counts = {k: after["decode_batches"].get(str(k), 0) - before["decode_batches"].get(str(k), 0) for k in sizes}
    return {k: n for k, n in sorted(counts.items()) if n}


async def measure_swarm(swarm: LocalSwarm, prompt_ids, new_tokens, runs, delay_s: float, concurrency: int):
    """{transport: [(ttft, decode tok/s), ...]} for push and relay, interleaved run by run against drift."""
    source = swarm.source
    dht = start_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        client = SwarmClient(dht, source, send_delay_s=delay_s)
        head = ClientHead(source)
        results: dict[str, list] = {"push": [], "relay": []}
        for relay in (False, True):
            await swarm_run(client, head, prompt_ids, 4, relay)  # warm-up: connections
        for _ in range(runs):
            for name in results:
                results[name].append(await swarm_run(client, head, prompt_ids, new_tokens, name == "relay"))
        rates: dict[int, list[float]] = {1: [], concurrency: []}
        chain = await client.choose_chain()
        before = [await client.node_info(hop.node_id) for hop in chain]
        for _ in range(runs if concurrency > 1 else 0):
            for sessions in rates:
                rates[sessions].append(await aggregate_rate(client, head, prompt_ids, new_tokens, sessions))
        after = [await client.node_info(hop.node_id) for hop in chain]
        return results, rates, [decode_passes(b, a) for b, a in zip(before, after, strict=True)]
    finally:
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="emulated one-way delay of every leg")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent sessions for the aggregate rate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    delay_s = args.delay_ms / 1000
    node_args = ["--emulate-delay-ms", str(args.delay_ms)] if args.delay_ms else []

    with LocalSwarm(args.model, num_nodes=args.nodes, threads_per_node=args.threads, node_args=node_args) as swarm:
        source = swarm.source
        tokenizer = load_tokenizer(source)
        prompt_ids = chat_template_ids(tokenizer, [Message("user", "Explain pipeline parallelism in three sentences.")])
        swarm_results, rates, passes = asyncio.run(
            measure_swarm(swarm, prompt_ids, args.new_tokens, args.runs, delay_s, args.concurrency)
        )

    model = AutoModelForCausalLM.from_pretrained(source.root, dtype=torch.float32).eval()
    local_run(model, prompt_ids, 4)
    local_results = [local_run(model, prompt_ids, args.new_tokens) for _ in range(args.runs)]

    def med(results, index):
        return statistics.median(r[index] for r in results)

    local_ttft, local_decode = med(local_results, 0), med(local_results, 1)
    legs = {"push": args.nodes + 1, "relay": 2 * args.nodes}
    print(f"model {source.name}, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, "
          f"{args.runs} runs (medians), {args.threads} torch threads, {args.delay_ms:g} ms per leg")
    print(f"{'':30} {'TTFT ms':>9} {'decode tok/s':>13} {'ms/token':>9} {'limit ms':>9} {'vs limit':>9}")
    print(f"{'single process':30} {local_ttft * 1000:9.1f} {local_decode:13.2f} {1000 / local_decode:9.1f}")
    for name, results in swarm_results.items():
        ttft, decode = med(results, 0), med(results, 1)
        limit_ms = 1000 / local_decode + legs[name] * args.delay_ms  # compute + one-way legs per token
        print(f"{args.nodes}-node swarm, {name:5} ({legs[name]} legs) {ttft * 1000:9.1f} {decode:13.2f} "
              f"{1000 / decode:9.1f} {limit_ms:9.1f} {1000 / decode / limit_ms:8.2f}x")
    push_decode, relay_decode = med(swarm_results["push"], 1), med(swarm_results["relay"], 1)
    push_ttft = med(swarm_results["push"], 0)
    print(f"ratio push/local: decode {push_decode / local_decode:.2f}x, TTFT {push_ttft / local_ttft:.2f}x; "
          f"push/relay decode {push_decode / relay_decode:.2f}x")
    if args.concurrency > 1:
        one, many = statistics.median(rates[1]), statistics.median(rates[args.concurrency])
        print(f"aggregate tok/s (prefill included, push): 1 session {one:.2f}, {args.concurrency} sessions "
              f"{many:.2f}, ratio {many / one:.2f}x")
        for index, counts in enumerate(passes):  # how well the stages batched the concurrent sessions
            steps = sum(size * n for size, n in counts.items())
            print(f"  stage {index}: {steps} decode steps in {sum(counts.values())} passes "
                  f"(mean {steps / max(1, sum(counts.values())):.1f} per pass; by size {counts})")


if __name__ == "__main__":
    main()
