"""Fuzz a live node with hostile requests while an honest session runs beside them.

The node runs in-process on its own event loop thread; hypothesis drives over a
thousand malformed or hostile messages at it through real hivemind streams. Each
must be refused with a clear error code, the node must keep serving, and the honest
session's outputs must stay exactly what a reference stage computes.
"""

from __future__ import annotations

import asyncio
import threading

import msgpack
import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.client.session import StageFailure, SwarmClient
from node.model.checkpoint import resolve_model
from node.model.stage import Stage
from node.net.membership import open_dht
from node.net.protocol import INFERENCE_HANDLER, ProtocolError, parse_open, unpack_metadata
from node.serve.node import Node, NodeConfig
from swarm.types import Hop

pytestmark = pytest.mark.timeout(600)

ERROR_CODES = {"bad_request", "bad_tensor", "bad_step", "too_long", "bad_range", "no_capacity", "busy"}
HIDDEN = 64  # the tiny checkpoint's hidden size (checked below)


class LiveNode:
    """A node and a client on a private event loop thread; `run(coro)` executes on that loop."""

    def __init__(self, source) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.source = source
        self.node = Node(source, NodeConfig(start=0, end=2, max_length=64))
        self.run(self.node.start())
        self.peer = open_dht(self.node.visible_maddrs, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
        self.client = SwarmClient(self.peer, source)
        self.hop = Hop(self.node.record.peer_id, 0, 2)

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.peer.shutdown()
        self.run(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=2)))
    assert source.hidden_size == HIDDEN
    node = LiveNode(source)
    yield node
    node.close()


def _tensor_proto(draw) -> runtime_pb2.Tensor:
    kind = draw(st.sampled_from(["valid_shape_wrong_dtype", "wrong_shape", "lying_header", "bad_compression",
                                 "nonfinite", "garbage"]))
    if kind == "valid_shape_wrong_dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64]))
        return serialize_torch_tensor(torch.zeros(1, 1, HIDDEN, dtype=dtype))
    if kind == "wrong_shape":
        shape = draw(st.lists(st.integers(0, 70), min_size=0, max_size=4).filter(lambda s: s != [1, 1, HIDDEN]))
        return serialize_torch_tensor(torch.zeros(*shape) if shape else torch.tensor(1.0))
    if kind == "lying_header":  # the header claims more (or other) data than the buffer holds
        proto = serialize_torch_tensor(torch.zeros(1, 1, HIDDEN))
        proto.buffer = proto.buffer[: draw(st.integers(0, len(proto.buffer) - 1))]
        return proto
    if kind == "bad_compression":
        proto = serialize_torch_tensor(torch.zeros(1, 1, HIDDEN))
        proto.compression = draw(st.sampled_from([1, 3, 4, 5]))
        return proto
    if kind == "nonfinite":
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return serialize_torch_tensor(torch.full((1, 1, HIDDEN), value))
    return runtime_pb2.Tensor(
        buffer=draw(st.binary(max_size=64)), size=draw(st.lists(st.integers(0, 2**31), max_size=4)),
        dtype=draw(st.sampled_from(["float32", "float16", "bogus", ""])),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def hostile_steps(draw) -> runtime_pb2.ExpertRequest:
    kind = draw(st.sampled_from(["metadata", "raw_metadata", "tensor", "position", "count"]))
    good_tensor = serialize_torch_tensor(torch.zeros(1, 1, HIDDEN))
    if kind == "metadata":
        metadata = msgpack.packb(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)))
        return runtime_pb2.ExpertRequest(metadata=metadata, tensors=[good_tensor])
    if kind == "raw_metadata":
        return runtime_pb2.ExpertRequest(metadata=draw(st.binary(min_size=1, max_size=40)), tensors=[good_tensor])
    if kind == "tensor":
        return runtime_pb2.ExpertRequest(metadata=msgpack.packb({"position": 0}), tensors=[_tensor_proto(draw)])
    if kind == "position":
        # In range but out of order (the session is at 0: "bad_step"), out of range, or not an integer at all.
        position = draw(st.one_of(st.integers(1, 63), st.integers(-(2**63), -1), st.integers(64, 2**63 - 1),
                                  st.floats(), st.text()))
        return runtime_pb2.ExpertRequest(metadata=msgpack.packb({"position": position}), tensors=[good_tensor])
    count = draw(st.sampled_from([0, 2, 3]))
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb({"position": 0}), tensors=[good_tensor] * count)


@st.composite
def hostile_opens(draw) -> runtime_pb2.ExpertRequest:
    opening = {"session_id": "x", "start": 0, "end": 2, "max_length": 8}
    key = draw(st.sampled_from(sorted(opening) + ["prev", "next", "relay", "wire"]))
    opening[key] = draw(json_values)
    if draw(st.booleans()):
        opening.pop(draw(st.sampled_from(["session_id", "start", "end", "max_length"])), None)
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb({"open": opening}))


class Honest:
    """An honest session that keeps stepping and checks every output against a reference stage."""

    def __init__(self, live: LiveNode) -> None:
        self.live = live
        self.reference = Stage(live.source, 0, 2, dtype=torch.float32, device=torch.device("cpu"))
        self.cache = self.reference.new_cache()
        self.session = live.run(live.client.open_session([live.hop], max_length=64))
        self.position = 0
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        if self.position >= 60:
            return
        x = torch.randn(1, 1, HIDDEN, generator=self.generator)
        got = self.live.run(self.session.step(x, self.position))
        assert torch.allclose(got, self.reference.forward(x, self.position, self.cache), atol=1e-5)
        self.position += 1


def _refusal_code(live: LiveNode, session, request) -> str:
    async def send():
        session.streams[0].send(request)
        with pytest.raises(StageFailure) as failure:
            await session._answer_from((0,), position=-1)
        return failure.value.code

    return live.run(send())


async def _open_refusal(live: LiveNode, request) -> str:
    p2p = await live.client.p2p()

    async def one():
        yield request

    responses = await p2p.iterate_protobuf_handler(
        PeerID.from_base58(live.hop.node_id), INFERENCE_HANDLER, one(), runtime_pb2.ExpertResponse
    )
    try:
        async for response in responses:
            return unpack_metadata(response).get("error", {}).get("code", "opened")
        return "closed"
    finally:
        await responses.aclose()  # release the stream now, not whenever it is garbage-collected


def test_a_thousand_hostile_requests_are_refused_and_the_honest_session_is_untouched(live):
    honest = Honest(live)
    hostile = {"session": live.run(live.client.open_session([live.hop], max_length=64))}
    seen_codes: set[str] = set()

    @settings(max_examples=900, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=hostile_steps())
    def hostile_step(request):
        code = _refusal_code(live, hostile["session"], request)
        assert code in ERROR_CODES, code
        seen_codes.add(code)
        honest.step()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=hostile_opens())
    @example(request=runtime_pb2.ExpertRequest(metadata=msgpack.packb(  # well-formed, past this node's layers
        {"open": {"session_id": "x", "start": 0, "end": 3, "max_length": 8}})))
    def hostile_open(request):
        code = live.run(_open_refusal(live, request))
        try:
            opened = parse_open(request, max_length_limit=64)
        except ProtocolError:
            assert code in ERROR_CODES, (code, msgpack.unpackb(request.metadata))  # a clear refusal
        else:
            if not 0 <= opened.start < opened.end <= 2:  # well-formed, but layers this node does not serve
                assert code == "bad_range", code
            else:  # accepted, or (id already in use) refused; we close our side at once
                assert code in {"opened", "closed", "bad_request"}, code
        honest.step()

    hostile_step()
    hostile_open()
    assert {"bad_request", "bad_tensor", "bad_step"} <= seen_codes
    # The node still serves: its hostile session is still usable and the honest one kept matching the reference.
    live.run(hostile["session"].step(torch.zeros(1, 1, HIDDEN), 0))
    assert honest.position >= 60
    live.run(asyncio.sleep(0.5))  # hostile opens that were valid end when their one-message streams close
    assert len(live.node.server.sessions) == 2


def test_strangers_at_the_direct_link_port_are_dropped_and_the_node_keeps_serving(live):
    """The port for direct links (node.net.direct) is open to anyone: whoever does not present a ticket this node
    handed out over libp2p is dropped, and nothing they send reaches a session."""
    honest = Honest(live)
    host, port = live.node.direct.addrs[0]
    visits = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=st.binary(max_size=300))
    def stranger(payload):
        async def visit() -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            if len(payload) < 16:
                writer.write_eof()  # no full ticket will ever come
            try:
                return await asyncio.wait_for(reader.read(), 10)  # the node closes on us: b""
            finally:
                writer.close()

        assert live.run(visit()) == b""
        visits.append(payload)
        honest.step()

    stranger()
    assert len(visits) >= 30 and honest.position == min(60, len(visits))
    assert live.node.server.direct_links == 0
    live.run(honest.session.close())
