"""Checks of volunteers' work (node.client.verify, docs/trust.md): tolerances, false positives, adversaries.

1. Tolerance: in-process, one stage run as a server would (prefill, then decode steps batched with other
   sessions) against a verifier's replay (one prefill, then the step); the relative error per token, max over
   tokens, in fp32, fp16 and bf16. Honest errors above `node.client.verify.TOLERANCES` would be false positives.
1b. Quantized layers: the same, the server and the verifier each holding their layers as none (fp32), int8 or
   int4 (`node.model.quant`), on each of SmolLM2's three 10-layer stages, fed the hidden states real text
   has there (random ones would say nothing of the outliers real activations carry); against
   `node.client.verify.QUANT_TOLERANCES`. Also on SmolLM2 moved off its 4-bit grid (benchmarks/quant.py
   --off-grid), since the embedded SmolLM2's own weights are those of a Q4_1 file, which int4 reproduces.
2. Honest swarm, fp32 and bf16 nodes mixed: ring generations with every step checked (p = 1) until
   `--honest-steps` checks ran; how many flagged an honest node, and how many honest nodes ended banned.
3. Adversaries (node.serve.adversary), each in its own ring generations at the DEFAULT check rate, the client
   routed through the adversary (the other adversaries kept out): per run, whether it was caught (banned or
   avoided by the client), how many tokens the user had been shown before the answer was revised, and whether
   the final answer equals the honest one; and no honest node may end banned as a proven liar.

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


async def ring(client: SwarmClient, prompt_ids: list[int], tokens: int, auditor: Auditor | None, attempts: int = 3
               ) -> tuple[list[int], int | None, ResilientSession]:
    """(final tokens, tokens shown before the first revision or None, the session) of one greedy ring. On this
    loaded machine a DHT read now and then comes back empty (NoChainError at the first attempt): such a
    generation is started again, up to `attempts` times, and counted in NO_CHAIN_RETRIES."""
    for attempt in range(attempts):
        try:
            return await _ring_once(client, prompt_ids, tokens, auditor)
        except NoChainError:
            NO_CHAIN_RETRIES.append(1)
            if attempt + 1 == attempts:
                raise
            await asyncio.sleep(2.0)
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


def first_caught_step(auditor: Auditor, session: ResilientSession) -> int | None:
    """The position of the first step at which a lie or equivocation was found (a check's step, or the step
    whose receipts disagreed); the tokens made through lies before it were already shown."""
    found = [r.position for r in auditor.reports if r.verdict in ("liar", "unresolved")]
    found += [e.position for e in session.events if e.code in ("equivocation", "equivocated", "push_failed")]
    return min(found, default=None)


def long_bans(client: SwarmClient) -> set[str]:
    now = time.monotonic()
    return {peer for peer, until in client._banned_until.items() if until - now > PROVEN_BAN_S / 2}


async def wait_for_nodes(client: SwarmClient, count: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len({r.peer_id for r in await client.servers() if r.state == "online"}) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the swarm's nodes did not all come online")
        await asyncio.sleep(1.0)


async def swarm_figures(swarm: LocalSwarm, honest: list[int], hostile: dict[int, tuple[str, tuple[int, int]]],
                        chosen: list[Adversary], args) -> dict:
    """`hostile`: node index -> (adversary name, layers)."""
    source = swarm.source
    peers = {index: swarm.peer_id(index) for index in (*honest, *hostile)}
    honest_peers = {peers[i] for i in honest}
    rng = random.Random(7)
    prompt_ids = [rng.randrange(5, 250) for _ in range(24)]
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    figures: dict = {"honest": {}, "adversaries": {}}

    def client_for(name: str | None, seed: int) -> PreferringClient:
        client = PreferringClient(peer, source)
        client.prefer = {peers[i]: layers for i, (n, layers) in hostile.items() if n == name}
        for index, (other, _) in hostile.items():
            if other != name:
                client.ban(peers[index], for_s=1e6)
        return client

    try:
        await wait_for_nodes(client_for(None, 0), len(peers))
        reference, _, _ = await ring(client_for(None, 0), prompt_ids, args.tokens, None)
        async def adversary_run(name: str, run: int):
            client = client_for(name, run)
            auditor = Auditor(client, DEFAULT_PROBABILITY, rng=random.Random(1000 + run))
            return client, auditor, *(await ring(client, prompt_ids, args.tokens, auditor))

        for adversary in chosen:
            caught, revised_after, equal, wrong_bans, caught_at = 0, [], 0, 0, []
            results = []
            for first in range(0, args.runs, args.concurrency):  # runs at once: each waits on the network mostly
                batch = range(first, min(args.runs, first + args.concurrency))
                done = await asyncio.gather(*(adversary_run(adversary.name, run) for run in batch))
                for run, (client, auditor, out, revised, session) in zip(batch, done, strict=True):
                    print(f"  {adversary.name} run {run}: caught {bool(set(client.prefer) & client.banned)}, lie "
                          f"found at step {first_caught_step(auditor, session)} (prompt {len(prompt_ids)}), tokens "
                          f"shown before revision {revised}, final equals honest {out == reference}", flush=True)
                results += done
            for client, auditor, out, revised, session in results:
                hostile_peers = set(client.prefer)
                caught += bool(hostile_peers & client.banned)
                if revised is not None:
                    revised_after.append(revised)
                if (first := first_caught_step(auditor, session)) is not None:
                    caught_at.append(max(0, first - len(prompt_ids) + 1))
                equal += out == reference
                wrong_bans += bool(long_bans(client) & honest_peers)
            figures["adversaries"][adversary.name] = {
                "runs": args.runs, "tokens": args.tokens, "caught": caught / args.runs,
                "revised_runs": len(revised_after),
                "caught_at_token_median": statistics.median(caught_at) if caught_at else None,
                "caught_at_token_max": max(caught_at) if caught_at else None,
                "caught_within_32_tokens": sum(t <= 32 for t in caught_at) / args.runs,
                "tokens_shown_before_revision_median": statistics.median(revised_after) if revised_after else None,
                "tokens_shown_before_revision_max": max(revised_after) if revised_after else None,
                "final_equals_honest": equal / args.runs, "runs_with_an_honest_node_banned": wrong_bans,
                "generations_restarted_for_an_empty_dht_read": len(NO_CHAIN_RETRIES),
            }
            print(adversary.name, figures["adversaries"][adversary.name], flush=True)
            if args.json:  # so far, in case the run is cut short
                Path(args.json).write_text(json.dumps(figures, indent=2))
        # Honest swarm, fp32 and bf16 mixed, every step checked.
        started, checks, flagged, banned, runs, wrong = time.perf_counter(), 0, 0, set(), 0, 0

        async def honest_run(run: int):
            client = client_for(None, run)
            auditor = Auditor(client, 1.0, rng=random.Random(run))
            out, _, _ = await ring(client, prompt_ids, args.tokens, auditor)
            return client, auditor, out

        while checks < args.honest_steps:
            batch = range(runs, runs + args.concurrency)
            for client, auditor, out in await asyncio.gather(*(honest_run(run) for run in batch)):
                done = [r for r in auditor.reports if r.verdict != "unchecked"]
                checks += len(done)
                flagged += sum(r.verdict != "honest" for r in done)
                banned |= long_bans(client) & honest_peers
                wrong += out != reference
            runs += len(batch)
            print(f"  honest: {runs} runs, {checks} checks, {flagged} flagged", flush=True)
        figures["honest"] = {"runs": runs, "checked_steps": checks, "flagged": flagged, "answers_not_reference": wrong,
                             "honest_nodes_banned": len(banned), "seconds": round(time.perf_counter() - started)}
        print("honest swarm (fp32 + bf16 nodes):", figures["honest"], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        peer.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance-model", default="SmolLM2-135M-Instruct", help="model for the dtype study")
    parser.add_argument("--skip-tolerance", action="store_true")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--honest-steps", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=5, help="generations run at once")
    parser.add_argument("--only", nargs="*", default=None, help="adversaries to run (names start with these)")
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
    # Two fp32 and one bf16 honest replica of each half (a check always has a tie-breaker), then the adversaries.
    ranges, per_node, honest = [], {}, []
    for half in halves:
        for dtype in ("float32", "float32", "bfloat16"):
            per_node[len(ranges)] = ["--dtype", dtype]
            honest.append(len(ranges))
            ranges.append(half)
    hostile = {}
    for adversary in chosen:
        for (first, last), kind, scale in adversary.nodes:
            layers = (halves[first][0], halves[last - 1][1])
            per_node[len(ranges)] = ["--dtype", "float32", "--test-perturb", str(scale), "--test-adversary", kind]
            hostile[len(ranges)] = (adversary.name, layers)
            ranges.append(layers)
    with LocalSwarm(path, ranges, threads_per_node=1, per_node_args=per_node) as swarm:
        results.update(asyncio.run(swarm_figures(swarm, honest, hostile, chosen, args)))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
