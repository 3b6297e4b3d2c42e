"""The client side of the swarm: find servers, pick a chain, run a session through it.

The client relays every hop (client -> stage -> client); it owns the embedding and
the LM head (`node.head`), so servers see only hidden states.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch
from hivemind import DHT
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node.membership import list_servers
from node.protocol import INFERENCE_HANDLER, pack, raise_if_error
from swarm.records import ServerRecord
from swarm.types import Hop


class NoChainError(RuntimeError):
    pass


def any_chain(records: Sequence[ServerRecord], num_layers: int) -> list[Hop]:
    """A valid chain over whole server ranges, greedily reaching furthest at each step."""
    online = [r for r in records if r.state == "online"]
    chain: list[Hop] = []
    layer = 0
    while layer < num_layers:
        candidates = [r for r in online if r.start == layer]
        if not candidates:
            covered = sorted({(r.start, r.end) for r in online})
            raise NoChainError(f"no server starts at layer {layer} (ranges online: {covered or 'none'})")
        best = max(candidates, key=lambda r: (r.end, -r.queue_len, r.free_kv_tokens, r.peer_id))
        chain.append(Hop(best.peer_id, best.start, best.end))
        layer = best.end
    return chain


class _Stream:
    """One open inference stream to one server: send a request, await its answer."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (item := await self._outbox.get()) is not None:
            yield item

    async def open(self, p2p: P2P, session_id: str, max_length: int) -> None:
        self._responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(self.hop.node_id), INFERENCE_HANDLER, self._requests(), runtime_pb2.ExpertResponse
        )
        opening = {"session_id": session_id, "start": self.hop.start, "end": self.hop.end, "max_length": max_length}
        await self.call(pack({"open": opening}))

    async def call(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        assert self._responses is not None
        await self._outbox.put(request)
        try:
            response = await anext(self._responses)
        except StopAsyncIteration:
            raise ConnectionError(f"{self.hop.node_id} closed the stream") from None
        raise_if_error(self.hop.node_id, response)
        return response

    async def close(self) -> None:
        await self._outbox.put(None)


@dataclass
class ChainSession:
    """A session through a chain of stages; `step` runs hidden states through all of them."""

    chain: list[Hop]
    streams: list[_Stream]
    max_length: int

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        for stream in self.streams:
            response = await stream.call(pack({"position": position}, [hidden]))
            hidden = deserialize_torch_tensor(response.tensors[0])
        return hidden

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.streams), return_exceptions=True)


class SwarmClient:
    """A DHT client for one model's swarm."""

    def __init__(self, dht: DHT, model: str, num_layers: int) -> None:
        self.dht, self.model, self.num_layers = dht, model, num_layers
        self._p2p: P2P | None = None

    async def p2p(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        return self._p2p

    async def servers(self) -> list[ServerRecord]:
        return await list_servers(self.dht, self.model, num_layers=self.num_layers)

    async def choose_chain(self) -> list[Hop]:
        return any_chain(await self.servers(), self.num_layers)

    async def open_session(self, chain: list[Hop], *, max_length: int) -> ChainSession:
        p2p = await self.p2p()
        session_id = uuid.uuid4().hex
        streams = [_Stream(hop) for hop in chain]
        opened: list[_Stream] = []
        try:
            for stream in streams:
                await stream.open(p2p, session_id, max_length)
                opened.append(stream)
        except BaseException:
            await asyncio.gather(*(s.close() for s in opened), return_exceptions=True)
            raise
        return ChainSession(chain, streams, max_length)
