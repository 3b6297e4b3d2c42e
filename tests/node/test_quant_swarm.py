"""A node started with `--quant int4` serves SmolLM2 in one swarm with fp32 nodes (real processes on loopback)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.app.local_swarm import LocalSwarm
from node.client.chat import Message, chat_template_ids
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.model.stage import Stage
from tests.node.test_pipeline import node_infos, swarm_generate

pytestmark = pytest.mark.timeout(900)

RANGES = [(0, 10), (10, 20), (20, 30)]
QUANTS = ["none", "int4", "none"]


def single_process_tokens(source, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The same chain in this process: the same layers at the same quantizations, the client's head at each end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes run: a kernel's sums may be split by thread
    try:
        stages = [Stage(source, a, b, dtype=torch.float32, device=torch.device("cpu"), with_ends=False, quant=q)
                  for (a, b), q in zip(RANGES, QUANTS, strict=True)]
        head = ClientHead(source)
        caches = [stage.new_cache(len(prompt_ids) + new_tokens) for stage in stages]

        def chain(hidden: torch.Tensor, position: int) -> torch.Tensor:
            for stage, cache in zip(stages, caches, strict=True):
                hidden = stage.forward(hidden, position, cache)
            return hidden

        hidden, tokens = chain(head.embed(torch.tensor([prompt_ids])), 0), []
        for position in range(len(prompt_ids), len(prompt_ids) + new_tokens):
            tokens.append(int(head.head.logits(hidden[:, -1:])[0, -1].argmax()))
            hidden = chain(head.embed(torch.tensor([[tokens[-1]]])), position)
        return tokens
    finally:
        torch.set_num_threads(threads)


def test_an_int4_node_serves_alongside_fp32_nodes(smollm2, tmp_path):
    tokenizer = load_tokenizer(smollm2)
    prompt_ids = chat_template_ids(tokenizer, [Message("user", "What is the capital of France?")])
    args = {index: ["--quant", quant] for index, quant in enumerate(QUANTS)}
    params = SamplingParams(max_new_tokens=12)
    with LocalSwarm(DEFAULT_MODEL, RANGES, threads_per_node=1, per_node_args=args, log_dir=str(tmp_path)) as swarm:
        announced = {(r.start, r.end): r.quant for r in swarm.online_records()}
        answer = asyncio.run(swarm_generate(swarm, prompt_ids, params))
        infos = asyncio.run(node_infos(swarm))
    assert announced == dict(zip(RANGES, QUANTS, strict=True))  # each record says how its node holds its layers
    assert [info["quant"] for info in infos] == QUANTS
    assert answer == single_process_tokens(smollm2, prompt_ids, 12)
    assert "Paris" in tokenizer.decode(answer)
