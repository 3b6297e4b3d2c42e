"""The client side of the swarm: find servers, pick a chain, run a session through it.

A session runs in one of three ways (see `node.net.protocol`): as a ring, where the client
feeds the prompt's token ids and the chain's last stage samples each next token and
sends it back to the first stage itself; pushed stage to stage with the client
embedding and sampling (`node.model.head`); or relayed through the client, the fallback.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node.client.routing import believed, plan_chains
from node.model.checkpoint import ModelSource
from node.model.sampling import SamplingParams
from node.net.membership import SwarmPeer, open_dht
from node.net.probe import measure_rtt
from node.net.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PREFILL_CHUNK_TOKENS,
    RemoteError,
    digest,
    pack,
    ping,
    raise_if_error,
)
from node.net.timers import call_later_precisely
from node.net.wire import decode as wire_decode
from node.net.wire import for_links as wire_for_links
from swarm.records import ServerRecord
from swarm.types import Hop, ModelSpec

# Silence after which a waiting client pings its stages (see `node.net.protocol`): four times the last gap
# between answers, within these bounds, so a dead stage of a fast chain is found within a few tokens' time.
PING_AFTER_S = (0.05, 0.5)
SPEED_MAX_AGE_S = 300.0  # a node's measured speed is re-measured after this
SPEED_PROBE_TIMEOUT_S = 10.0
SPEED_PROBE_STEPS = 4
# Answers past the awaited position a client keeps per stage (a ring's tokens a stage sends ahead of another's,
# a speculating stage's kept draft): more than a stage honestly has in flight.
MAX_AHEAD_PER_STAGE = 64


class NoChainError(RuntimeError):
    """No chain can serve the model now. `uncovered_layers`: the layers no live online node serves; empty when
    each layer is served but still no chain formed (its nodes full, or banned after failing)."""

    def __init__(self, message: str, uncovered_layers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.uncovered_layers = tuple(uncovered_layers)


def coverage_summary(records: Sequence[ServerRecord]) -> str:
    ranges = sorted({(r.start, r.end) for r in records if r.state == "online"})
    return ", ".join(f"{a}:{b}" for a, b in ranges) or "none"


def session_room(records: Sequence[ServerRecord], num_layers: int) -> int | None:
    """The longest session, in tokens, the swarm's online nodes announce KV room for: per layer, the most free
    tokens of a node serving it; the least of those over the layers. None if a layer has no online node (then
    there is no chain at all, which choosing one reports)."""
    room: list[int | None] = [None] * num_layers
    for record in records:
        if record.state == "online":
            for layer in range(record.start, min(record.end, num_layers)):
                room[layer] = max(room[layer] or 0, record.free_kv_tokens)
    return None if None in room or not room else min(room)


def uncovered_layers(records: Sequence[ServerRecord], num_layers: int) -> list[int]:
    """The layers of [0, num_layers) that no online record serves."""
    online = [r for r in records if r.state == "online"]
    return [layer for layer in range(num_layers) if not any(r.start <= layer < r.end for r in online)]


class StageFailure(ConnectionError):
    """A stage of the chain broke, stalled or refused a step; `peer` is the stage at fault."""

    def __init__(self, peer: str, reason: str, code: str = "unreachable", reporter: str | None = None) -> None:
        super().__init__(f"stage {peer}: {reason}" + (f" (says {reporter})" if reporter not in (None, peer) else ""))
        self.peer, self.code = peer, code
        self.reporter = reporter or peer  # who says so: another stage's word is an accusation, not evidence

    @property
    def accusation(self) -> bool:
        return self.reporter != self.peer


class _Stream:
    """One open inference stream to one stage; answers are delivered to the session's event queue."""

    def __init__(self, hop: Hop, index: int, events: asyncio.Queue, send_delay_s: float = 0.0) -> None:
        self.hop, self.index, self.events = hop, index, events
        self.send_delay_s = send_delay_s
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self.opened: dict[str, Any] = {}  # the stage's answer to the open (its layers and compute dtype)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (item := await self._outbox.get()) is not None:
            yield item

    async def open(self, p2p: P2P, opening: dict) -> None:
        """Sends the opening request and waits for the stage to accept it."""
        self.send(pack({"open": opening}))
        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(self.hop.node_id), INFERENCE_HANDLER, self._requests(), runtime_pb2.ExpertResponse
        )
        try:
            first = await anext(responses)
        except StopAsyncIteration:
            raise StageFailure(self.hop.node_id, "closed the stream while opening") from None
        self.opened = raise_if_error(self.hop.node_id, first)
        self._reader = asyncio.create_task(self._read(responses))

    async def _read(self, responses: AsyncIterator[runtime_pb2.ExpertResponse]) -> None:
        try:
            async for response in responses:
                self.events.put_nowait((self.index, response))
            failure = StageFailure(self.hop.node_id, "closed the stream")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failure = StageFailure(self.hop.node_id, f"stream broke: {e}")
        self.events.put_nowait((self.index, failure))

    def send(self, request: runtime_pb2.ExpertRequest) -> None:
        if self.send_delay_s > 0:  # emulated one-way link latency (tests and benchmarks)
            call_later_precisely(self.send_delay_s, self._outbox.put_nowait, request)
        else:
            self._outbox.put_nowait(request)

    def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()


class ChainSession:
    """A session through a chain of stages.

    Opened as a ring (`sampling` given), `tokens` feeds token ids and yields what the last
    stage samples. Otherwise `step` runs hidden states through every stage: in push mode
    the client sends a step to the first stage and awaits the last stage's answer; in relay
    mode it carries each stage's output to the next itself.
    """

    def __init__(self, chain: list[Hop], streams: list[_Stream], events: asyncio.Queue, *, max_length: int,
                 relay: bool, wire: str, step_timeout_s: float, sampling: SamplingParams | None = None) -> None:
        self.chain, self.streams, self.events = chain, streams, events
        self.max_length, self.relay, self.wire = max_length, relay, wire
        self.step_timeout_s = step_timeout_s
        self.sampling = sampling
        self._ping_after_s = PING_AFTER_S[1]
        self._last_answer_at: float | None = None
        # Answers for positions past the one awaited, kept until it is their turn: the streams of different stages
        # do not keep order between them (a ring's first token comes from its last stage, the next ones from its
        # first stage when they share the head, and the second may arrive first).
        self._ahead: list[tuple[int, dict[str, Any], runtime_pb2.ExpertResponse]] = []
        self.ledger = None  # the stages' receipts, once `node.client.verify.attach_ledger` swapped the queue for one

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self.sampling is not None:
            raise RuntimeError("a ring session takes token ids (tokens), not hidden states")
        if self.relay:
            for stream in self.streams:
                self._send(stream, hidden, position)
                hidden = wire_decode((await self._answer_from((stream.index,), position))[1].tensors[0])
            return hidden
        self._send(self.streams[0], hidden, position)
        return wire_decode((await self._answer_from((len(self.streams) - 1,), position))[1].tensors[0])

    async def embed_step(self, token_ids: Sequence[int], position: int) -> torch.Tensor:
        """A one-stage session opened with `embed` (not a ring): the stage's output on these token ids."""
        self.streams[0].send(pack({"position": position, "tokens": list(token_ids)}))
        return wire_decode((await self._answer_from((0,), position))[1].tensors[0])

    async def sampled_token(self, hidden: torch.Tensor, position: int, *, sample: bool,
                            draft: Sequence[int] = ()) -> int | None:
        """A one-stage check of a ring's sampling (opened with `sampling` at the model's end, not at layer 0): sends
        `hidden` from `position`; with `sample`, returns the token the stage samples after it. Its output comes as
        an echo (a ledger keeps it). With `draft` (a check of a speculating ring's step: its last len(draft) rows
        ran the draft; the session opened with `speculate`), the first token it samples, at the draft's first
        position: the draft tokens it keeps, then its own, come one a position (`next_token`)."""
        self._send(self.streams[0], hidden, position, sample=sample, draft=draft)
        if not sample:
            return None
        return await self.next_token(position + hidden.shape[1] - len(draft))

    async def next_token(self, position: int) -> int:
        """The token a check of a ring's sampling sampled at `position`."""
        metadata, _, _ = await self._answer_from((0,), position, "token")
        token = metadata["token"]
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise StageFailure(self.chain[0].node_id, f"sent a malformed token {token!r}", code="bad_response")
        return token

    def _send(self, stream: _Stream, hidden: torch.Tensor, position: int, *, sample: bool = False,
              draft: Sequence[int] = ()) -> None:
        message = pack({"position": position, **({"sample": True} if sample else {}),
                        **({"draft": list(draft)} if draft else {})}, [hidden], wire=self.wire)
        if self.ledger is not None:  # what the stage will say it received: the tensor as it decodes it
            self.ledger.feed(stream.index, position, digest(wire_decode(message.tensors[0])))
        stream.send(message)

    async def tokens(self, token_ids: Sequence[int], position: int) -> AsyncIterator[int]:
        """A ring: feeds `token_ids` from `position` to the first stage, then yields each token the chain
        samples (at its last stage, or its first when they share the head), up to the one that ends generation
        (a stop token, max_new_tokens or max_length)."""
        if self.sampling is None:
            raise RuntimeError("tokens needs a session opened as a ring (open_session(..., sampling=...))")
        offsets = range(0, len(token_ids), PREFILL_CHUNK_TOKENS)
        for offset in offsets:
            step: dict[str, Any] = {"position": position + offset,
                                    "tokens": list(token_ids[offset: offset + PREFILL_CHUNK_TOKENS])}
            if offset == offsets[-1]:
                step["sample"] = True
            if self.ledger is not None:
                self.ledger.feed_tokens(step["position"], step["tokens"])
            self.streams[0].send(pack(step))
        position += len(token_ids)
        for produced in range(1, self.sampling.max_new_tokens + 1):
            metadata, _, source = await self._answer_from((0, len(self.streams) - 1), position, "token")
            token = metadata["token"]
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise StageFailure(self.chain[source].node_id, f"sent a malformed token {token!r}",
                                   code="bad_response")
            if self.ledger is not None:  # the first stage must say it ran the token announced, and nothing else
                self.ledger.feed_tokens(position, [token], sender=source)
            yield token
            position += 1
            if self.sampling.is_last(token, produced) or position >= self.max_length:
                return

    async def _answer_from(self, indices: Sequence[int], position: int, field: str | None = None
                           ) -> tuple[dict[str, Any], runtime_pb2.ExpertResponse, int]:
        """Waits for the answer at `position` of one of the stages `indices`: hidden states, or with `field` a
        message carrying that field; returns it with the index of the stage that sent it. Any stage's error or
        silence raises StageFailure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.step_timeout_s
        if (found := self._take_ahead(indices, position, field)) is not None:
            return found
        while True:
            wait_s = max(0.0, min(self._ping_after_s, deadline - loop.time()))
            try:
                source, item = await asyncio.wait_for(self.events.get(), wait_s)
            except asyncio.TimeoutError:
                if loop.time() < deadline:  # a stage that died while no one was writing to it is found now
                    for stream in self.streams:
                        stream.send(ping())
                    continue
                raise StageFailure(self.chain[indices[-1]].node_id, f"no answer in {self.step_timeout_s:.0f} s",
                                   code="timeout") from None
            peer = self.chain[source].node_id
            if isinstance(item, StageFailure):
                raise item
            try:
                metadata = raise_if_error(peer, item)
            except RemoteError as e:
                raise StageFailure(e.peer, e.message, code=e.code, reporter=e.reporter) from e
            at = metadata.get("position")
            if type(at) is int and at > position:
                self._hold_ahead(source, metadata, item)
            elif source in indices and at == position and _answers(metadata, item, field):
                return self._answered(metadata, item, source)

    def _answered(self, metadata: dict[str, Any], item: runtime_pb2.ExpertResponse, source: int
                  ) -> tuple[dict[str, Any], runtime_pb2.ExpertResponse, int]:
        now = asyncio.get_running_loop().time()
        if self._last_answer_at is not None:
            low, high = PING_AFTER_S
            self._ping_after_s = min(high, max(low, 4 * (now - self._last_answer_at)))
        self._last_answer_at = now
        return metadata, item, source

    def _hold_ahead(self, source: int, metadata: dict[str, Any], item: runtime_pb2.ExpertResponse) -> None:
        """Keeps an answer that came before its turn; a stage gets MAX_AHEAD_PER_STAGE of them, and what it sends
        past that is dropped (it can only delay its own answers so)."""
        if sum(held == source for held, _, _ in self._ahead) < MAX_AHEAD_PER_STAGE:
            self._ahead.append((source, metadata, item))

    def _take_ahead(self, indices: Sequence[int], position: int, field: str | None
                    ) -> tuple[dict[str, Any], runtime_pb2.ExpertResponse, int] | None:
        """The held answer awaited now, if one is held; answers held for positions now past are dropped."""
        found, kept = None, []
        for source, metadata, item in self._ahead:
            at = metadata["position"]
            if found is None and source in indices and at == position and _answers(metadata, item, field):
                found = (metadata, item, source)
            elif at > position:
                kept.append((source, metadata, item))
        self._ahead = kept
        return None if found is None else self._answered(*found)

    async def close(self) -> None:
        for stream in self.streams:
            stream.close()


def _answers(metadata: dict[str, Any], item: runtime_pb2.ExpertResponse, field: str | None) -> bool:
    """Whether an answer at the awaited position is the kind awaited: one carrying `field`, or hidden states."""
    return field in metadata if field is not None else len(item.tensors) == 1


class SwarmClient:
    """A DHT client for one model's swarm."""

    def __init__(self, peer: SwarmPeer, source: ModelSource, *, send_delay_s: float = 0.0) -> None:
        self.peer, self.model, self.num_layers = peer, source.name, source.num_layers
        # What the router needs of the model: hidden states' size on the wire (fp32 on CPU swarms).
        self.spec = ModelSpec(source.name, source.num_layers, source.hidden_size, layer_bytes=0.0,
                              kv_bytes_per_token_per_layer=0.0, wire_bytes_per_element=4)
        self.send_delay_s = send_delay_s  # emulated one-way latency on every message this client sends
        self._p2p: P2P | None = None
        self._banned_until: dict[str, float] = {}
        self._stalled_at: dict[str, float] = {}  # peer -> when it last stalled a session of this client (alive)
        self.checked_credit: dict[str, int] = {}  # node -> tokens this client's checks vouch for (node.net.credit)
        self._credit_published: dict[str, int] = {}
        self._rtt_s: dict[str, tuple[float, float]] = {}  # peer -> (rtt, measured at)
        self._uplink_bps: dict[str, float] = {}  # as announced in the records last read
        self._speed_s: dict[str, tuple[float | None, float]] = {}  # peer -> (measured s per layer or None, at)

    async def p2p(self) -> P2P:
        if self._p2p is None:
            self._p2p = await self.peer.dht.replicate_p2p()
        return self._p2p

    async def close(self) -> None:
        """Closes this client's connections to the p2p daemon, on the loop that opened them (left to the
        garbage collector, they are closed after that loop is gone, and fail noisily). The DHT stays up."""
        if self._p2p is not None:
            await self._p2p.shutdown()
            self._p2p = None

    async def servers(self) -> list[ServerRecord]:
        """The swarm's records but those of proven liars: a published proof that checks out (node.net.evidence)
        keeps a node out of every chain and check of every client that reads it."""
        records = await self.peer.list_servers(self.model, num_layers=self.num_layers)
        return await self.peer.proof_book(self.model).drop_liars(records)

    async def publish_credit(self) -> None:
        """Publishes this client's checked-credit tally if it grew since it was last published."""
        if self.checked_credit != self._credit_published:
            tally = dict(self.checked_credit)
            if await self.peer.publish_credit(self.model, tally):
                self._credit_published = tally

    async def session_room(self) -> int | None:
        """The longest session the swarm can hold now, by its records (`session_room`)."""
        return session_room(await self.servers(), self.num_layers)

    async def node_info(self, peer: str, timeout_s: float = 10.0) -> dict:
        """What a node says of itself now: its layers, state, sessions, queue and work done."""
        p2p = await self.p2p()
        response = await asyncio.wait_for(p2p.call_protobuf_handler(
            PeerID.from_base58(peer), INFO_HANDLER, pack({}), runtime_pb2.ExpertResponse), timeout_s)
        return raise_if_error(peer, response)

    def ban(self, peer: str, for_s: float = 120.0) -> None:
        """Keeps a failed peer out of this client's chains (its DHT record may outlive it by a TTL); a longer ban
        already in force stays."""
        self._banned_until[peer] = max(self._banned_until.get(peer, 0.0), time.monotonic() + for_s)

    def first_stall(self, peer: str, within_s: float) -> bool:
        """Records that `peer` stalled a session now; True unless it already had within the last `within_s`."""
        now = time.monotonic()
        self._stalled_at = {p: at for p, at in self._stalled_at.items() if now - at < within_s}  # bounded by time
        first = peer not in self._stalled_at
        self._stalled_at[peer] = now
        return first

    @property
    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(peer for peer, until in self._banned_until.items() if until > now)

    def wire_for(self, chain: list[Hop]) -> str:
        """The wire codec the chain's slowest announced uplink calls for (see `node.net.wire.for_links`)."""
        return wire_for_links([self._uplink_bps.get(hop.node_id, 0.0) for hop in chain])

    async def choose_chain(self, *, session_tokens: int = 0, relay: bool = False) -> list[Hop]:
        """The chain of least expected latency (`swarm.router`) over live records and our measured RTTs."""
        records = await self.servers()
        self._uplink_bps = {r.peer_id: r.uplink_bps for r in records}
        banned = self.banned
        candidates = [r for r in records if r.state == "online" and r.peer_id not in banned]
        await self._measure_rtts([r.peer_id for r in candidates])
        await self._measure_speeds(candidates)
        records = [believed(r, self._speed_s.get(r.peer_id, (None, 0.0))[0]) for r in records]
        chains = plan_chains(self.spec, records, {peer: rtt for peer, (rtt, _) in self._rtt_s.items()},
                             exclude=banned, session_tokens=session_tokens, relay=relay, alternates=0)
        if not chains:
            live = [r for r in records if r.peer_id not in banned]
            raise NoChainError(f"no chain covers layers 0:{self.num_layers} of {self.model} "
                               f"(ranges online: {coverage_summary(live)})", uncovered_layers(live, self.num_layers))
        return chains[0]

    async def _measure_rtts(self, peers: list[str], max_age_s: float = 60.0) -> None:
        """Pings peers we have no fresh RTT for, all at once; a peer that does not answer keeps the default."""
        now = time.monotonic()
        stale = [p for p in peers if p not in self._rtt_s or now - self._rtt_s[p][1] > max_age_s]
        if not stale:
            return
        p2p = await self.p2p()
        results = await asyncio.gather(
            *(measure_rtt(p2p, PeerID.from_base58(peer), n=2, timeout_s=2.0) for peer in stale),
            return_exceptions=True,
        )
        for peer, result in zip(stale, results, strict=True):
            if isinstance(result, float):
                self._rtt_s[peer] = (result, now)

    async def _measure_speeds(self, records: Sequence[ServerRecord]) -> None:
        """Times one decode step on one layer of each node we have no fresh figure for, all at once: what a node
        delivers bounds what its record claims (`node.client.routing.believed`). A node that refuses or fails
        the probe is recorded as unmeasured."""
        now = time.monotonic()
        stale = [r for r in records if r.peer_id not in self._speed_s or now - self._speed_s[r.peer_id][1] >
                 SPEED_MAX_AGE_S]
        if not stale:
            return
        results = await asyncio.gather(*(self._probe_speed(r) for r in stale), return_exceptions=True)
        for record, result in zip(stale, results, strict=True):
            self._speed_s[record.peer_id] = (result if isinstance(result, float) else None, now)

    async def _probe_speed(self, record: ServerRecord) -> float:
        """Seconds a node takes for a decode step of one layer: the best of SPEED_PROBE_STEPS steps of a relayed
        one-layer session (the best, as other work on either machine only ever adds), less our RTT to it."""
        hop = Hop(record.peer_id, record.start, record.start + 1)
        async with asyncio.timeout(SPEED_PROBE_TIMEOUT_S):
            session = await self.open_session([hop], max_length=SPEED_PROBE_STEPS, relay=True,
                                              step_timeout_s=SPEED_PROBE_TIMEOUT_S)
            try:
                hidden = 0.02 * torch.randn(1, 1, self.spec.hidden_size)
                times = []
                for position in range(SPEED_PROBE_STEPS):
                    started = time.perf_counter()
                    await session.step(hidden, position)
                    times.append(time.perf_counter() - started)
            finally:
                await session.close()
        rtt = self._rtt_s.get(record.peer_id, (0.0, 0.0))[0]
        return max(min(times) - rtt, 0.0)

    async def open_session(self, chain: list[Hop], *, max_length: int, relay: bool = False, wire: str = "none",
                           step_timeout_s: float = 60.0, embed: bool = False,
                           sampling: SamplingParams | None = None, share_head: bool = True,
                           speculate: int = 0) -> ChainSession:
        """Opens the session on every stage at once (in push mode a stage may start its push link
        before its successor has seen the session; the successor waits for it). `embed`: a one-stage session at
        layer 0 that takes token ids (`ChainSession.embed_step`: a check of a ring's first stage). `sampling`: open
        it as a ring whose last stage samples with these parameters (`ChainSession.tokens`); `share_head=False`
        keeps the LM head's work whole at the last stage (see `node.net.protocol`: head sharing). `speculate`: a ring
        whose first stage drafts up to that many tokens a round, verified at its last stage (`node.net.protocol`:
        speculation)."""
        if speculate and sampling is None:
            raise ValueError("only a ring speculates: give its sampling")
        if sampling is not None and relay:
            raise ValueError("a ring session is not relayed")
        p2p = await self.p2p()
        session_id = uuid.uuid4().hex
        events: asyncio.Queue = asyncio.Queue()
        streams = [_Stream(hop, i, events, self.send_delay_s) for i, hop in enumerate(chain)]

        ring = sampling is not None and len(chain) > 1  # a ring's ends are each other's neighbours
        around = [chain[-1], *chain, chain[0]] if ring else [None, *chain, None]

        def opening(i: int) -> dict:
            hop = chain[i]
            first, last = i == 0, i + 1 == len(chain)
            prev, nxt = around[i], around[i + 2]  # chain[i] sits at around[i + 1]
            fields = {
                "session_id": session_id, "start": hop.start, "end": hop.end, "max_length": max_length,
                "prev": prev.node_id if prev else None, "next": nxt.node_id if nxt else None,
                "relay": relay, "wire": wire, **({"embed": True} if embed else {}),
                **({"speculate": speculate} if speculate else {}),
            }
            if sampling is not None and first and hop.start == 0:  # it samples too when it shares the head
                fields.update(embed=True, sampling=sampling.to_wire(), share_head=share_head)
            if sampling is not None and last:
                fields["sampling"] = sampling.to_wire()
            return fields

        async def open_one(i: int, stream: _Stream) -> None:
            try:  # a stage killed or stalled mid-handshake may never answer nor close: its open must not hang
                await asyncio.wait_for(stream.open(p2p, opening(i)), step_timeout_s)
            except asyncio.TimeoutError:
                raise StageFailure(stream.hop.node_id, f"no answer to the opening in {step_timeout_s:.0f} s",
                                   "timeout") from None

        results = await asyncio.gather(*(open_one(i, stream) for i, stream in enumerate(streams)),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for stream in streams:
                stream.close()
            failure = failures[0]
            if isinstance(failure, RemoteError):
                raise StageFailure(failure.peer, failure.message, code=failure.code) from failure
            if isinstance(failure, StageFailure | asyncio.CancelledError):
                raise failure
            raise StageFailure(chain[results.index(failure)].node_id, f"cannot open: {failure}") from failure
        return ChainSession(chain, streams, events, max_length=max_length, relay=relay, wire=wire,
                            step_timeout_s=step_timeout_s, sampling=sampling)


@asynccontextmanager
async def connect(initial_peers: Sequence[str], source: ModelSource, *,
                  host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                  send_delay_s: float = 0.0) -> AsyncIterator[SwarmClient]:
    """A client of the swarm that `initial_peers` lead to: its own client-mode DHT peer listening on
    `host_maddrs`, and a `SwarmClient` on it, its p2p replica made on this loop; both closed on exit."""
    peer = await asyncio.to_thread(open_dht, list(initial_peers), list(host_maddrs), client_mode=True)
    client = SwarmClient(peer, source, send_delay_s=send_delay_s)
    try:
        await client.p2p()  # now, on this loop, rather than racing on the first requests
        yield client
    finally:
        await client.close()
        peer.shutdown()
