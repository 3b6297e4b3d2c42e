"""Bytes on the wire per prefill and per decode token, and what lossy codecs do to greedy output.

Hidden states are real: taken at the stage boundaries of the model on a real prompt.
Divergence is measured through a local 3-node swarm: greedy generations with each wire
codec against the lossless one, over several prompts (tokens identical, and how many
tokens until the first difference).

Usage: python benchmarks/wire.py [--model NAME] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.client.generate import generate  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.model.stage import Stage  # noqa: E402
from node.net.protocol import pack  # noqa: E402
from node.net.wire import CODECS, decode, encode  # noqa: E402

PROMPTS = [
    "Explain pipeline parallelism in three sentences.",
    "Write a haiku about a beehive.",
    "What are the three primary colors?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "List five prime numbers and explain what makes them prime.",
]


def message_bytes(hidden: torch.Tensor, codec: str) -> int:
    return len(pack({"position": 0}, [hidden], wire=codec).SerializeToString())


async def greedy(swarm: LocalSwarm, prompts: list[list[int]], new_tokens: int, codec: str) -> list[list[int]]:
    source = swarm.source
    async with connect(swarm.initial_peers, source) as client:
        head, outputs = ClientHead(source), []
        for prompt in prompts:
            session = await client.open_session(await client.choose_chain(), max_length=len(prompt) + new_tokens,
                                                wire=codec)
            try:
                params = SamplingParams(max_new_tokens=new_tokens)
                outputs.append([t async for t in generate(session, head, prompt, params)])
            finally:
                await session.close()
        return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with LocalSwarm(args.model, num_nodes=3, threads_per_node=1) as swarm:
        source = swarm.source
        tokenizer = load_tokenizer(source)
        prompts = [chat_template_ids(tokenizer, [Message("user", p)]) for p in PROMPTS]
        outputs = {codec: asyncio.run(greedy(swarm, prompts, args.new_tokens, codec)) for codec in CODECS}

    # Real boundary hidden states: the output of layers 0:10 on the first prompt.
    head = ClientHead(source)
    stage = Stage(source, 0, swarm.ranges[0][1], dtype=torch.float32, device=torch.device("cpu"))
    prompt = prompts[0]
    hidden = stage.forward(head.embed(torch.tensor([prompt])), 0, stage.new_cache(len(prompt) + 1))
    one_token = hidden[:, -1:]

    print(f"model {source.name}, hidden {source.hidden_size}, prompt {len(prompt)} tokens, "
          f"3-node chain = 4 legs per token (push)")
    print(f"{'codec':6} {'prefill B/msg':>14} {'decode B/msg':>13} {'decode B/token':>15} {'vs none':>8} "
          f"{'max abs err':>12} {'identical':>10} {'1st diff at: min / mean':>24}")
    reference = outputs["none"]
    base = message_bytes(one_token, "none")
    for codec in CODECS:
        error = (decode(encode(hidden, codec)) - hidden).abs().max().item()
        same = sum(a == b for a, b in zip(outputs[codec], reference, strict=True))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
                      for a, b in zip(outputs[codec], reference, strict=True)]
        decode_bytes = message_bytes(one_token, codec)
        print(f"{codec:6} {message_bytes(hidden, codec):14d} {decode_bytes:13d} {4 * decode_bytes:15d} "
              f"{decode_bytes / base:7.2f}x {error:12.2e} {same:>5}/{len(reference):<4} "
              f"{min(first_diff):>14d} / {statistics.mean(first_diff):5.1f}")
    print_ring_bytes(source, one_token, len(swarm.ranges))


def print_ring_bytes(source, one_token: torch.Tensor, stages: int) -> None:
    """Bytes a ring moves between its stages per decode token (lossless): hidden states on stages - 1 legs, then
    either the token id back to the first stage, or with head sharing the last stage's output and its part."""
    size = lambda message: len(message.SerializeToString())  # noqa: E731
    vocab = source.config.vocab_size
    hops = (stages - 1) * message_bytes(one_token, "none")
    token = size(pack({"position": 100, "tokens": [vocab - 1], "sample": True}))
    head_input = size(pack({"position": 100, "head": "input"}, [one_token]))
    greedy_part = size(pack({"position": 100, "head": "part", "max": 12.5, "argmax": vocab - 1}))
    sampled_part = size(pack({"position": 100, "head": "part"}, [torch.zeros(vocab - vocab // 2)]))
    print(f"ring, {stages} stages, bytes between stages per decode token: head at the last stage "
          f"{hops + token}; shared, greedy {hops + head_input + greedy_part}; shared, sampling "
          f"{hops + head_input + sampled_part} (so sampled parts are shared only over links that carry them "
          f"within 1 ms)")


if __name__ == "__main__":
    main()
