"""The GPU check: run this on a machine with a CUDA GPU (a few minutes) and paste its output in the issue.

The CUDA path of node.model.quant cannot run where Layerhive is developed (no GPU). This script measures
it, each part against fp16 on the same GPU in the same run:

1. Kernels on one Llama-2-70B-sized layer (hidden 8192, intermediate 28672, 8 KV heads; random weights, so
   nothing to download; --layer for another size): for fp16 (F.linear) and every quantization x backend that
   runs here (int8: bitsandbytes LLM.int8, torch; int4: bitsandbytes NF4, torch's tinygemm), the relative error
   of the layer's four projections against fp16, the decode time of the four at 1 and 8 tokens (median), and
   the bytes they hold.
2. Stages of the real model (--model, default the embedded SmolLM2-135M; a bigger one such as
   Qwen/Qwen2.5-1.5B-Instruct gives more telling times): per quantization x backend, decode ms per layer,
   memory per layer, and the relative error of the stage's output against the fp16 stage.
3. A 3-node local swarm of real node processes per quantization (`layerhive node --quant Q --device cuda`):
   its greedy answer to a fixed prompt, and whether it equals the single-process stage's at that quantization.

Needs: torch with CUDA; bitsandbytes for its rows (`pip install bitsandbytes`), which are skipped and said so
otherwise. `--device cpu` runs the same script on a CPU (what was checked where it was written).

Usage: python benchmarks/gpu_check.py [--model NAME] [--device cuda] [--no-swarm] [--steps 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.quant import bnb_available, quantized_projection, supported_quants  # noqa: E402
from node.model.stage import Stage  # noqa: E402


def layer_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """The four fused projections of a Llama layer (Llama-2-70B: 8192, 28672, 1024)."""
    return {"qkv": (hidden + 2 * kv, hidden), "o": (hidden, hidden), "gate_up": (2 * intermediate, hidden),
            "down": (hidden, intermediate)}

PROMPT = "What is the capital of France?"


def variants(device: torch.device) -> list[tuple[str, str, str | None]]:
    """(label, quant, backend) of every kernel that can run on `device`; the baseline first."""
    out = [("fp16" if device.type == "cuda" else "fp32", "none", None)]
    for quant in ("int8", "int4"):
        if quant in supported_quants(device):
            out.append((f"{quant} torch", quant, "torch"))
        if bnb_available():
            out.append((f"{quant} bnb", quant, "bnb"))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def median_s(run: Callable[[], object], device: torch.device, steps: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def relative(y: torch.Tensor, reference: torch.Tensor) -> float:
    y, reference = y.float(), reference.float()
    return ((y - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)).max().item()


def kernel_part(device: torch.device, dtype: torch.dtype, steps: int, shapes: dict[str, tuple[int, int]]) -> None:
    print(f"\n1. kernels: one layer's projections {shapes} (random weights), {dtype}, medians of {steps}")
    print(f"{'kernel':12} {'rel err':>9} {'1 token ms':>11} {'x base':>7} {'8 tokens ms':>12} {'x base':>7} "
          f"{'MB held':>8} {'x base':>7}")
    generator = torch.Generator().manual_seed(0)
    weights = {name: (0.02 * torch.randn(shape, generator=generator)).to(device, dtype)
               for name, shape in shapes.items()}
    inputs = {rows: {name: torch.randn(rows, shape[1], generator=generator).to(device, dtype)
                     for name, shape in shapes.items()} for rows in (1, 8)}
    reference = {name: F.linear(inputs[8][name], w) for name, w in weights.items()}
    base = None
    for label, quant, backend in variants(device):
        before = allocated(device)
        try:
            layer = {name: quantized_projection(w, None, quant, backend=backend) if quant != "none" else
                     (lambda x, w=w: F.linear(x, w)) for name, w in weights.items()}
        except Exception as e:  # a backend that does not run on this GPU: say so, go on
            print(f"{label:12} failed to build: {type(e).__name__}: {e}")
            continue
        if quant == "none":
            held = sum(w.nbytes for w in weights.values())
        elif device.type == "cuda":
            held = allocated(device) - before
        else:  # CPU: what the modules hold (bitsandbytes' absmax, kept outside its parameters, is left out)
            held = sum(t.nbytes for m in layer.values() for t in (*m.parameters(), *m.buffers()))
        with torch.inference_mode():
            error = max(relative(layer[name](inputs[8][name]), reference[name]) for name in weights)
            times = {rows: median_s(lambda rows=rows, layer=layer: [layer[n](inputs[rows][n]) for n in weights],
                                    device, steps)
                     for rows in (1, 8)}
        base = base or (times, held)
        print(f"{label:12} {error:9.2e} {times[1] * 1e3:11.3f} {base[0][1] / times[1]:6.2f}x "
              f"{times[8] * 1e3:12.3f} {base[0][8] / times[8]:6.2f}x {held / 1e6:8.1f} {base[1] / max(held, 1):6.2f}x")
        del layer
    print("(rel err: max over rows of ‖y − y_base‖ / ‖y_base‖; x base: the baseline's time or bytes over this one's)")


def stage_part(source, device: torch.device, dtype: torch.dtype, steps: int) -> None:
    layers = min(4, source.num_layers)
    print(f"\n2. stages: {source.name} layers 0:{layers}, {dtype}, decode medians of {steps} steps at context 64")
    print(f"{'weights':12} {'rel err':>9} {'decode ms/layer':>16} {'x base':>7} {'MB/layer':>9} {'x base':>7}")
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 64, source.hidden_size, generator=generator).to(device, dtype)
    token = torch.randn(1, 1, source.hidden_size, generator=generator).to(device, dtype)
    base, reference = None, None
    for label, quant, backend in variants(device):
        before = allocated(device)
        try:
            stage = Stage(source, 0, layers, dtype=dtype, device=device, with_ends=False, quant=quant,
                          quant_backend=backend)
        except Exception as e:
            print(f"{label:12} failed to build: {type(e).__name__}: {e}")
            continue
        per_layer = (allocated(device) - before) / layers if device.type == "cuda" else stage.layer_bytes
        with torch.inference_mode():
            output = stage.forward(prompt, 0, stage.new_cache(64))
            reference = reference if reference is not None else output
            cache = stage.new_cache(64 + steps + 3)
            stage.forward(prompt, 0, cache)
            position = [64]

            def step(stage=stage, cache=cache, position=position) -> None:
                stage.forward(token, position[0], cache)
                position[0] += 1

            decode = median_s(step, device, steps) / layers
        base = base or (decode, per_layer)
        print(f"{label:12} {relative(output, reference):9.2e} {decode * 1e3:16.3f} {base[0] / decode:6.2f}x "
              f"{per_layer / 1e6:9.2f} {base[1] / per_layer:6.2f}x")
        del stage


def greedy(stage: Stage, head: ClientHead, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """What a client gets from a chain of `stage`'s layers: it embeds and samples itself (fp32, on CPU)."""
    cache = stage.new_cache(len(prompt_ids) + new_tokens)
    tokens: list[int] = []
    hidden = stage.forward(head.embed(torch.tensor([prompt_ids])), 0, cache)
    for position in range(len(prompt_ids), len(prompt_ids) + new_tokens):
        tokens.append(int(head.head.logits(hidden[:, -1:].cpu())[0, -1].argmax()))
        if len(tokens) < new_tokens:
            hidden = stage.forward(head.embed(torch.tensor([[tokens[-1]]])), position, cache)
    return tokens


def swarm_part(model: str, source, device: torch.device, dtype: torch.dtype, new_tokens: int) -> None:
    from node.app.local_swarm import LocalSwarm
    from node.client.chat import Message, chat_template_ids
    from node.model.sampling import SamplingParams
    from tests.node.swarm_client import generate_through

    tokenizer, head = load_tokenizer(source), ClientHead(source)
    prompt_ids = chat_template_ids(tokenizer, [Message("user", PROMPT)])
    print(f"\n3. 3-node local swarms on {device}: {PROMPT!r}, {new_tokens} greedy tokens")
    for quant in supported_quants(device):
        stage = Stage(source, 0, source.num_layers, dtype=dtype, device=device, quant=quant, with_ends=False)
        with torch.inference_mode():
            local = greedy(stage, head, prompt_ids, new_tokens)
        del stage
        args = ["--quant", quant, "--device", str(device)]
        with LocalSwarm(model, num_nodes=3, threads_per_node=None if device.type == "cuda" else 1,
                        node_args=args) as swarm:
            answer = asyncio.run(generate_through(swarm.initial_peers, swarm.source, prompt_ids,
                                                  SamplingParams(max_new_tokens=new_tokens),
                                                  expect_ranges=swarm.ranges))
        print(f"{quant:5} swarm = single process: {answer == local}; swarm says {tokenizer.decode(answer)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-swarm", action="store_true")
    parser.add_argument("--layer", type=int, nargs=3, default=[8192, 28672, 1024], metavar=("HIDDEN", "FFN", "KV"),
                        help="the kernel part's layer (default Llama-2-70B's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)}, capability {torch.cuda.get_device_capability(device)})"
             if device.type == "cuda" else ""))
    try:
        import bitsandbytes

        print(f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as e:
        print(f"bitsandbytes not usable ({type(e).__name__}: {e}): its rows are left out")
    kernel_part(device, dtype, args.steps, layer_shapes(*args.layer))
    source = resolve_model(args.model)
    stage_part(source, device, dtype, args.steps)
    if not args.no_swarm:
        swarm_part(args.model, source, device, dtype, args.new_tokens)


if __name__ == "__main__":
    main()
