"""Speculative decoding: drafting, verifying, the draft length, cache rollback, and rings that speculate."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from node.client.session import SwarmClient
from node.model.checkpoint import resolve_model
from node.model.sampling import SamplingParams, token_probs
from node.model.speculative import DraftLength, propose_draft, verify_draft
from node.model.stage import Stage
from node.net.protocol import pack
from node.serve.node import Node, NodeConfig
from swarm.types import Hop
from tests.node.test_server import _first_answer, _with_node, refusal

pytestmark = pytest.mark.timeout(300)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    history = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3]
    assert propose_draft(history, 3) == [5, 6, 7]  # the latest "1 2 3", not the first
    assert propose_draft(history, 1) == [5]
    assert propose_draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose_draft(history, 0) == [] and propose_draft([7], 4) == []
    assert propose_draft([8, 8, 8], 4) == [8]  # what followed the latest earlier "8 8"


def test_greedy_verification_keeps_the_argmax_prefix_then_corrects():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 4, 7, 2]):
        logits[row, best] = 1.0
    greedy = SamplingParams(max_new_tokens=8)
    assert verify_draft(logits, [3, 4, 7], greedy, 10) == [3, 4, 7, 2]  # all kept, plus the bonus
    assert verify_draft(logits, [3, 5, 7], greedy, 10) == [3, 4]  # the first miss is replaced
    assert verify_draft(logits, [0, 4, 7], greedy, 10) == [3]
    assert verify_draft(logits[:1], [], greedy, 10) == [3]
    with pytest.raises(ValueError):
        verify_draft(logits, [3], greedy, 10)


def test_sampled_verification_is_distributed_as_sampling_without_a_draft():
    """Standard speculative sampling with a point-mass draft: the first token's distribution is p, whatever the
    draft (one likely, one unlikely token here), over many seeds."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0] * 5])
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=seed) for seed in range(6000)]
    p = token_probs(logits[0], params[0])
    p = p / p.sum()
    for proposed in (0, 3):
        counts = Counter(verify_draft(logits, [proposed], params[s], 7)[0] for s in range(len(params)))
        observed = torch.tensor([counts[t] / len(params) for t in range(5)])
        assert torch.allclose(observed, p, atol=0.02), (proposed, observed, p)
    # The same (seed, position) draws the same tokens: a failover's replay.
    assert verify_draft(logits, [3], params[5], 7) == verify_draft(logits, [3], params[5], 7)


def test_draft_length_follows_acceptance_and_round_time():
    drafts = DraftLength(limit=16)
    assert drafts.choose() == 4  # nothing measured yet
    for _ in range(30):  # long rounds (legs), cheap positions, every draft kept: draft long
        drafts.observe(0, 0, 0.1)
        drafts.observe(8, 8, 0.104)
    assert drafts.choose() >= 8
    for _ in range(60):  # nothing kept any more: stop drafting, once the old rounds have faded
        drafts.observe(4, 0, 0.11)
    assert drafts.choose() == 0
    assert DraftLength(limit=0).choose() == 0


def test_truncating_a_cache_then_stepping_matches_never_having_stepped(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("qwen2", num_layers=4)))  # sliding-window layers too
    stage = Stage(source, 0, 4, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(1, 9, source.hidden_size)
    rejected = torch.randn(1, 4, source.hidden_size)
    cache, clean = stage.new_cache(32), stage.new_cache(32)
    stage.forward(x[:, :6], 0, cache)
    stage.forward(rejected, 6, cache)
    cache.truncate(6)
    stage.forward(x[:, :6], 0, clean)
    assert torch.allclose(stage.forward(x[:, 6:], 6, cache), stage.forward(x[:, 6:], 6, clean), atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(10)


def test_one_node_ring_speculates_with_identical_greedy_output_and_refuses_bad_drafts(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    prompt = [5, 17, 3, 99, 42, 5, 17, 3, 99, 42, 5, 17]
    greedy = SamplingParams(max_new_tokens=24)
    sampled = SamplingParams(max_new_tokens=24, temperature=0.7, seed=11)

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 4)

        async def run(params: SamplingParams, speculate: int) -> list[int]:
            ring = await client.open_session([hop], max_length=64, sampling=params, speculate=speculate)
            try:
                return [t async for t in ring.tokens(prompt, 0)]
            finally:
                await ring.close()

        plain = await run(greedy, 0)
        assert await run(greedy, 6) == plain and len(plain) == 24
        info = await client.node_info(hop.node_id)
        assert info["draft_tokens"] > 0, info  # drafts were made and verified
        assert len(await run(sampled, 6)) == 24

        hostile = await client.open_session([hop], max_length=64, sampling=greedy, speculate=4)
        for request in [pack({"position": 0, "tokens": [1, 2], "sample": True, "draft": [2]}),  # a client's draft
                        pack({"position": 0, "tokens": [1], "draft": "x"})]:
            assert await refusal(hostile, request) == "bad_request"
        await hostile.close()
        opening = {"session_id": "s", "start": 0, "end": 4, "max_length": 8, "embed": True,
                   "sampling": greedy.to_wire(), "speculate": 17}  # over the protocol's bound of 16
        assert b"bad_request" in await _first_answer(client, hop.node_id, pack({"open": opening}))
        assert await run(greedy, 16) == plain  # and the node serves on

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4), body))


def test_three_node_ring_speculates_with_identical_greedy_output(tiny_checkpoint, tmp_path):
    """Drafts ride the steps through every stage, rejected positions roll back in each stage's cache, and the
    tokens are those of the ring without speculation, greedy; sampled, a full answer comes."""
    from node.app.local_swarm import LocalSwarm
    from node.client.session import connect

    path = tiny_checkpoint("llama", num_layers=6)
    prompt = [5, 17, 3, 99, 42, 5, 17, 3, 99, 42, 5, 17, 3]
    with LocalSwarm(str(path), num_nodes=3, threads_per_node=1, log_dir=str(tmp_path)) as swarm:
        async def run(params: SamplingParams, speculate: int) -> tuple[list[int], list[dict]]:
            async with connect(swarm.initial_peers, swarm.source) as client:
                chain = await client.choose_chain()
                ring = await client.open_session(chain, max_length=80, sampling=params, speculate=speculate)
                try:
                    tokens = [t async for t in ring.tokens(prompt, 0)]
                finally:
                    await ring.close()
                return tokens, [await client.node_info(hop.node_id) for hop in chain]

        greedy = SamplingParams(max_new_tokens=40)
        plain, _ = asyncio.run(run(greedy, 0))
        speculated, infos = asyncio.run(run(greedy, 8))
        assert speculated == plain and len(plain) == 40
        assert infos[-1]["draft_tokens"] > 0, infos[-1]
        print(f"drafts at the last stage: {infos[-1]['draft_kept']} of {infos[-1]['draft_tokens']} kept")
        sampled, _ = asyncio.run(run(SamplingParams(max_new_tokens=40, temperature=0.8, seed=3), 8))
        assert len(sampled) == 40


def test_a_draft_model_drafts_the_greedy_continuation_and_follows_a_rewritten_history(tiny_checkpoint):
    """The same model as its own draft: its drafts are the model's greedy tokens; when the verifier keeps only
    part of a draft and picks another token, the next draft continues from the rewritten history (the draft's
    cache rolled back), as a fresh draft model would."""
    from node.model.draft import DraftModel

    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    vocab = source.config.vocab_size
    drafter = DraftModel(source, target_vocab_size=vocab, max_sessions=2, max_context=64)
    stage = Stage(source, 0, 4, dtype=torch.float32, device=torch.device("cpu"), share_head=False)

    def greedy(history: list[int], n: int) -> list[int]:
        cache, out = stage.new_cache(64), []
        hidden = stage.forward(stage.embedder.embed(torch.tensor([history])), 0, cache)
        for _ in range(n):
            out.append(int(stage.head.logits(hidden[:, -1:])[0, -1].argmax()))
            hidden = stage.forward(stage.embedder.embed(torch.tensor([[out[-1]]])), len(history) + len(out) - 1,
                                   cache)
        return out

    prompt = [7, 200, 41, 9, 250, 3, 88]
    draft = drafter.propose("a", prompt, 5)
    assert draft == greedy(prompt, 5)
    rewritten = [*prompt, *draft[:2], (draft[2] + 1) % vocab]  # two kept, then the verifier's own token
    assert drafter.propose("a", rewritten, 4) == greedy(rewritten, 4)
    assert drafter.propose("a", rewritten[:5], 3) == greedy(rewritten[:5], 3)  # shorter than what it holds
    for key in ("b", "c"):  # at most 2 sessions held: "a" is dropped, and drafts afresh the same
        drafter.propose(key, prompt, 1)
    assert list(drafter._states) == ["b", "c"]
    assert drafter.propose("a", rewritten, 4) == greedy(rewritten, 4)
    assert drafter.propose("a", list(range(62)), 4) == []  # beyond its context bound: no draft
    with pytest.raises(ValueError, match="tokenizer"):
        DraftModel(source, target_vocab_size=vocab - 1)
    # A long history is caught up a chunk per round (the compute thread is held for one chunk at a time): no
    # draft until it is, then the same greedy draft.
    chunked = DraftModel(source, target_vocab_size=vocab, max_feed=3)
    assert [chunked.propose("a", prompt, 4) for _ in range(2)] == [[], []]
    assert chunked._states["a"].tokens == prompt[:6]
    assert chunked.propose("a", prompt, 4) == greedy(prompt, 4)


def test_a_ring_with_a_draft_model_keeps_greedy_output_and_accepts_what_lookup_cannot(tiny_checkpoint):
    """A node started with --draft-model (here the served model itself) drafts for its rings: the output is the
    plain ring's, and the draft tokens are kept."""
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    prompt = [7, 200, 41, 9, 250, 3, 88, 121, 64]
    greedy = SamplingParams(max_new_tokens=24)

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 4)

        async def run(speculate: int) -> list[int]:
            ring = await client.open_session([hop], max_length=64, sampling=greedy, speculate=speculate)
            try:
                return [t async for t in ring.tokens(prompt, 0)]
            finally:
                await ring.close()

        plain = await run(0)
        assert await run(6) == plain and len(plain) == 24
        info = await client.node_info(hop.node_id)
        # The model drafts for itself, so every draft token is kept (one may fall to the batched pass's rounding)
        # as long as the first stage drafts from the true history, the kept draft tokens included (20 of 22 when
        # it forgot them).
        assert info["draft_tokens"] > 0 and info["draft_kept"] >= info["draft_tokens"] - 1, info
        sampled = await client.open_session([hop], max_length=64, sampling=SamplingParams(
            max_new_tokens=24, temperature=0.8, seed=5), speculate=6)
        try:
            assert len([t async for t in sampled.tokens(prompt, 0)]) == 24
        finally:
            await sampled.close()

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4, draft_model=str(source.root)), body))
