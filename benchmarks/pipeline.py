"""Decode speed and time to first token: a local 3-node swarm against single-process generation.

Both are measured in the same run on the same model and prompt; medians over several runs.
Two single-process baselines: plain transformers with its KV cache (what "single-process
generation" of the model means to its users), and the nodes' own code, one `Stage` of
every layer with both ends and no network (the chain's compute: what the swarm adds beyond
it is the cost of pipelining). Each runs at 1 thread and at all cores, and each run keeps
the better TTFT and decode rate; the nodes share the cores out (3 nodes on 2 cores: 1
thread each). Four ways through the chain (see `node.net.protocol`): ring (the chain samples
and feeds the token back to its first stage: stages legs per token; its two ends share the
LM head's work), whole (a ring whose last stage computes the whole head), push (the client
embeds and samples: stages + 1 legs) and relay (through the client: 2 x stages legs). With --delay-ms D every
message any peer sends is held D ms (an emulated WAN link per leg; this kernel has no
netem) and the table compares each against its physical limit: the single-process Stage's
compute at the nodes' thread count + legs x D. With D, a third baseline runs the engine in a ring's rhythm
without its messages: the layers in the nodes' parts with D asleep after each, so that the ring against it is
what the messages cost, and it against the limit what idling costs (caches gone cold). A run's decode rate is
one over the median gap between two tokens (a shared VM stalls now and then; the median keeps a stall out).

The price of checks: --modes unchecked checked --replicas 2 (a ring through ResilientSession without and with
its default checks; the checks need a second node per layer range).

Speculation (`--speculate K`, default 8; `--speculation-only` skips the rest): the ring with and without
prompt-lookup drafts, greedy, on (a) code and repetitive prompts and (b) a chat prompt, with each prompt's
acceptance rate (draft tokens kept / verified at the last stage) and whether the outputs were identical;
`speculative speedup` is the geometric mean of the (a) prompts' ratios of median decode rates. With
`--draft-model M --draft-quant Q` the first stage drafts with model M held at Q (`node.model.draft`) instead.

Usage: python benchmarks/pipeline.py [--model NAME] [--runs 5] [--new-tokens 64] [--delay-ms 20] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.app.local_swarm import LocalSwarm, even_split  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.client.failover import ResilientSession  # noqa: E402
from node.client.generate import decode_one_token, prefill  # noqa: E402
from node.client.session import SwarmClient, connect  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.sampling import SamplingParams, sample  # noqa: E402
from node.model.stage import Stage  # noqa: E402


def decode_rate(times: list[float]) -> float:
    """Decode tokens/s from the moments tokens arrived: one over the median gap between two, since on a
    shared VM a run's mean is at the mercy of a few stalls that have nothing to do with the method."""
    return 1 / statistics.median(b - a for a, b in itertools.pairwise(times))


def local_run(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of plain transformers with a KV cache."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        times = [time.perf_counter()]
        cache = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            times.append(time.perf_counter())
    return times[0] - t0, decode_rate(times)


def engine_run(stage: Stage, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """The same, through the nodes' own code: one `Stage` of every layer with both ends, no network. The
    chain's compute, so the swarm's physical limit is this plus its legs' delay."""
    assert stage.embedder is not None and stage.head is not None
    cache = stage.new_cache(len(prompt_ids) + new_tokens)
    t0 = time.perf_counter()
    hidden = stage.forward(stage.embedder.embed(torch.tensor([prompt_ids])), 0, cache)
    token = stage.head.logits(hidden[:, -1:])[0, -1].argmax().view(1, 1)
    times = [time.perf_counter()]
    for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
        hidden = stage.forward(stage.embedder.embed(token), position, cache)
        token = stage.head.logits(hidden)[0, -1].argmax().view(1, 1)
        times.append(time.perf_counter())
    return times[0] - t0, decode_rate(times)


def engine_idle_run(stage: Stage, prompt_ids: list[int], new_tokens: int, stages: int, delay_s: float
                    ) -> tuple[float, float]:
    """The engine doing a ring's work in a ring's rhythm, minus its messages: each token's layers in `stages` even
    parts, asleep `delay_s` after each part but the last and after the head (the legs). Compute plus legs, paid on
    the caches a ring stage finds after idling through its legs (benchmarks/idle_cost.py); so the ring against this
    is what its messages cost (packing, signing, sockets, parsing, checking), and this against compute + legs is
    what the idling costs."""
    assert stage.embedder is not None and stage.head is not None
    parts = even_split(stage.source.num_layers, stages)
    caches = [stage.new_cache(len(prompt_ids) + new_tokens, layers=part) for part in parts]

    def through(hidden: torch.Tensor, position: int) -> torch.Tensor:
        for index, (part, cache) in enumerate(zip(parts, caches, strict=True)):
            hidden = stage.forward(hidden, position, cache, layers=part)
            if index < len(parts) - 1:
                time.sleep(delay_s)
        token = stage.head.logits(hidden[:, -1:])[0, -1].argmax().view(1, 1)
        time.sleep(delay_s)
        return token

    t0 = time.perf_counter()
    token = through(stage.embedder.embed(torch.tensor([prompt_ids])), 0)
    times = [time.perf_counter()]
    for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
        token = through(stage.embedder.embed(token), position)
        times.append(time.perf_counter())
    return times[0] - t0, decode_rate(times)


BASELINES = ("transformers", "engine")
IDLE_ENGINE = "engine idling its legs"  # measured only with --delay-ms, at the nodes' thread count


def _local_worker(root: str, threads: int, prompt_ids: list[int], new_tokens: int, conn,
                  idle_legs: tuple[int, float] | None = None) -> None:
    """Serves local runs in a process of its own: a single process means one that nothing else ran torch
    in. (In the benchmark's own process the client head's thread would start a second OpenMP team, and
    with 2 teams on 2 cores libgomp stops spinning between parallel regions: 32 -> 55 ms/token here.)"""
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    source = resolve_model(root)
    stage = Stage(source, 0, source.num_layers, dtype=torch.float32, device=torch.device("cpu"))
    runs = {"transformers": lambda n: local_run(model, prompt_ids, n),
            "engine": lambda n: engine_run(stage, prompt_ids, n)}
    if idle_legs is not None:
        runs[IDLE_ENGINE] = lambda n: engine_idle_run(stage, prompt_ids, n, *idle_legs)
    for run in runs.values():
        run(4)  # warm-up
    while conn.recv():
        conn.send({name: run(new_tokens) for name, run in runs.items()})


class LocalBaseline:
    """Single-process generation, in a separate process for each torch thread count in `threads`, run on
    request, by transformers and by the nodes' own engine (`BASELINES`). A call runs each and keeps, per
    baseline, the best TTFT and the best decode rate of its thread counts: single-process generation at its
    best at that moment (on this 2-core VM a second thread gains 0-40%, depending on the hour and the code)."""

    def __init__(self, root: str, threads: list[int], prompt_ids: list[int], new_tokens: int,
                 idle_legs: tuple[int, int, float] | None = None) -> None:
        """`idle_legs` = (thread count, stages, delay_s): that worker also runs `engine_idle_run`."""
        spawn = mp.get_context("spawn")  # a fresh interpreter: no torch state inherited from this one
        self._workers = []
        for count in threads:
            conn, child = spawn.Pipe()
            idle = idle_legs[1:] if idle_legs is not None and idle_legs[0] == count else None
            process = spawn.Process(
                target=_local_worker, args=(root, count, prompt_ids, new_tokens, child, idle), daemon=True)
            process.start()
            self._workers.append((count, conn, process))
        self.runs: dict[str, dict[int, list[tuple[float, float]]]] = {
            name: {count: [] for count in threads} for name in BASELINES}
        self.idle_runs: list[tuple[float, float]] = []  # IDLE_ENGINE's, if measured

    def __call__(self) -> dict[str, tuple[float, float]]:
        for count, conn, _ in self._workers:
            conn.send(True)
            for name, run in conn.recv().items():
                if name == IDLE_ENGINE:
                    self.idle_runs.append(run)
                else:
                    self.runs[name][count].append(run)
        latest = {name: [runs[-1] for runs in self.runs[name].values()] for name in BASELINES}
        return {name: (min(ttft for ttft, _ in runs), max(rate for _, rate in runs)) for name, runs in latest.items()}

    def close(self) -> None:
        for _, conn, process in self._workers:
            conn.send(False)
            process.join(timeout=30)


LEGS = {"ring": lambda stages: stages, "whole": lambda stages: stages, "push": lambda stages: stages + 1,
        "relay": lambda stages: 2 * stages, "unchecked": lambda stages: stages, "checked": lambda stages: stages}
RINGS = ("ring", "whole")
# A ring through the client's ResilientSession, with its default checks (node.client.verify) or without; a
# checked run's decode rate counts from its first token to the end of its last check, so the checks' cost shows.
RESILIENT = ("unchecked", "checked")


async def swarm_run(client: SwarmClient, head: ClientHead, prompt_ids: list[int], new_tokens: int, mode: str):
    """(time to first token, decode tokens/s) of one greedy generation; `mode` is one of LEGS."""
    params = SamplingParams(max_new_tokens=new_tokens)
    if mode in RESILIENT:
        return await resilient_run(client, prompt_ids, params, checked=mode == "checked")
    t0 = time.perf_counter()
    session = await client.open_session(await client.choose_chain(), max_length=len(prompt_ids) + new_tokens,
                                        relay=mode == "relay", sampling=params if mode in RINGS else None,
                                        share_head=mode == "ring")
    try:
        if mode in RINGS:
            times = [time.perf_counter() async for _ in session.tokens(prompt_ids, 0)]
            assert len(times) == new_tokens
            return times[0] - t0, decode_rate(times)
        start = len(prompt_ids)
        token = sample(await prefill(session, head, prompt_ids, 0), params, start)
        times = [time.perf_counter()]
        for position in range(start, start + new_tokens - 1):
            token = sample(await decode_one_token(session, head, token, position), params, position + 1)
            times.append(time.perf_counter())
    finally:
        await session.close()
    return times[0] - t0, decode_rate(times)


async def resilient_run(client: SwarmClient, prompt_ids: list[int], params: SamplingParams, *, checked: bool):
    session = ResilientSession(client, max_length=len(prompt_ids) + params.max_new_tokens, verify=checked)
    t0 = time.perf_counter()
    try:
        times = [time.perf_counter() async for _ in session.generate(prompt_ids, params)]
        done = time.perf_counter()  # generate returns once every check of the answer is in
    finally:
        await session.close()
    assert len(times) == params.max_new_tokens, "a revision in an honest swarm"
    return times[0] - t0, (len(times) - 1) / (done - times[0])


async def aggregate_rate(client: SwarmClient, head: ClientHead, prompt_ids: list[int], new_tokens: int,
                         sessions: int) -> float:
    """Tokens/s of `sessions` concurrent greedy ring generations on the chain, prefill included."""
    t0 = time.perf_counter()
    await asyncio.gather(*(swarm_run(client, head, prompt_ids, new_tokens, "ring") for _ in range(sessions)))
    return sessions * new_tokens / (time.perf_counter() - t0)


def decode_passes(before: dict, after: dict) -> dict[int, int]:
    """{decode steps in a pass: passes} a node ran between two of its info answers."""
    sizes = {int(k) for k in after["decode_batches"]}
    counts = {k: after["decode_batches"].get(str(k), 0) - before["decode_batches"].get(str(k), 0) for k in sizes}
    return {k: n for k, n in sorted(counts.items()) if n}


_CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
"""
# Speculation's prompts: (a) code and repetitive ones, where prompt lookup drafts well, and (b) chat.
SPEC_PROMPTS = {
    "code": ("a", f"Here is some Python code:\n```python\n{_CODE}```\nRewrite it with comments."),
    "list": ("a", "Repeat the following list exactly, one item per line:\napples, bananas, cherries, dates, "
                  "elderberries, figs, grapes, honeydew melons, kiwis, lemons, mangoes, nectarines"),
    "chat": ("b", "Explain pipeline parallelism in three sentences."),
}


async def speculative_run(client: SwarmClient, prompt_ids: list[int], new_tokens: int, speculate: int,
                          stop_ids: tuple[int, ...]) -> tuple[float, list[int], tuple[int, int]]:
    """(decode tokens/s, the tokens, (draft tokens verified, kept)) of one greedy ring generation. Drafts arrive
    as bursts of tokens, so the rate is the tokens after the first over the time after it, not a median gap."""
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=stop_ids)
    chain = await client.choose_chain()
    before = await client.node_info(chain[-1].node_id)
    session = await client.open_session(chain, max_length=len(prompt_ids) + new_tokens, sampling=params,
                                        speculate=speculate)
    try:
        arrivals = [(time.perf_counter(), token) async for token in session.tokens(prompt_ids, 0)]
    finally:
        await session.close()
    after = await client.node_info(chain[-1].node_id)
    drafts = (after["draft_tokens"] - before["draft_tokens"], after["draft_kept"] - before["draft_kept"])
    times = [t for t, _ in arrivals]
    return (len(times) - 1) / (times[-1] - times[0]), [token for _, token in arrivals], drafts


async def measure_speculation(swarm: LocalSwarm, prompts: dict[str, list[int]], new_tokens: int, runs: int,
                              delay_s: float, speculate: int, stop_ids: tuple[int, ...]) -> dict[str, dict]:
    """Per prompt: the ring's decode rates without and with speculation, run by run interleaved, whether every
    pair of greedy outputs was identical, and the draft tokens verified and kept over all runs."""
    out = {name: {"plain": [], "spec": [], "identical": True, "drafted": 0, "kept": 0, "tokens": 0}
           for name in prompts}
    async with connect(swarm.initial_peers, swarm.source, send_delay_s=delay_s) as client:
        for ids in prompts.values():  # warm-up: connections, and each path once
            for k in (0, speculate):
                await speculative_run(client, ids, 4, k, stop_ids)
        for _ in range(runs):
            for name, ids in prompts.items():
                rate, plain, _ = await speculative_run(client, ids, new_tokens, 0, stop_ids)
                spec_rate, spec, (drafted, kept) = await speculative_run(client, ids, new_tokens, speculate, stop_ids)
                result = out[name]
                result["plain"].append(rate)
                result["spec"].append(spec_rate)
                result["identical"] &= plain == spec
                result["drafted"] += drafted
                result["kept"] += kept
                result["tokens"] = len(plain)
    return out


def print_speculation(results: dict[str, dict], speculate: int, delay_ms: float, drafts: str) -> None:
    print(f"speculative decoding (ring, greedy, drafts of up to {speculate} tokens by {drafts}, {delay_ms:g} ms "
          "per leg; decode tok/s medians)")
    print(f"{'prompt':10} {'kind':>4} {'tokens':>6} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} "
          f"{'accepted':>9} {'identical':>9}")
    speedups: dict[str, list[float]] = {"a": [], "b": []}
    for name, r in results.items():
        kind = SPEC_PROMPTS[name][0]
        plain, spec = statistics.median(r["plain"]), statistics.median(r["spec"])
        speedups[kind].append(spec / plain)
        accepted = r["kept"] / r["drafted"] if r["drafted"] else 0.0
        print(f"{name:10} {kind:>4} {r['tokens']:6d} {plain:12.2f} {spec:11.2f} {spec / plain:7.2f}x "
              f"{accepted:9.0%} {'yes' if r['identical'] else 'NO':>9}")
    for kind, ratios in speedups.items():
        if ratios:
            print(f"{'speculative speedup' if kind == 'a' else 'speculative speedup (b, chat)'} "
                  f"{statistics.geometric_mean(ratios):.2f}")


async def measure_swarm(swarm: LocalSwarm, local: Callable[[], dict[str, tuple[float, float]]], prompt_ids,
                        new_tokens, runs, delay_s: float, concurrency: int, modes: list[str]):
    """{mode: [(ttft, decode tok/s), ...]} for local (single process) and `modes`, interleaved run by run:
    this machine's speed drifts by 15% over minutes, and each run's ratios share one moment."""
    source = swarm.source
    async with connect(swarm.initial_peers, source, send_delay_s=delay_s) as client:
        head = ClientHead(source)
        results: dict[str, list] = {"local": [], **{mode: [] for mode in modes}}
        for mode in modes:
            await swarm_run(client, head, prompt_ids, 4, mode)  # warm-up: connections
        for _ in range(runs):
            results["local"].append(local())  # the nodes sit idle meanwhile
            for mode in modes:
                results[mode].append(await swarm_run(client, head, prompt_ids, new_tokens, mode))
        results["local"].append(local())  # each run's swarm figures sit between two local ones
        rates: dict[int, list[float]] = {1: [], concurrency: []}
        chain = await client.choose_chain()
        before = [await client.node_info(hop.node_id) for hop in chain]
        for _ in range(runs if concurrency > 1 else 0):
            for sessions in rates:
                rates[sessions].append(await aggregate_rate(client, head, prompt_ids, new_tokens, sessions))
        after = [await client.node_info(hop.node_id) for hop in chain]
        return results, rates, [decode_passes(b, a) for b, a in zip(before, after, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per node (default: the cores shared out among the nodes, at least 1)")
    parser.add_argument("--local-threads", type=int, nargs="+", default=sorted({1, cores}),
                        help="thread counts of single-process generation; each run's baseline is the fastest")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="emulated one-way delay of every leg")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent sessions for the aggregate rate")
    parser.add_argument("--no-direct-links", action="store_true", help="stages push over libp2p only")
    parser.add_argument("--replicas", type=int, default=1,
                        help="nodes per layer range (checks need a second node holding the layers)")
    parser.add_argument("--modes", nargs="+", choices=sorted(LEGS), default=["ring", "whole", "push", "relay"],
                        help="ways through the chain to measure (fewer: more runs in the same time)")
    parser.add_argument("--speculate", type=int, default=8,
                        help="also compare the ring with and without speculation, drafts of up to this many tokens "
                             "(0: skip)")
    parser.add_argument("--speculation-only", action="store_true", help="skip the table above")
    parser.add_argument("--draft-model", default=None,
                        help="the first stage drafts with this model (node --draft-model) instead of prompt lookup")
    parser.add_argument("--draft-quant", default="none", help="how the draft model is held (node --draft-quant)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, cores // args.nodes)
    torch.set_num_threads(args.threads)
    delay_s = args.delay_ms / 1000
    node_args = ["--emulate-delay-ms", str(args.delay_ms)] if args.delay_ms else []
    node_args += ["--no-direct-links"] if args.no_direct_links else []
    node_args += ["--draft-model", args.draft_model, "--draft-quant", args.draft_quant] if args.draft_model else []
    drafts = f"draft model {args.draft_model} ({args.draft_quant})" if args.draft_model else "prompt lookup"

    ranges = [r for r in even_split(resolve_model(args.model).num_layers, args.nodes) for _ in range(args.replicas)]
    with LocalSwarm(args.model, ranges, threads_per_node=args.threads, node_args=node_args) as swarm:
        source = swarm.source
        tokenizer = load_tokenizer(source)
        prompt_ids = chat_template_ids(tokenizer, [Message("user", "Explain pipeline parallelism in three sentences.")])
        spec_prompts = {name: chat_template_ids(tokenizer, [Message("user", text)])
                        for name, (_, text) in SPEC_PROMPTS.items()}
        speculation = asyncio.run(measure_speculation(
            swarm, spec_prompts, args.new_tokens, args.runs, delay_s, args.speculate, (tokenizer.eos_token_id,),
        )) if args.speculate else None
        if args.speculation_only:
            print_speculation(speculation, args.speculate, args.delay_ms, drafts)
            return
        idle_legs = (args.threads, args.nodes, delay_s) if delay_s and args.threads in args.local_threads else None
        local = LocalBaseline(str(source.root), args.local_threads, prompt_ids, args.new_tokens, idle_legs)
        try:
            swarm_results, rates, passes = asyncio.run(measure_swarm(
                swarm, local, prompt_ids, args.new_tokens, args.runs, delay_s, args.concurrency, args.modes))
        finally:
            local.close()
    local_results = swarm_results.pop("local")
    baselines = {name: [run[name] for run in local_results] for name in BASELINES}

    def med(results, index):
        return statistics.median(r[index] for r in results)

    def against(mode: str, baseline: str) -> list[float]:
        """Each run's decode rate against the baseline's runs just before and just after it (their geometric
        mean): the machine's speed drifts within minutes, and bracketing cancels a steady drift."""
        runs = baselines[baseline]
        return [run[1] / math.sqrt(before[1] * after[1])
                for run, before, after in zip(swarm_results[mode], runs[:-1], runs[1:], strict=True)]

    # The chain's compute: the engine at the nodes' thread count (one that gets more cores than a node is
    # not this chain's compute), or its best where that count was not measured.
    engine_runs = local.runs["engine"].get(args.threads) or baselines["engine"]
    engine_decode = med(engine_runs, 1)
    legs = {mode: count(args.nodes) for mode, count in LEGS.items()}
    print(f"model {source.name}, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, "
          f"{args.runs} runs (medians), {args.threads} torch threads per node, {args.delay_ms:g} ms per leg, "
          f"pushes over {'libp2p' if args.no_direct_links else 'direct links'}")
    print(f"{'':34} {'TTFT ms':>9} {'decode tok/s':>13} {'ms/token':>9} {'limit ms':>9} {'vs limit':>9}")
    for name, label in (("transformers", "single process, transformers"), ("engine", "single process, node's Stage")):
        for count, runs in local.runs[name].items():
            print(f"{label + f' {count}t':34} {med(runs, 0) * 1000:9.1f} {med(runs, 1):13.2f} "
                  f"{1000 / med(runs, 1):9.1f}")
        print(f"{label + ' best':34} {med(baselines[name], 0) * 1000:9.1f} {med(baselines[name], 1):13.2f} "
              f"{1000 / med(baselines[name], 1):9.1f}")
    if local.idle_runs:
        idle_ms = 1000 / med(local.idle_runs, 1)
        limit_ms = 1000 / engine_decode + legs["ring"] * args.delay_ms
        print(f"{'single process, ' + IDLE_ENGINE:34} {med(local.idle_runs, 0) * 1000:9.1f} "
              f"{med(local.idle_runs, 1):13.2f} {idle_ms:9.1f} {limit_ms:9.1f} {idle_ms / limit_ms:8.2f}x")
    for name, results in swarm_results.items():
        ttft, decode = med(results, 0), med(results, 1)
        limit_ms = 1000 / engine_decode + legs[name] * args.delay_ms  # the chain's compute + one-way legs
        print(f"{args.nodes}-node swarm, {name:5} ({legs[name]} legs)     {ttft * 1000:9.1f} {decode:13.2f} "
              f"{1000 / decode:9.1f} {limit_ms:9.1f} {1000 / decode / limit_ms:8.2f}x")
    if local.idle_runs and "ring" in swarm_results:
        print(f"ring against the engine idling its legs: {1000 / med(swarm_results['ring'], 1) / idle_ms:.2f}x "
              "(what the ring's messages cost; the engine idling its legs against compute + legs is what idling "
              "costs)")
    first = args.modes[0]
    for baseline in BASELINES:
        runs = ", ".join(f"{ratio:.2f}" for ratio in against(first, baseline))
        ratios = ", ".join(f"{mode} {statistics.median(against(mode, baseline)):.2f}x"
                           + (f" (runs {runs})" if mode == first else "") for mode in args.modes)
        ttft = med(swarm_results[first], 0) / med(baselines[baseline], 0)
        print(f"decode against single-process {baseline} (median of runs, each against the runs around it): "
              f"{ratios}; {first} TTFT {ttft:.2f}x")
    decode = {mode: med(results, 1) for mode, results in swarm_results.items()}
    print("; ".join(f"{a}/{b} decode {decode[a] / decode[b]:.2f}x" for a, b in itertools.pairwise(args.modes)))
    if args.concurrency > 1:
        one, many = statistics.median(rates[1]), statistics.median(rates[args.concurrency])
        print(f"aggregate tok/s (prefill included, ring): 1 session {one:.2f}, {args.concurrency} sessions "
              f"{many:.2f}, ratio {many / one:.2f}x")
        for index, counts in enumerate(passes):  # how well the stages batched the concurrent sessions
            steps = sum(size * n for size, n in counts.items())
            print(f"  stage {index}: {steps} decode steps in {sum(counts.values())} passes "
                  f"(mean {steps / max(1, sum(counts.values())):.1f} per pass; by size {counts})")
    if speculation:
        print_speculation(speculation, args.speculate, args.delay_ms, drafts)


if __name__ == "__main__":
    main()
