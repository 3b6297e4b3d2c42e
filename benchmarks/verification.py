"""Checks of volunteers' work (node.client.verify, docs/trust.md): tolerances, false positives, adversaries.

1. Tolerance: in-process, one stage run as a server would (prefill, then decode steps batched with other
   sessions) against a verifier's replay (one prefill, then the step); the relative error per token, max over
   tokens, in fp32, fp16 and bf16. Honest errors above `node.client.verify.TOLERANCES` would be false positives.
1b. Quantized layers: the same, the server and the verifier each holding their layers as none (fp32), int8 or
   int4 (`node.model.quant`), on each of SmolLM2's three 10-layer stages, fed the hidden states real text
   has there (random ones would say nothing of the outliers real activations carry); against
   `node.client.verify.QUANT_TOLERANCES`. Also on SmolLM2 moved off its 4-bit grid (benchmarks/quant.py
   --off-grid), since the embedded SmolLM2's own weights are those of a Q4_1 file, which int4 reproduces.
2. Honest swarm, two fp32 and one bf16 replica of each half: ring generations with every step checked (p = 1)
   until `--honest-steps` checks ran; how many flagged an honest node, and how many honest nodes ended banned.
   (`--honest-steps 0` skips it.)
3. Adversaries (node.serve.adversary), in their own swarm whose honest replicas are all fp32 (three of each half,
   so every check has a tie-breaker, and the honest answer is one answer whichever replicas a rebuilt chain
   lands on), each in its own ring generations at the DEFAULT check rate, the client routed through the
   adversary (the other adversaries kept out): per run, whether and at which token it was caught with evidence
   (see `caught_at`: outvoted by two other nodes, convicted by its own signatures, or, a blame-shifter, avoided
   for its accusation), how many tokens the user had been shown before the answer was revised, whether the final
   answer equals the honest one, and whether an honest node ended banned as a proven liar. A table at the end.

Usage: python benchmarks/verification.py [--runs 50] [--tokens 32] [--honest-steps 10000] [--json out.json]
       python benchmarks/verification.py --tolerances-only   (parts 1 and 1b, no swarm; --quant-only: 1b)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quant import off_grid_checkpoint  # noqa: E402
from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.failover import ResilientSession, Revision  # noqa: E402
from node.client.session import NoChainError, SwarmClient  # noqa: E402
from node.client.verify import (  # noqa: E402
    DEFAULT_PROBABILITY,
    PROVEN_BAN_S,
    TOLERANCES,
    Auditor,
    relative_error,
    tolerance_for,
)
from node.model.checkpoint import load_tokenizer, resolve_model  # noqa: E402
from node.model.head import Embedder  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.model.stage import Stage, StepInput  # noqa: E402
from node.net.membership import open_dht  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LIAR_SCALES = (1.0, 0.1, 0.01, 1e-3, 3e-4)  # x the output's RMS; fp32's tolerance is 1e-4 (relative, per token)


@dataclass(frozen=True)
class Adversary:
    name: str
    nodes: tuple[tuple[tuple[int, int], str, float], ...]  # (layers as halves 0/1, kind, scale) per hostile node


def adversaries() -> list[Adversary]:
    liars = [Adversary(f"liar x{scale:g}", (((0, 1), "liar", scale),)) for scale in LIAR_SCALES]
    return [*liars,
            Adversary("liar at the ring's end x0.01", (((1, 2), "liar", 0.01),)),
            Adversary("equivocator x0.01", (((0, 1), "equivocator", 0.01),)),
            Adversary("liar when unaudited x0.01", (((0, 1), "sly", 0.01),)),
            Adversary("liar 1 step in 50 x0.1", (((0, 1), "rare", 0.1),)),
            Adversary("blame-shifter", (((0, 1), "blamer", 0.01),)),
            Adversary("token sampler at the ring's end", (((1, 2), "missampler", 0.01),)),
            Adversary("token forker at the ring's end", (((1, 2), "forker", 0.01),)),
            Adversary("two colluding adjacent liars x0.01", (((0, 1), "liar", 0.01), ((1, 2), "liar", 0.01)))]


def honest_errors(source, start: int, end: int, dtype: torch.dtype, *, prompt: int = 32, decode: int = 32,
                  others: int = 3, every: int = 2, seed: int = 0, quants: tuple[str, str] = ("none", "none"),
                  inputs: torch.Tensor | None = None) -> list[float]:
    """Relative errors between a served run (layers held at quants[0]) and a verifier's replay of the same stage
    steps (at quants[1]), on `inputs` [1, prompt + decode, hidden] (default random) among random neighbours."""
    stage = Stage(source, start, end, dtype=dtype, device=torch.device("cpu"), quant=quants[0])
    verifier = stage if quants[1] == quants[0] else Stage(source, start, end, dtype=dtype,
                                                          device=torch.device("cpu"), quant=quants[1])
    gen = torch.Generator().manual_seed(seed)
    hidden = stage.shape.hidden_size

    def noise(tokens: int) -> torch.Tensor:
        return torch.randn(1, tokens, hidden, generator=gen).to(dtype)

    inputs = noise(prompt + decode) if inputs is None else inputs.to(dtype)
    cache = stage.new_cache(prompt + decode)
    neighbours = [stage.new_cache(prompt + decode) for _ in range(others)]
    for neighbour in neighbours:  # concurrent sessions whose decode steps share our passes
        stage.forward(noise(prompt), 0, neighbour)
    served = {0: stage.forward(inputs[:, :prompt], 0, cache)}
    for position in range(prompt, prompt + decode):
        batch = [StepInput(inputs[:, position:position + 1], position, cache)]
        batch += [StepInput(noise(1), position, neighbour) for neighbour in neighbours]
        served[position] = stage.forward_batch(batch)[0]
    errors = []
    for position in [0, *range(prompt, prompt + decode, every)]:
        end_position = prompt if position == 0 else position + 1
        replay = verifier.new_cache(end_position)
        if position:
            verifier.forward(inputs[:, :position], 0, replay)
        errors.append(relative_error(served[position], verifier.forward(inputs[:, position:end_position], position,
                                                                        replay)))
    return errors


QUANT_PAIRS = [("int8", "int8"), ("int4", "int4"), ("int8", "none"), ("none", "int8"), ("int4", "none"),
               ("none", "int4"), ("int4", "int8"), ("int8", "int4")]  # (server, verifier)
STUDY_TEXT = ("The hive keeps its layers on many machines. Each volunteer lends a GPU or a laptop, and the swarm "
              "routes every token through a chain of them, checking now and then that nobody lies about the work.")


def real_inputs(source, start: int, tokens: int) -> torch.Tensor:
    """The hidden states text has on entering layer `start`: its tokens embedded and run through layers
    0..start in fp32 (the model's own activations, outliers included)."""
    ids = load_tokenizer(source)(STUDY_TEXT)["input_ids"]
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    hidden = Embedder(source).embed(torch.tensor([ids]))
    if start == 0:
        return hidden
    before = Stage(source, 0, start, dtype=torch.float32, device=torch.device("cpu"), with_ends=False)
    return before.forward(hidden, 0, before.new_cache(tokens))


def quant_study(source, prompt: int = 32, decode: int = 32, pairs: list[tuple[str, str]] = QUANT_PAIRS) -> dict:
    """Honest server-vs-verifier errors for every pair of quantizations, on each 10-layer stage, max over them."""
    study: dict = {}
    for start in range(0, source.num_layers, 10):
        end = min(start + 10, source.num_layers)
        inputs = real_inputs(source, start, prompt + decode)
        for served, verifier in pairs:
            errors = honest_errors(source, start, end, torch.float32, prompt=prompt, decode=decode, every=4,
                                   quants=(served, verifier), inputs=inputs)
            key = f"{served} vs {verifier}"
            tolerance = tolerance_for(torch.float32, quants=(served, verifier))
            entry = study.setdefault(key, {"samples": 0, "max": 0.0, "medians": [], "above_tolerance": 0,
                                           "tolerance": tolerance})
            entry["samples"] += len(errors)
            entry["max"] = max(entry["max"], max(errors))
            entry["medians"].append(statistics.median(errors))
            entry["above_tolerance"] += sum(e > tolerance for e in errors)
            print(f"quant {key}, layers {start}:{end}: max {max(errors):.2e} median {statistics.median(errors):.2e}",
                  flush=True)
    return study


class PreferringClient(SwarmClient):
    """Routes through the peers in `prefer` whenever they are not banned (to meet the adversary every run)."""

    prefer: dict[str, tuple[int, int]] = {}

    async def choose_chain(self, **kwargs):
        chain = await super().choose_chain(**kwargs)
        banned = self.banned
        return [next((type(hop)(peer, hop.start, hop.end) for peer, layers in self.prefer.items()
                      if layers == (hop.start, hop.end) and peer not in banned), hop) for hop in chain]


async def ring(client: SwarmClient, prompt_ids: list[int], tokens: int, auditor: Auditor | None, attempts: int = 12
               ) -> tuple[list[int], int | None, ResilientSession]:
    """(final tokens, tokens shown before the first revision or None, the session) of one greedy ring. On this
    loaded machine a DHT read now and then comes back empty (NoChainError at the first attempt; once for 6 s in a
    row, which ended a series): such a generation is started again, up to `attempts` times 5 s apart, and counted
    in NO_CHAIN_RETRIES."""
    for attempt in range(attempts):
        try:
            return await _ring_once(client, prompt_ids, tokens, auditor)
        except NoChainError:
            NO_CHAIN_RETRIES.append(1)
            if attempt + 1 == attempts:
                raise
            await asyncio.sleep(5.0)
    raise AssertionError("unreachable")


NO_CHAIN_RETRIES: list[int] = []


async def _ring_once(client: SwarmClient, prompt_ids: list[int], tokens: int, auditor: Auditor | None
                     ) -> tuple[list[int], int | None, ResilientSession]:
    session = ResilientSession(client, max_length=len(prompt_ids) + tokens, step_timeout_s=30, auditor=auditor,
                               verify=auditor is not None)
    out, shown, revised_after = [], 0, None
    try:
        async for item in session.generate(prompt_ids, SamplingParams(max_new_tokens=tokens)):
            if isinstance(item, Revision):
                revised_after = shown if revised_after is None else revised_after
                del out[item.keep:]
            else:
                out.append(item)
                shown += 1
    finally:
        await session.close()
    return out, revised_after, session


def caught_at(adversary: Adversary, hostile_peers: set[str], auditor: Auditor, session: ResilientSession
              ) -> int | None:
    """The position of the step at which this run had caught every one of the adversary's nodes with evidence
    (the latest of their catches), or None if one was not. Evidence, per node: a check in which two other nodes
    outvoted it (verdict "liar" against it, or "verifier_lied" when it was the verifier), or its own two signatures
    on one step (an "equivocated" failover naming it); for a blame-shifter, whose lie is an accusation rather than a
    computation, its accusation (a failover it reported against another stage), for which it is avoided and its
    victim is not banned. Avoidance without evidence (an unresolved dispute, an unattributed equivocation) is not a
    catch."""
    found: dict[str, int] = {}

    def note(peer: str | None, position: int) -> None:
        if peer in hostile_peers:
            found[peer] = min(found.get(peer, position), position)

    for report in auditor.reports:
        at = report.position if report.found_at is None else report.found_at  # (the check's step, not the lie's)
        if report.verdict == "liar":
            note(report.peer, at)
        elif report.verdict == "verifier_lied":
            note(report.verifier, at)
    for event in session.events:
        if event.code == "equivocated":
            note(event.peer, event.position)
        elif any(kind == "blamer" for _, kind, _ in adversary.nodes) and event.reporter not in (None, event.peer):
            note(event.reporter, event.position)
    return max(found.values()) if found.keys() == hostile_peers else None


def token_number(position: int, prompt_length: int) -> int:
    """Which generated token (1-based) the step at `position` produced: the prompt's step the first."""
    return 1 if position < prompt_length else position - prompt_length + 2


def long_bans(client: SwarmClient) -> set[str]:
    now = time.monotonic()
    return {peer for peer, until in client._banned_until.items() if until - now > PROVEN_BAN_S / 2}


async def wait_for_nodes(client: SwarmClient, count: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len({r.peer_id for r in await client.servers() if r.state == "online"}) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the swarm's nodes did not all come online")
        await asyncio.sleep(1.0)


PROMPT_IDS = [random.Random(7).randrange(5, 250) for _ in range(24)]


class Clients:
    """Clients of one local swarm on one DHT peer; a client for an adversary routes through its nodes and keeps
    every other adversary's nodes out."""

    def __init__(self, swarm: LocalSwarm, hostile: dict[int, tuple[str, tuple[int, int]]]) -> None:
        self.source, self.hostile = swarm.source, {swarm.peer_id(i): entry for i, entry in hostile.items()}
        self.peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)

    def __call__(self, name: str | None) -> PreferringClient:
        client = PreferringClient(self.peer, self.source)
        client.prefer = {peer: layers for peer, (other, layers) in self.hostile.items() if other == name}
        for peer, (other, _) in self.hostile.items():
            if other != name:
                client.ban(peer, for_s=1e6)
        return client


async def adversary_figures(swarm: LocalSwarm, honest: list[int], hostile: dict[int, tuple[str, tuple[int, int]]],
                            chosen: list[Adversary], args, figures: dict, progress: Callable[[], None]) -> None:
    """Part 3 in a swarm of fp32 honest replicas (the honest answer is one answer whichever replicas a rebuilt
    chain lands on), into `figures` by adversary (`progress` after each); `hostile`: node index -> (adversary
    name, layers)."""
    honest_peers = {swarm.peer_id(i) for i in honest}
    clients = Clients(swarm, hostile)
    try:
        await wait_for_nodes(clients(None), len(honest) + len(hostile))
        reference, _, _ = await ring(clients(None), PROMPT_IDS, args.tokens, None)

        async def run_once(name: str, run: int):
            client = clients(name)
            auditor = Auditor(client, DEFAULT_PROBABILITY, rng=random.Random(1000 + run))
            try:
                return client, auditor, *(await ring(client, PROMPT_IDS, args.tokens, auditor))
            except NoChainError as e:  # the DHT showed no chain for minutes: counted, not the end of the series
                print(f"  {name} run {run}: no chain ({e})", flush=True)
                return client, auditor, None, None, None

        for adversary in chosen:
            rows = []
            for first in range(0, args.runs, args.concurrency):  # runs at once: each waits on the network mostly
                batch = range(first, min(args.runs, first + args.concurrency))
                for run, (client, auditor, out, revised, session) in zip(
                        batch, await asyncio.gather(*(run_once(adversary.name, run) for run in batch)), strict=True):
                    hostile_peers = set(client.prefer)
                    if session is None:
                        rows.append({"no_chain": True})
                        continue
                    at = caught_at(adversary, hostile_peers, auditor, session)
                    row = {"caught_token": None if at is None else token_number(at, len(PROMPT_IDS)),
                           "revised_after": revised, "equal": out == reference,
                           "honest_banned": bool(long_bans(client) & honest_peers),
                           "proven": hostile_peers <= long_bans(client), "published": len(auditor.published),
                           "checks_of_it": sum(r.peer in hostile_peers for r in auditor.reports),
                           "unchecked": sum(r.verdict == "unchecked" for r in auditor.reports)
                           + session.unfinished_checks}
                    print(f"  {adversary.name} run {run}: {row}", flush=True)
                    rows.append(row)
            figures[adversary.name] = summarize(rows, args.tokens)
            print(adversary.name, figures[adversary.name], flush=True)
            progress()  # so far, in case the run is cut short
    finally:
        clients.peer.shutdown()


def summarize(rows: list[dict], tokens: int) -> dict:
    """The figures of an adversary's runs; a run that found no chain counts as not caught and not equal."""
    runs, failed = len(rows), sum(r.get("no_chain", False) for r in rows)
    rows = [r for r in rows if not r.get("no_chain")]
    caught = [r["caught_token"] for r in rows if r["caught_token"] is not None]
    revised = [r["revised_after"] for r in rows if r["revised_after"] is not None]
    return {
        "runs": runs, "tokens": tokens, "caught": len(caught) / runs,
        "caught_within_32_tokens": sum(t <= 32 for t in caught) / runs,
        "tokens_to_detection_median": statistics.median(caught) if caught else None,
        "tokens_to_detection_max": max(caught) if caught else None,
        "proven_banned": sum(r["proven"] for r in rows) / runs,
        "runs_publishing_a_proof": sum(r["published"] > 0 for r in rows),
        "revised_runs": len(revised),
        "tokens_shown_before_revision_median": statistics.median(revised) if revised else None,
        "tokens_shown_before_revision_max": max(revised) if revised else None,
        "final_equals_honest": sum(r["equal"] for r in rows) / runs,
        "runs_with_an_honest_node_banned": sum(r["honest_banned"] for r in rows),
        "checks_that_could_not_run_or_finish": sum(r["unchecked"] for r in rows),
        "generations_restarted_for_an_empty_dht_read": len(NO_CHAIN_RETRIES), "runs_that_found_no_chain": failed,
    }


async def honest_figures(swarm: LocalSwarm, honest: list[int], args) -> dict:
    """Part 2 in a swarm of fp32 and bf16 honest replicas, every step checked: how many checks flagged an honest
    node, and how many honest nodes ended banned. (Answers differ from the first one now and then: a chain with a
    bf16 stage picks another greedy token at a near tie; that is honest work in another dtype, not a lie.)"""
    honest_peers = {swarm.peer_id(i) for i in honest}
    clients = Clients(swarm, {})
    started, checks, flagged, banned, runs, other_answers, unfinished = time.perf_counter(), 0, 0, set(), 0, 0, 0
    try:
        await wait_for_nodes(clients(None), len(honest))
        first_answer, _, _ = await ring(clients(None), PROMPT_IDS, args.tokens, None)

        async def run_once(run: int):
            client = clients(None)
            auditor = Auditor(client, 1.0, rng=random.Random(run))
            out, _, session = await ring(client, PROMPT_IDS, args.tokens, auditor)
            return client, auditor, out, session

        while checks < args.honest_steps:
            batch = range(runs, runs + args.concurrency)
            for client, auditor, out, session in await asyncio.gather(*(run_once(run) for run in batch)):
                done = [r for r in auditor.reports if r.verdict != "unchecked"]
                unfinished += len(auditor.reports) - len(done) + session.unfinished_checks
                checks += len(done)
                flagged += sum(r.verdict != "honest" for r in done)
                banned |= long_bans(client) & honest_peers
                other_answers += out != first_answer
            runs += len(batch)
            print(f"  honest: {runs} runs, {checks} checks, {flagged} flagged", flush=True)
    finally:
        clients.peer.shutdown()
    figures = {"runs": runs, "checked_steps": checks, "flagged": flagged, "honest_nodes_banned": len(banned),
               "answers_unlike_the_first": other_answers, "checks_that_could_not_run_or_finish": unfinished,
               "seconds": round(time.perf_counter() - started)}
    print("honest swarm (fp32 + bf16 nodes):", figures, flush=True)
    return figures


COLUMNS = (("runs", "runs", "{}"), ("caught %", "caught", "{:.0%}"),
           ("<=32 tok %", "caught_within_32_tokens", "{:.0%}"),
           ("tok to detect med", "tokens_to_detection_median", "{}"), ("max", "tokens_to_detection_max", "{}"),
           ("shown before revision med", "tokens_shown_before_revision_median", "{}"),
           ("max", "tokens_shown_before_revision_max", "{}"), ("final == honest %", "final_equals_honest", "{:.0%}"),
           ("proven %", "proven_banned", "{:.0%}"), ("honest banned", "runs_with_an_honest_node_banned", "{}"),
           ("checks cut", "checks_that_could_not_run_or_finish", "{}"))


def table(figures: dict) -> str:
    """The adversaries' figures as a markdown table."""
    lines = ["| adversary | " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in figures.items():
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance-model", default="SmolLM2-135M-Instruct", help="model for the dtype study")
    parser.add_argument("--skip-tolerance", action="store_true")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--honest-steps", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=5, help="generations run at once")
    parser.add_argument("--only", nargs="*", default=None, help="adversaries to run (names start with these)")
    parser.add_argument("--swarm-each", action="store_true",
                        help="each adversary in its own swarm (fewer idle nodes: faster on a small, loaded machine)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tolerances-only", action="store_true", help="the dtype and quantization studies only")
    parser.add_argument("--quant-only", action="store_true", help="the quantization study only (1b)")
    parser.add_argument("--quant-pairs", nargs="*", default=None, metavar="SERVER:VERIFIER",
                        help="quantization pairs of the study (default all of QUANT_PAIRS)")
    parser.add_argument("--quant-models", nargs="*", default=["model", "off_grid"], choices=["model", "off_grid"])
    args = parser.parse_args()

    results: dict = {"tolerances": {k: TOLERANCES[v] for k, v in DTYPES.items()}, "honest_error": {}}
    if not args.skip_tolerance:
        study = resolve_model(args.tolerance_model)
        for name, dtype in DTYPES.items() if not args.quant_only else ():
            errors = honest_errors(study, 0, min(10, study.num_layers), dtype)
            results["honest_error"][name] = {
                "samples": len(errors), "max": max(errors), "median": statistics.median(errors),
                "above_tolerance": sum(e > TOLERANCES[dtype] for e in errors),
            }
            print(f"honest error {name}:", results["honest_error"][name], flush=True)
        pairs = [tuple(pair.split(":")) for pair in args.quant_pairs] if args.quant_pairs else QUANT_PAIRS
        models = {"model": lambda: study, "off_grid": lambda: resolve_model(str(off_grid_checkpoint(
            study, Path(tempfile.mkdtemp(prefix="off-grid-")))))}
        results["quant_honest_error"] = {name: quant_study(models[name](), pairs=pairs)
                                         for name in args.quant_models}
        print(json.dumps(results["quant_honest_error"], indent=2), flush=True)
    if args.tolerances_only or args.quant_only:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return

    from tests.conftest import build_tiny_checkpoint

    path = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="verify-tiny-")), "llama", 6))
    halves = [(0, 3), (3, 6)]
    chosen = adversaries() if args.only is None else [  # in the order asked
        a for prefix in args.only for a in adversaries() if a.name.startswith(prefix)]
    results["adversaries"] = {}
    for group in ([[a] for a in chosen] if args.swarm_each else [chosen] if chosen else []):
        # Three fp32 honest replicas of each half (every check has a tie-breaker), then the group's adversaries.
        ranges, per_node = [half for half in halves for _ in range(3)], {}
        honest, hostile = list(range(len(ranges))), {}
        for adversary in group:
            for (first, last), kind, scale in adversary.nodes:
                layers = (halves[first][0], halves[last - 1][1])
                per_node[len(ranges)] = ["--dtype", "float32", "--test-perturb", str(scale), "--test-adversary", kind]
                hostile[len(ranges)] = (adversary.name, layers)
                ranges.append(layers)
        with LocalSwarm(path, ranges, threads_per_node=1, per_node_args=per_node) as swarm:
            asyncio.run(adversary_figures(swarm, honest, hostile, group, args, results["adversaries"],
                                          lambda: save(results, args.json)))
    if args.honest_steps > 0:  # two fp32 and one bf16 replica of each half
        dtypes = ("float32", "float32", "bfloat16")
        ranges = [half for half in halves for _ in dtypes]
        per_node = {i: ["--dtype", dtypes[i % len(dtypes)]] for i in range(len(ranges))}
        with LocalSwarm(path, ranges, threads_per_node=1, per_node_args=per_node) as swarm:
            results["honest"] = asyncio.run(honest_figures(swarm, list(range(len(ranges))), args))
        save(results, args.json)
    print(json.dumps(results, indent=2))
    if results.get("adversaries"):
        print(table(results["adversaries"]))


def save(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
