"""Spot checks (node.client.verify): honest-vs-honest error by dtype, false positives, detection of a lying node.

1. Tolerance: in-process, one stage run as a server would (prefill, then decode steps batched with
   other sessions) against a verifier's replay (one prefill, then the step); the relative error per
   token, max over tokens, in fp32, fp16 and bf16. Honest errors above `node.client.verify.TOLERANCES` are the
   false positives of a swarm computing in that dtype.
1b. Quantized layers: the same, the server and the verifier each holding their layers as none (fp32), int8 or
   int4 (`node.model.quant`), on each of SmolLM2's three 10-layer stages, fed the hidden states real text
   has there (random ones would say nothing of the outliers real activations carry); against
   `node.client.verify.QUANT_TOLERANCES`. Also on SmolLM2 moved off its 4-bit grid (benchmarks/quant.py
   --off-grid), since the embedded SmolLM2's own weights are those of a Q4_1 file, which int4 reproduces.
2. False positives on real nodes: a local swarm of honest CPU fp32 nodes, every step audited
   (p = 1), over a long run, with the wire as is (fp32 tolerance) and with the fp16 wire codec.
3. Detection: one node adds noise of SCALE × RMS to its outputs (`layerhive node --test-perturb`);
   it is forced into every chain (the harness's router prefers it) until caught; per generation we
   record whether it was caught and after how many tokens (the tainted tokens the user already got).

Usage: python benchmarks/verification.py [--model tiny|PATH] [--generations 20] [--tokens 16] [--json out.json]
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
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quant import off_grid_checkpoint  # noqa: E402
from node.client.failover import ResilientSession  # noqa: E402
from node.client.generate import generate  # noqa: E402
from node.client.session import SwarmClient  # noqa: E402
from node.client.verify import TOLERANCES, Auditor, relative_error, tolerance_for  # noqa: E402
from node.model.checkpoint import load_tokenizer, resolve_model  # noqa: E402
from node.model.head import ClientHead, Embedder  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.model.stage import Stage, StepInput  # noqa: E402
from node.net.membership import open_dht  # noqa: E402
from tests.node.test_verify import SwarmWithLiar  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


class LiarFirstClient(SwarmClient):
    """Routes through `liar` whenever it is not banned (to measure detection per exposure)."""

    liar: str = ""

    async def choose_chain(self, **kwargs):
        chain = await super().choose_chain(**kwargs)
        if self.liar in self.banned:
            return chain
        records = {r.peer_id: r for r in await self.servers()}
        liar = records[self.liar]
        return [type(hop)(self.liar, hop.start, hop.end) if liar.start <= hop.start and hop.end <= liar.end else hop
                for hop in chain]


async def run_generation(client, head, prompt_ids, tokens, auditor) -> tuple[list[int], ResilientSession]:
    session = ResilientSession(client, max_length=len(prompt_ids) + tokens, step_timeout_s=30, auditor=auditor)
    await session.open()
    try:
        out = [t async for t in generate(session, head, prompt_ids, SamplingParams(max_new_tokens=tokens))]
    finally:
        await session.close()
    return out, session


async def swarm_figures(swarm: SwarmWithLiar, args) -> dict:
    source, liar = swarm.source, swarm.peer_id(swarm.liar)
    head = ClientHead(source)
    rng = random.Random(7)
    prompt_ids = [rng.randrange(5, 250) for _ in range(24)]
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    figures: dict = {"false_positives": {}, "detection": {}}
    try:
        for wire in ("none", "fp16"):  # honest run, every step audited
            client = SwarmClient(peer, source)
            client.ban(liar, for_s=1e6)
            auditor = Auditor(client, 1.0, compute_dtype=torch.float32, wire=wire, rng=random.Random(1))
            started = time.perf_counter()
            for _ in range(args.generations):
                await run_generation(client, head, prompt_ids, args.tokens, auditor)
            checked = [r for r in auditor.reports if r.verdict != "unchecked"]
            errors = [r.error for r in checked]
            figures["false_positives"][wire] = {
                "checks": len(checked), "flagged": sum(r.verdict != "honest" for r in checked),
                "unchecked": len(auditor.reports) - len(checked), "tolerance": auditor.tolerance,
                "max_error": max(errors), "median_error": statistics.median(errors),
                "seconds": round(time.perf_counter() - started, 1),
            }
            print("false positives, wire", wire, figures["false_positives"][wire], flush=True)
        for p in args.probabilities:
            caught, tainted, generations = 0, [], 0
            for g in range(args.generations):
                client = LiarFirstClient(peer, source)
                client.liar = liar
                auditor = Auditor(client, p, compute_dtype=torch.float32, rng=random.Random(1000 + g))
                _, session = await run_generation(client, head, prompt_ids, args.tokens, auditor)
                generations += 1
                flagged = [r for r in auditor.reports if liar in (r.peer, r.verifier) and r.verdict != "honest"]
                wrong = [r for r in auditor.reports if r.verdict != "honest" and liar not in (r.peer, r.verifier)]
                assert not wrong, f"an honest node was flagged: {wrong}"
                if flagged:
                    caught += 1
                    # tokens already handed out from tainted states: one per step before the one that was caught
                    tainted.append(flagged[0].position - len(prompt_ids) + 1 if flagged[0].position else 0)
            figures["detection"][str(p)] = {
                "generations": generations, "tokens_per_generation": args.tokens, "caught": caught,
                "detection_rate": caught / generations,
                "tokens_until_detection_mean": statistics.mean(tainted) if tainted else None,
                "tokens_until_detection_median": statistics.median(tainted) if tainted else None,
                "expected_steps_until_the_liar_is_checked": len(set(swarm.ranges)) / p,
            }
            print("detection, p =", p, figures["detection"][str(p)], flush=True)
    finally:
        peer.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random 6-layer llama) or a model name/path")
    parser.add_argument("--tolerance-model", default="SmolLM2-135M-Instruct", help="model for the dtype study")
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--scale", type=float, default=0.01, help="the liar's noise, × the output's RMS")
    parser.add_argument("--probabilities", type=float, nargs="*", default=[0.05, 0.2])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tolerances-only", action="store_true", help="the dtype and quantization studies only")
    parser.add_argument("--quant-only", action="store_true", help="the quantization study only (1b)")
    parser.add_argument("--quant-pairs", nargs="*", default=None, metavar="SERVER:VERIFIER",
                        help="quantization pairs of the study (default all of QUANT_PAIRS)")
    parser.add_argument("--quant-models", nargs="*", default=["model", "off_grid"], choices=["model", "off_grid"])
    args = parser.parse_args()

    results: dict = {"tolerances": {k: TOLERANCES[v] for k, v in DTYPES.items()}, "honest_error": {}}
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
    results["quant_honest_error"] = {name: quant_study(models[name](), pairs=pairs) for name in args.quant_models}
    print(json.dumps(results["quant_honest_error"], indent=2), flush=True)
    if args.tolerances_only or args.quant_only:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return

    if args.model == "tiny":
        from tests.conftest import build_tiny_checkpoint

        path = str(build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="verify-tiny-")), "llama", 6))
    else:
        path = args.model
    source = resolve_model(path)
    half = source.num_layers // 2
    ranges = [(0, half)] * 3 + [(half, source.num_layers)] * 2
    with SwarmWithLiar(path, ranges, threads_per_node=1, liar=0, scale=args.scale) as swarm:
        results.update(asyncio.run(swarm_figures(swarm, args)))
    results["liar_scale"] = args.scale
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
