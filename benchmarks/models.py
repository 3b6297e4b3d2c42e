"""The issue's model table: for each (architecture, quantization) pair this machine can serve, what it costs.

Rows: SmolLM2-135M-Instruct (llama) with its layers held as none (fp32), int8 and int4 (`--quant`), and Gemma 3
270M Q4_K_M (gemma3_text, the PyPI-packaged GGUF) as a node serves it: its tensors read by offset and
de-quantised (no Q4_K kernel here), so fp32 in memory; and re-quantised from that to int8 and int4
(`--gemma-quants` chooses which).
Each model is one `Stage` of all its layers, against transformers' own fp32 forward of the same checkpoint (for
Gemma, transformers loading the very same .gguf), on a fixed prompt set: the chat prompts of benchmarks/wire.py
as `layerhive chat` sends them (`chat_template_ids`: the model's chat template, or for Gemma, a base model
without one, the plain "User: ...\nAssistant:" text). Columns (see benchmarks/quant.py, whose measures these are):
* max |Δlogits| over every prompt position; greedy agreement teacher-forced along transformers' greedy
  continuation; prompts whose free-running greedy continuation equals transformers';
* bytes per layer as the stage holds it (and, for a GGUF, as the file stores it);
* decode ms per layer (one token at a KV context of ~64, median, rows of one model timed in turn);
* swarm = local: prompts whose greedy tokens through a 3-node local swarm of real processes (nodes started
  with `--quant Q`) equal the single-process stage's.

Usage: nice -n 10 python benchmarks/models.py [--new-tokens 16] [--prompts 4] [--steps 20] [--no-swarm]
       [--gemma-quants none int8 int4]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quant import accuracy, stage_greedy, swarm_answers, timings  # noqa: E402
from benchmarks.wire import PROMPTS  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.model import packaged_gguf  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, ModelSource, layer_bytes, load_tokenizer, resolve_model  # noqa: E402
from node.model.gguf_file import GGUFFile  # noqa: E402
from node.model.stage import Stage  # noqa: E402

QUANT_LABELS = {"none": "fp32", "int8": "int8", "int4": "int4"}


def reference_model(source: ModelSource) -> torch.nn.Module:
    """transformers' own fp32 model of the same checkpoint (for a GGUF: its own loading of the same file)."""
    if source.gguf is not None:
        return AutoModelForCausalLM.from_pretrained(source.gguf.parent, gguf_file=source.gguf.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source.root, dtype=torch.float32).eval()


def stored_layer_bytes(source: ModelSource) -> int | None:
    """Bytes of layer 0's tensors in the GGUF file (its own quantization), None for a safetensors checkpoint."""
    if source.gguf is None:
        return None
    return sum(info.nbytes for name, info in GGUFFile(source.gguf).tensors.items() if name.startswith("blk.0."))


def measure_model(label: str, model: str, quants: list[str], args: argparse.Namespace) -> list[dict]:
    started = time.monotonic()
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    prompts = [chat_template_ids(tokenizer, [Message("user", text)]) for text in PROMPTS[:args.prompts]]
    reference = reference_model(source)
    stages, rows = {}, []
    for quant in quants:
        stages[quant] = Stage(source, 0, source.num_layers, dtype=torch.float32, device=torch.device("cpu"),
                              quant=quant)
        row = {"model": label, "arch": source.model_type, "quant": quant, "layers": source.num_layers,
               "bytes": layer_bytes(source, torch.float32, quant), "stored": stored_layer_bytes(source)}
        row.update(accuracy(stages[quant], reference, prompts, args.new_tokens))
        rows.append(row)
        print(f"  {label} {quant}: accuracy measured ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    del reference
    gc.collect()
    for row, (decode, _prefill) in zip(rows, timings(stages, source.hidden_size, args.steps).values(), strict=True):
        row["decode_ms"] = decode * 1e3
    if args.swarm:
        for row, quant in zip(rows, quants, strict=True):
            answers = swarm_answers(model, quant, prompts, args.new_tokens, args.threads)
            local = [stage_greedy(stages[quant], ids, args.new_tokens) for ids in prompts]
            row["swarm"] = sum(a == b for a, b in zip(answers, local, strict=True))
            print(f"  {label} {quant}: swarm answered ({time.monotonic() - started:.0f} s)", file=sys.stderr,
                  flush=True)
    for row in rows:
        row["prompts"] = len(prompts)
    return rows


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(rows: list[dict], args: argparse.Namespace, load_at_start: float) -> None:
    print(f"\n{len(PROMPTS[:args.prompts])} prompts x {args.new_tokens} greedy tokens; reference: transformers fp32 "
          f"of the same checkpoint; {torch.get_num_threads()} thread(s); {cpu_name()}, {os.cpu_count()} cores; "
          f"load average (1 min) {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| model (arch) | layers held as | max abs Δlogits | greedy agreement | same greedy | bytes/layer "
          "(in file) | x fp32 | decode ms/layer | x fp32 | swarm = local |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["quant"] == "none"), None)
        stored = f" ({r['stored'] / 1e6:.2f} MB)" if r["stored"] else ""
        swarm = f"{r['swarm']}/{r['prompts']}" if "swarm" in r else "-"
        smaller = f"{base['bytes'] / r['bytes']:.2f}x" if base else "-"
        faster = f"{base['decode_ms'] / r['decode_ms']:.2f}x" if base else "-"
        print(f"| {r['model']} ({r['arch']}) | {QUANT_LABELS[r['quant']]} | {r['max_dlogits']:.4f} | "
              f"{r['agreement']:.1%} | {r['same']}/{r['prompts']} | {r['bytes'] / 1e6:.2f} MB{stored} | {smaller} | "
              f"{r['decode_ms']:.3f} | {faster} | {swarm} |")
    print("\n(x fp32: how many times smaller or faster than the same model's fp32 row, in this run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} fixed prompts")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per row")
    parser.add_argument("--no-swarm", dest="swarm", action="store_false", help="skip the 3-node local swarms")
    parser.add_argument("--gemma-quants", nargs="+", default=["none", "int8", "int4"], choices=sorted(QUANT_LABELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    rows = measure_model("SmolLM2-135M", DEFAULT_MODEL, ["none", "int8", "int4"], args)
    gc.collect()
    rows += measure_model("Gemma 3 270M Q4_K_M", packaged_gguf.NAME, args.gemma_quants, args)
    print_table(rows, args, load_at_start)


if __name__ == "__main__":
    main()
