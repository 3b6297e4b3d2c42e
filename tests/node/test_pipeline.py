"""Real node processes on loopback generate exactly what single-process transformers generates."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.app.local_swarm import LocalSwarm
from node.client.chat import Message, chat_template_ids
from node.client.session import connect
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer, resolve_model
from node.model.sampling import SamplingParams
from tests.node.swarm_client import generate_through

pytestmark = pytest.mark.timeout(600)


def reference_generate(source, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(source.root, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=list(stop_ids) or None, pad_token_id=stop_ids[0] if stop_ids else 0,
    )
    return out[0, len(prompt_ids):].tolist()


async def swarm_generate(swarm: LocalSwarm, prompt_ids: list[int], params: SamplingParams, *,
                         relay: bool = False, wire: str = "none", ring: bool = False, share_head: bool = True
                         ) -> list[int]:
    return await generate_through(swarm.initial_peers, swarm.source, prompt_ids, params, expect_ranges=swarm.ranges,
                                  relay=relay, wire=wire, ring=ring, share_head=share_head)


async def node_infos(swarm: LocalSwarm) -> list[dict]:
    """What each node says of itself (`StageServer.info`)."""
    async with connect(swarm.initial_peers, swarm.source) as client:
        return [await client.node_info(swarm.peer_id(index)) for index in range(len(swarm.ranges))]


@pytest.fixture(scope="module")
def smollm2_swarm(tmp_path_factory):
    with LocalSwarm(DEFAULT_MODEL, num_nodes=3, threads_per_node=1,
                    log_dir=str(tmp_path_factory.mktemp("smollm2-logs"))) as swarm:
        yield swarm


@pytest.mark.parametrize("prompt_kind", ["short", "long"])
def test_three_nodes_match_single_process_smollm2(smollm2_swarm, prompt_kind):
    source = smollm2_swarm.source
    assert smollm2_swarm.ranges == [(0, 10), (10, 20), (20, 30)]
    tokenizer = load_tokenizer(source)
    if prompt_kind == "short":
        prompt_ids = chat_template_ids(tokenizer, [Message("user", "What is the capital of France?")])
    else:
        story = " ".join(f"Step {i}: the hive moved layer {i % 30} to node {i % 7}." for i in range(60))
        prompt_ids = chat_template_ids(tokenizer, [Message("user", story + " Summarise the steps above.")])
        assert len(prompt_ids) > 512
    stop_ids = (tokenizer.eos_token_id,)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=stop_ids)
    ours = asyncio.run(swarm_generate(smollm2_swarm, prompt_ids, params))
    ring = asyncio.run(swarm_generate(smollm2_swarm, prompt_ids, params, ring=True))
    assert ours == ring == reference_generate(source, prompt_ids, 24, stop_ids)
    assert len(ours) >= 5


def test_three_nodes_match_single_process_tiny_qwen2(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2", num_layers=6)
    source = resolve_model(str(path))
    prompt_ids = list(range(3, 40))
    stop_ids = (source.config.eos_token_id,) if source.config.eos_token_id is not None else ()
    # The middle node keeps to libp2p: the first pushes to it and it pushes on over libp2p, the last stage
    # pushes to the first over a direct link (node.net.direct).
    with LocalSwarm(str(path), num_nodes=3, threads_per_node=1, log_dir=str(tmp_path),
                    per_node_args={1: ["--no-direct-links"]}) as swarm:
        params = SamplingParams(max_new_tokens=16, stop_token_ids=stop_ids)
        pushed = asyncio.run(swarm_generate(swarm, prompt_ids, params))
        relayed = asyncio.run(swarm_generate(swarm, prompt_ids, params, relay=True))
        ring_whole = asyncio.run(swarm_generate(swarm, prompt_ids, params, ring=True, share_head=False))
        assert asyncio.run(node_infos(swarm))[0]["head_merges"] == 0
        ring = asyncio.run(swarm_generate(swarm, prompt_ids, params, ring=True))
        infos = asyncio.run(node_infos(swarm))
        # The first stage merged every token after the first: the last stage sampled that one itself only if
        # the first stage's offer to share the head had not reached it before the prompt did.
        assert infos[0]["head_merges"] in (len(ring), len(ring) - 1)
        assert infos[0]["direct_links"] == 2 and infos[1]["direct_links"] == infos[2]["direct_links"] == 0
        # Sampled at the last stage, by the ring's two ends sharing the head, or at the client, a seeded draw
        # is the same: it depends on (seed, position) and the logits.
        sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11)
        sampled_push = asyncio.run(swarm_generate(swarm, prompt_ids, sampled))
        sampled_ring = asyncio.run(swarm_generate(swarm, prompt_ids, sampled, ring=True))
        sampled_whole = asyncio.run(swarm_generate(swarm, prompt_ids, sampled, ring=True, share_head=False))
        other_seed = asyncio.run(swarm_generate(swarm, prompt_ids, replace(sampled, seed=12), ring=True))
        no_stop = SamplingParams(max_new_tokens=16)
        halved = asyncio.run(swarm_generate(swarm, prompt_ids, no_stop, wire="fp16"))
        quantised = asyncio.run(swarm_generate(swarm, prompt_ids, no_stop, wire="int8"))
    assert pushed == relayed == ring == ring_whole == reference_generate(source, prompt_ids, 16, stop_ids)
    assert sampled_push == sampled_ring == sampled_whole != other_seed
    assert sampled_ring != ring  # the draw did sample, not just take the argmax
    # Lossy codecs run end to end; how far they drift on a real model is measured in benchmarks/wire.py.
    assert len(halved) == len(quantised) == 16
