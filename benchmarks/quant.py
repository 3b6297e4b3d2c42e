"""Quantized layers (node.model.quant): what they cost in accuracy, what they save in bytes and decode time.

Model table (default): SmolLM2-135M (or --model), the whole model as one `Stage` with both ends, its
layers held as none (fp32), int8 and int4 (and int4 in groups of 64 with --groups), against transformers'
own fp32 forward on a fixed set of chat prompts:
* max |Δlogits|: over every prompt position of every prompt (prefill logits);
* greedy agreement: top-1 of the stage's logits against transformers' greedy token, teacher-forced along
  transformers' greedy continuation (prompt + NEW tokens): the share of positions that agree;
* same greedy: prompts whose free-running greedy continuation (NEW tokens) equals transformers';
* bytes per layer (`node.model.checkpoint.layer_bytes`, what the stage holds) and the ratio to fp32;
* decode ms per layer: one token through all layers at a KV context of ~64, the quantizations run in turn
  (one step each, repeated), median, divided by the layers; and the ratio to fp32 in the same run;
* prefill ms per token per layer: a 128-token chunk, likewise.
With --swarm, each quantization also answers through a 3-node local swarm of real processes started with
`--quant Q`, and the swarm's greedy tokens are compared with the single-process stage's at that quantization.

The embedded SmolLM2 is a dequantized Q4_1 GGUF (node.model.embedded_model): its weights sit exactly on a 4-bit
grid of groups of 32, which int4 in groups of 32 reproduces, so its figures flatter int4 against int8 (which
re-rounds them per channel). --off-grid runs the table on a copy whose projection weights are moved off that grid
(`off_grid_checkpoint`), as a model trained in bf16 would be: what a real model's figures look like.

Kernel table (--kernels): the forty projection matrices of 10 SmolLM2 layers, fp32 oneDNN (`Projection`)
against int8 (its kernel and its dequantize-to-bf16 gemm), int4 (groups of 64 and 32) and, if installed,
bitsandbytes; at several row counts; medians of interleaved runs, ratio to fp32 in the same run.

Usage: python benchmarks/quant.py [--model NAME] [--off-grid] [--threads 1] [--new-tokens 24] [--steps 30] [--swarm]
       python benchmarks/quant.py --kernels [--rows 1 8 16 32 64] [--reps 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.wire import PROMPTS  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.model import quant as quant_module  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, layer_bytes, load_tokenizer, resolve_model  # noqa: E402
from node.model.projection import Projection  # noqa: E402
from node.model.quant import Int4Projection, Int8Projection, bnb_available, quantized_projection  # noqa: E402
from node.model.stage import Stage  # noqa: E402
from node.net.protocol import PREFILL_CHUNK_TOKENS  # noqa: E402


@contextlib.contextmanager
def int4_group(group: int) -> Iterator[None]:
    """Quantizes int4 in groups of `group` inside the block (the module's default otherwise)."""
    saved, quant_module.INT4_GROUP = quant_module.INT4_GROUP, group
    try:
        yield
    finally:
        quant_module.INT4_GROUP = saved


def variants(groups: bool) -> list[tuple[str, str, int]]:
    """(label, quant, int4 group) rows of the model table."""
    rows = [("none (fp32)", "none", quant_module.INT4_GROUP), ("int8", "int8", quant_module.INT4_GROUP),
            (f"int4 g{quant_module.INT4_GROUP}", "int4", quant_module.INT4_GROUP)]
    return rows + ([("int4 g64", "int4", 64)] if groups and quant_module.INT4_GROUP != 64 else [])


def off_grid_checkpoint(source, directory: Path, seed: int = 0) -> Path:
    """A copy of `source` in `directory` whose projection weights each moved by uniform noise of up to half the
    step of their group of 32 ((max - min) / 15): off any 4-bit grid, about as far from the original as Q4_1
    rounding put it from the model it was made from."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for path in source.root.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, directory / path.name)
            continue
        tensors = load_file(path)
        for name, w in tensors.items():
            if name.endswith("proj.weight") and w.shape[1] % 32 == 0:
                groups = w.float().view(w.shape[0], -1, 32)
                step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
                noise = (torch.rand(groups.shape, generator=generator) - 0.5) * step
                tensors[name] = (groups + noise).view_as(w).to(w.dtype)
        save_file(tensors, directory / path.name)
    return directory


# --- the model table ---------------------------------------------------------------------------------------------


def stage_logits(stage: Stage, ids: list[int]) -> torch.Tensor:
    """Logits [tokens, vocab] of every position of `ids`, prefilled in the protocol's chunks."""
    cache = stage.new_cache(len(ids))
    out = []
    for offset in range(0, len(ids), PREFILL_CHUNK_TOKENS):
        chunk = torch.tensor([ids[offset:offset + PREFILL_CHUNK_TOKENS]])
        out.append(stage.head.logits(stage.forward(stage.embedder.embed(chunk), offset, cache))[0])
    return torch.cat(out)


def stage_greedy(stage: Stage, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens as a swarm computes them: prefill in the protocol's chunks, then one token per step."""
    cache = stage.new_cache(len(prompt_ids) + new_tokens)
    for offset in range(0, len(prompt_ids), PREFILL_CHUNK_TOKENS):
        chunk = torch.tensor([prompt_ids[offset:offset + PREFILL_CHUNK_TOKENS]])
        hidden = stage.forward(stage.embedder.embed(chunk), offset, cache)
    tokens = [int(stage.head.logits(hidden[:, -1:])[0, -1].argmax())]
    for position in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
        hidden = stage.forward(stage.embedder.embed(torch.tensor([[tokens[-1]]])), position, cache)
        tokens.append(int(stage.head.logits(hidden)[0, -1].argmax()))
    return tokens


def accuracy(stage: Stage, reference, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """max |Δlogits| on the prompts, teacher-forced greedy agreement, and identical free-running continuations."""
    max_delta, agree, total, same = 0.0, 0, 0, 0
    for prompt_ids in prompts:
        with torch.inference_mode():
            theirs = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False,
                                        min_new_tokens=new_tokens, pad_token_id=0)[0].tolist()
            their_logits = reference(torch.tensor([theirs])).logits[0].float()
            ours = stage_logits(stage, theirs)
        n = len(prompt_ids)
        max_delta = max(max_delta, (ours[:n] - their_logits[:n]).abs().max().item())
        predicted = ours[n - 1:-1].argmax(dim=-1)  # our next token after each of their tokens
        agree += int((predicted == torch.tensor(theirs[n:])).sum())
        total += new_tokens
        same += stage_greedy(stage, prompt_ids, new_tokens) == theirs[n:]
    return {"max_dlogits": max_delta, "agreement": agree / total, "same": same}


def timings(stages: dict[str, Stage], hidden_size: int, steps: int, context: int = 64,
            chunk: int = 128) -> dict[str, tuple[float, float]]:
    """(decode s per layer, prefill s per token per layer) of each stage, medians of runs taken in turn."""
    generator = torch.Generator().manual_seed(0)
    decode: dict[str, list[float]] = {label: [] for label in stages}
    prefill: dict[str, list[float]] = {label: [] for label in stages}
    caches = {label: stage.new_cache(context + steps + 1) for label, stage in stages.items()}
    warm = torch.randn(1, context, hidden_size, generator=generator)
    for label, stage in stages.items():
        stage.forward(warm, 0, caches[label])
    for step in range(steps):
        token = torch.randn(1, 1, hidden_size, generator=generator)
        for label, stage in stages.items():
            started = time.perf_counter()
            stage.forward(token, context + step, caches[label])
            decode[label].append((time.perf_counter() - started) / stage.shape.num_layers)
    prompt = torch.randn(1, chunk, hidden_size, generator=generator)
    for _ in range(max(3, steps // 10)):
        for label, stage in stages.items():
            started = time.perf_counter()
            stage.forward(prompt, 0, stage.new_cache(chunk))
            prefill[label].append((time.perf_counter() - started) / stage.shape.num_layers / chunk)
    return {label: (statistics.median(decode[label]), statistics.median(prefill[label])) for label in stages}


def swarm_answers(model: str, quant: str, prompts: list[list[int]], new_tokens: int, threads: int) -> list[list[int]]:
    """Greedy tokens of each prompt through a 3-node local swarm whose nodes hold their layers at `quant`."""
    from node.app.local_swarm import LocalSwarm
    from node.model.sampling import SamplingParams
    from tests.node.swarm_client import generate_through

    params = SamplingParams(max_new_tokens=new_tokens)
    swarm = LocalSwarm(model, num_nodes=3, threads_per_node=threads, node_args=["--quant", quant])
    try:
        swarm.start(timeout_s=900)  # three nodes loading a model at once on a shared, loaded machine
        return [asyncio.run(generate_through(swarm.initial_peers, swarm.source, ids, params,
                                             expect_ranges=swarm.ranges)) for ids in prompts]
    finally:
        swarm.stop()


def model_table(args: argparse.Namespace) -> None:
    source = resolve_model(args.model)
    if args.off_grid:
        source = resolve_model(str(off_grid_checkpoint(source, Path(tempfile.mkdtemp(prefix="off-grid-")))))
        args.model = str(source.root)
    tokenizer = load_tokenizer(source)
    prompts = [chat_template_ids(tokenizer, [Message("user", text)]) for text in PROMPTS]
    reference = AutoModelForCausalLM.from_pretrained(source.root, dtype=torch.float32).eval()
    stages, results = {}, {}
    for label, quant, group in variants(args.groups):
        with int4_group(group):
            stages[label] = Stage(source, 0, source.num_layers, dtype=torch.float32, device=torch.device("cpu"),
                                  quant=quant)
            results[label] = {"bytes": layer_bytes(source, torch.float32, quant), "quant": quant}
        results[label].update(accuracy(stages[label], reference, prompts, args.new_tokens))
        print(f"  {label}: accuracy measured", file=sys.stderr, flush=True)
    del reference
    speeds = timings(stages, source.hidden_size, args.steps)
    if args.swarm:
        for label, quant, group in variants(args.groups):
            if group != quant_module.INT4_GROUP:
                continue  # nodes quantize with the default group
            answers = swarm_answers(args.model, quant, prompts, args.new_tokens, args.threads)
            local = [stage_greedy(stages[label], ids, args.new_tokens) for ids in prompts]
            results[label]["swarm"] = sum(a == b for a, b in zip(answers, local, strict=True))
            print(f"  {label}: swarm answered", file=sys.stderr, flush=True)
    base_bytes, (base_decode, base_prefill) = results["none (fp32)"]["bytes"], speeds["none (fp32)"]
    grid = " (off grid)" if args.off_grid else ""
    print(f"\n{source.name}{grid}, {source.num_layers} layers, {len(prompts)} prompts x {args.new_tokens} greedy "
          f"tokens, {torch.get_num_threads()} thread(s), reference: transformers fp32")
    header = (f"{'weights':13} {'max|Δlogits|':>12} {'greedy agree':>12} {'same greedy':>11} {'bytes/layer':>12} "
              f"{'x fp32':>7} {'decode ms/layer':>15} {'x fp32':>7} {'prefill µs/tok/layer':>20} {'x fp32':>7}")
    if args.swarm:
        header += f" {'swarm = local':>13}"
    print(header)
    for label, r in results.items():
        decode, prefill = speeds[label]
        line = (f"{label:13} {r['max_dlogits']:12.4f} {r['agreement']:12.1%} {r['same']:>6}/{len(prompts):<4} "
                f"{r['bytes'] / 1e6:9.2f} MB {base_bytes / r['bytes']:6.2f}x {decode * 1e3:15.3f} "
                f"{base_decode / decode:6.2f}x {prefill * 1e6:20.2f} {base_prefill / prefill:6.2f}x")
        if args.swarm:
            line += f" {r['swarm']:>8}/{len(prompts)}" if "swarm" in r else f" {'-':>13}"
        print(line)
    print("(x fp32: how many times smaller or faster than fp32 in this run)")


# --- the kernel table --------------------------------------------------------------------------------------------

SMOLLM2_MATRICES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 10  # qkv, o, gate_up, down of 10 layers


class _Dequantized(Int8Projection):
    """int8 always through its dequantize-to-bf16 gemm, to time that path at every row count."""

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(quant_module.KERNEL_DTYPE)
        return rows @ (self.qweight.to(quant_module.KERNEL_DTYPE) * self.scale[:, None]).t()


def kernel_candidates(weights: list[torch.Tensor]) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    cands = {
        "fp32 oneDNN": [Projection(w) for w in weights],
        "int8 kernel": [_int8_kernel_only(w) for w in weights],
        "int8 bf16 gemm": [_Dequantized.quantize(w) for w in weights],
        "int4 g64": [Int4Projection.quantize(w, group=64) for w in weights],
        "int4 g32": [Int4Projection.quantize(w, group=32) for w in weights],
    }
    if bnb_available():
        cands["bnb nf4"] = [quantized_projection(w, None, "int4", backend="bnb") for w in weights]
        cands["bnb int8"] = [quantized_projection(w, None, "int8", backend="bnb") for w in weights]
    return cands


def _int8_kernel_only(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    projection = Int8Projection.quantize(weight)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(quant_module.KERNEL_DTYPE), projection.qweight,
                                                        projection.scale).float()


def kernel_table(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    weights = [0.02 * torch.randn(shape) for shape in SMOLLM2_MATRICES]
    cands = kernel_candidates(weights)
    inputs = sorted({shape[1] for shape in SMOLLM2_MATRICES})
    print(f"forty SmolLM2 matrices (10 layers, {sum(w.numel() for w in weights) * 4 / 1e6:.0f} MB in fp32), "
          f"{torch.get_num_threads()} thread(s); ms per pass over all, median of {args.reps} interleaved runs")
    print(f"{'rows':>5} " + " ".join(f"{name:>18}" for name in cands))
    with torch.inference_mode():
        for rows in args.rows:
            x = {k: torch.randn(rows, k) for k in inputs}
            runs = {name: (lambda mods=mods, x=x: [m(x[w.shape[1]]) for m, w in zip(mods, weights, strict=True)])
                    for name, mods in cands.items()}
            for run in runs.values():
                run()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _, (name, run) in itertools.product(range(args.reps), runs.items()):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
            base = statistics.median(times["fp32 oneDNN"])
            print(f"{rows:>5} " + " ".join(f"{statistics.median(t) * 1e3:8.2f} ms {base / statistics.median(t):5.2f}x"
                                           for t in times.values()))
    print("(x: fp32 oneDNN's time over this kernel's, in the same run: above 1 is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per quantization")
    parser.add_argument("--groups", action="store_true", help="also int4 in groups of 64")
    parser.add_argument("--off-grid", action="store_true", help="the model's weights moved off their 4-bit grid")
    parser.add_argument("--swarm", action="store_true", help="also answer through 3-node local swarms")
    parser.add_argument("--kernels", action="store_true", help="the kernel table instead of the model table")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernel_table(args)
    else:
        model_table(args)


if __name__ == "__main__":
    main()
