"""A real node on loopback refuses bad input with a clear error and keeps serving its other sessions."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from node.client.generate import generate
from node.client.session import ChainSession, StageFailure, SwarmClient, connect
from node.model.checkpoint import ModelNotFoundError, resolve_model
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.model.stage import Stage
from node.net.protocol import INFERENCE_HANDLER, pack
from node.serve.node import Node, NodeConfig
from node.serve.server import RateLimiter
from swarm.types import Hop

pytestmark = pytest.mark.timeout(180)


async def _with_node(source, config: NodeConfig, body):
    node = Node(source, config)
    await node.start()
    try:
        async with connect(node.visible_maddrs, source) as client:
            return await body(node, client)
    finally:
        await node.stop()


def test_bad_steps_are_refused_and_other_sessions_keep_working(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    hidden_size = source.hidden_size

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 4)
        honest = await client.open_session([hop], max_length=32)
        hostile = await client.open_session([hop], max_length=32)
        reference = Stage(source, 0, 4, dtype=torch.float32, device=torch.device("cpu"))
        cache = reference.new_cache()
        x = torch.randn(1, 5, hidden_size)
        assert torch.allclose(await honest.step(x, 0), reference.forward(x, 0, cache), atol=1e-5)

        bad_steps = [
            (pack({"position": 0}, [torch.randn(1, 1, hidden_size + 1)]), "bad_tensor"),  # wrong hidden size
            (pack({"position": 0}, [torch.ones(1, 1, hidden_size, dtype=torch.int64)]), "bad_tensor"),
            (pack({"position": 0}, [torch.full((1, 1, hidden_size), float("nan"))]), "bad_tensor"),
            (pack({"position": 3}, [torch.randn(1, 1, hidden_size)]), "bad_step"),  # out of order
            (pack({"position": 0}, [torch.randn(1, 40, hidden_size)]), "too_long"),  # over max_length
            (pack({"position": "zero"}, [torch.randn(1, 1, hidden_size)]), "bad_request"),
            (pack({"position": 0}, []), "bad_request"),
            (runtime_pb2.ExpertRequest(metadata=b"\xc1garbage"), "bad_request"),
        ]
        for request, code in bad_steps:
            assert await refusal(hostile, request) == code

        # The hostile session is still usable after its refused steps, and so is the honest one.
        await hostile.step(torch.randn(1, 2, hidden_size), 0)
        y = torch.randn(1, 1, hidden_size)
        assert torch.allclose(await honest.step(y, 5), reference.forward(y, 5, cache), atol=1e-5)
        # What the node reports of its work (benchmarks and status read it): refused steps never ran.
        info = await client.node_info(hop.node_id)
        assert info["state"] == "online" and (info["start"], info["end"]) == (0, 4)
        assert info["steps_served"] == 3 and info["decode_batches"] == {"1": 1} and info["compute_s"] > 0
        await honest.close()
        await hostile.close()

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4), body))


def test_session_over_the_memory_budget_gets_no_capacity(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    kv_per_token = Stage(source, 0, 4, dtype=torch.float32, device=torch.device("cpu")).shape.kv_bytes_per_token

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 4)
        first = await client.open_session([hop], max_length=80)  # a newcomer's share: 1/16 of 1280 tokens
        with pytest.raises(StageFailure) as error:
            await client.open_session([hop], max_length=80)
        assert error.value.code == "no_capacity"
        await first.step(torch.randn(1, 3, source.hidden_size), 0)  # the admitted session still works
        await first.close()
        await asyncio.sleep(0.2)  # closing frees the reservation
        again = await client.open_session([hop], max_length=80)
        await again.close()

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4, kv_budget_bytes=1280 * kv_per_token), body))


def test_wrong_range_is_refused(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))

    async def body(node: Node, client: SwarmClient):
        with pytest.raises(StageFailure) as error:
            await client.open_session([Hop(node.record.peer_id, 0, 3)], max_length=16)
        assert error.value.code == "bad_range"
        nameless = pack({"open": {"session_id": "", "start": 0, "end": 4, "max_length": 8}})
        assert b"session_id" in await _first_answer(client, node.record.peer_id, nameless)

    asyncio.run(_with_node(source, NodeConfig(start=0, end=2), body))


async def refusal(session: ChainSession, request) -> str:
    """Sends a raw request on the session's first stream and returns the error code it is answered with."""
    session.streams[0].send(request)
    with pytest.raises(StageFailure) as error:
        await session._answer_from((0,), position=-1)
    return error.value.code


async def _one(item):
    yield item


def test_layer_range_outside_the_model_and_unknown_model(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    with pytest.raises(ValueError, match="outside"):
        Stage(source, 2, 9, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ModelNotFoundError):
        resolve_model("no-such-org/no-such-model-xyz", allow_download=False)


def test_per_peer_limits_answer_busy(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))

    async def body(node: Node, client: SwarmClient):
        node.server.max_sessions_per_peer = 2
        hop = Hop(node.record.peer_id, 0, 4)
        sessions = [await client.open_session([hop], max_length=16) for _ in range(2)]
        with pytest.raises(StageFailure) as error:
            await client.open_session([hop], max_length=16)
        assert error.value.code == "busy"
        # A flood of steps beyond the rate limit is answered "busy", without touching the cache.
        node.server.step_limiter = RateLimiter(rate_per_s=0.001, burst=1)
        await sessions[0].step(torch.randn(1, 1, source.hidden_size), 0)
        assert await refusal(sessions[0], pack({"position": 1}, [torch.randn(1, 1, source.hidden_size)])) == "busy"
        for session in sessions:
            await session.close()

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4), body))


def test_rate_limiter_refills_over_time():
    limiter = RateLimiter(rate_per_s=1000.0, burst=3)
    assert [limiter.allow("p") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("other")  # buckets are per peer
    time.sleep(0.01)
    assert limiter.allow("p")


def test_one_node_ring_samples_itself_and_refuses_bad_token_steps(tiny_checkpoint):
    """A ring whose one stage is the whole model: it embeds the prompt, samples, and feeds itself each token."""
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))
    vocab = source.config.vocab_size
    prompt = [5, 17, 3, 99, 42]
    params = SamplingParams(max_new_tokens=8)
    reference = Stage(source, 0, 4, dtype=torch.float32, device=torch.device("cpu"))
    head = ClientHead(source)

    async def expected() -> list[int]:
        return [t async for t in generate(_LocalChain(reference), head, prompt, params)]

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 4)
        ring = await client.open_session([hop], max_length=32, sampling=params)
        assert [t async for t in ring.tokens(prompt, 0)] == await expected()
        await ring.close()

        hostile = await client.open_session([hop], max_length=32, sampling=params)
        bad_steps = [
            (pack({"position": 0, "tokens": [vocab]}), "bad_request"),  # outside the vocabulary
            (pack({"position": 0, "tokens": [-1, 2]}), "bad_request"),
            (pack({"position": 0, "tokens": []}), "bad_request"),
            (pack({"position": 0, "tokens": [1.5]}), "bad_request"),
            (pack({"position": 0, "tokens": [1], "sample": "yes"}), "bad_request"),
            (pack({"position": 0, "tokens": list(range(40))}), "too_long"),
            (pack({"position": 0}, [torch.randn(1, 1, source.hidden_size)]), "bad_request"),  # states, not ids
            (pack({"position": 4, "tokens": [1]}), "bad_step"),
        ]
        for request, code in bad_steps:
            assert await refusal(hostile, request) == code
        assert [t async for t in hostile.tokens(prompt, 0)] == await expected()  # still usable
        await hostile.close()

        # Flags that make no ring are refused at open (node.serve.role), and the node serves on.
        opening = {"session_id": "s", "start": 0, "end": 4, "max_length": 8, "sampling": params.to_wire()}
        for flags, words in [({"embed": True, "next": hop.node_id}, b"names no 'prev' or 'next'"),
                             ({"embed": True, "relay": True}, b"a relayed session cannot sample")]:
            answer = await _first_answer(client, hop.node_id, pack({"open": {**opening, **flags}}))
            assert b"bad_request" in answer and words in answer
        ring = await client.open_session([hop], max_length=32, sampling=params)
        assert [t async for t in ring.tokens(prompt, 0)] == await expected()
        await ring.close()

    asyncio.run(_with_node(source, NodeConfig(start=0, end=4), body))


async def _first_answer(client: SwarmClient, peer: str, request) -> bytes:
    """The metadata of a stage's first answer to a stream that sends `request` alone."""
    p2p = await client.p2p()
    responses = await p2p.iterate_protobuf_handler(PeerID.from_base58(peer), INFERENCE_HANDLER, _one(request),
                                                   runtime_pb2.ExpertResponse)
    try:
        async for response in responses:
            return response.metadata
        return b""
    finally:
        await responses.aclose()


def test_ring_ends_are_refused_where_the_node_does_not_hold_them(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))

    async def body(node: Node, client: SwarmClient):
        hop = Hop(node.record.peer_id, 0, 2)
        with pytest.raises(StageFailure, match="last stage") as error:  # layers 0:2 of 4 cannot sample
            await client.open_session([hop], max_length=16, sampling=SamplingParams(max_new_tokens=4))
        assert error.value.code == "bad_request"
        malformed = {"session_id": "s1", "start": 0, "end": 2, "max_length": 8, "embed": True,
                     "sampling": {"max_new_tokens": 0, "temperature": 0, "top_p": 1, "seed": None, "stop": []}}
        assert b"max_new_tokens must be >= 1" in await _first_answer(client, node.record.peer_id,
                                                                     pack({"open": malformed}))

    asyncio.run(_with_node(source, NodeConfig(start=0, end=2), body))


class _LocalChain:
    """A whole model in this process, as a chain for `node.client.generate` (the reference)."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.cache = stage, stage.new_cache()

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        return self.stage.forward(hidden, position, self.cache)
