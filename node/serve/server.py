"""Serving a stage over hivemind's P2P streams: sessions, their KV caches, a memory budget, push links.

Each session has an outbox: whatever the client should hear (the opening answer,
errors, and — at the chain's last stage or in relay mode — step outputs, or a ring's
sampled tokens) is queued there and written to the client's stream. Steps arrive from
the client's stream or from the previous stage's push stream (a ring's first stage
takes both: the prompt from the client, then each token from the last stage); all of
them run `_process_step`.
Compute runs on one worker thread, so the event loop stays free to accept, validate
and forward other sessions' traffic while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from node.model.draft import DraftModel
from node.model.sampling import SamplingParams, sample
from node.model.speculative import MAX_DRAFT_TOKENS, DraftLength, propose_draft, verify_draft
from node.model.stage import Stage
from node.net.direct import DirectLinkError, DirectListener, DirectOffer, DirectWriter, dial, maddr_hosts
from node.net.evidence import (
    EvidenceError,
    ReceiptSigner,
    check_receipt,
    check_token,
    sampling_bytes,
    session_key,
    wire_digest,
)
from node.net.protocol import (
    MAX_ERROR_CHARS,
    PUSH_HANDLER,
    HeadInput,
    OpenSession,
    ProtocolError,
    PushOffer,
    Step,
    digest,
    direct_switch,
    error_response,
    is_direct_switch,
    is_head_message,
    is_ping,
    pack,
    pack_response,
    parse_head_message,
    parse_open,
    parse_push_offer,
    parse_push_open,
    parse_step,
    push_endorsement,
    push_offer,
    push_open,
    unpack_metadata,
)
from node.net.steptrace import mark
from node.net.timers import call_later_precisely
from node.serve.admission import RECLAIM_IDLE_S, CapacityError, FairBudget
from node.serve.adversary import Adversary
from node.serve.batching import StepBatcher
from node.serve.role import Ring, SessionRole, session_role

logger = logging.getLogger(__name__)


class EmulatedLink:
    """This node's uplink as WAN tests emulate it (the kernel here has no netem): every message it sends
    queues behind the previous ones for its bytes at `bandwidth_bps`, then travels `delay_s`."""

    def __init__(self, delay_s: float = 0.0, bandwidth_bps: float = 0.0) -> None:
        self.delay_s, self.bandwidth_bps = delay_s, bandwidth_bps
        self._free_at = 0.0

    @property
    def active(self) -> bool:
        return self.delay_s > 0 or self.bandwidth_bps > 0

    def arrival_in(self, nbytes: int) -> float:
        now = asyncio.get_running_loop().time()
        departs = now
        if self.bandwidth_bps > 0:
            self._free_at = max(now, self._free_at) + nbytes * 8 / self.bandwidth_bps
            departs = self._free_at
        return departs - now + self.delay_s


class Outbox:
    """Messages for one stream, sent through the node's emulated link when there is one. Bounded: a peer that
    does not read what it is sent lets at most `MAX_ITEMS` messages or `MAX_BYTES` pile up here; past that, the
    outbox gives up (`on_overflow` is called: the session is dropped) rather than grow."""

    MAX_ITEMS = 1024
    MAX_BYTES = 32 << 20  # a few prefill chunks' outputs; a reading peer keeps this near empty

    def __init__(self, link: EmulatedLink | None = None, *, on_overflow: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.link = link
        self.on_overflow = on_overflow
        self.items = self.bytes = 0
        self.overflowed = False

    def put(self, item) -> None:
        if self.overflowed:
            return
        if item is None:
            self.queue.put_nowait(None)
            return
        size = item.ByteSize()
        if self.items >= self.MAX_ITEMS or self.bytes + size > self.MAX_BYTES:
            self._overflow()
            return
        self.items, self.bytes = self.items + 1, self.bytes + size
        if self.link is not None and self.link.active:
            # Arrival times only grow, so messages stay in order; the sender is not held up meanwhile.
            call_later_precisely(self.link.arrival_in(size), self.queue.put_nowait, item)
        else:
            self.queue.put_nowait(item)

    def _overflow(self) -> None:
        self.overflowed = True
        while not self.queue.empty():  # what the peer did not read goes now, not when the session ends
            self.queue.get_nowait()
        self.items = self.bytes = 0
        self.queue.put_nowait(error_response("slow_reader", f"more than {self.MAX_ITEMS} messages or "
                                             f"{self.MAX_BYTES} bytes were waiting to be read; session dropped"))
        self.queue.put_nowait(None)
        if self.on_overflow is not None:
            self.on_overflow()

    async def drain(self) -> AsyncIterator:
        while (item := await self.queue.get()) is not None:
            if not self.overflowed:
                self.items, self.bytes = self.items - 1, self.bytes - item.ByteSize()
            yield item


@dataclass
class Session:
    opened: OpenSession
    role: SessionRole
    client: str
    reserved_bytes: int
    newcomer: bool  # the reservation counts in the pool of peers new to this node (see node.serve.admission)
    cache: object
    outbox: Outbox
    position: int = 0
    last_active: float = field(default_factory=time.monotonic)
    push_link: PushLink | None = None
    produced: int = 0  # tokens this stage sampled (a ring's last stage, or its first when they share the head)
    # The step on the token this stage just sampled, when it feeds itself: held so the task is not collected.
    feeding: asyncio.Task | None = None
    # Head sharing (see node.net.protocol), at a ring's first stage: (position, the logits of its own rows for the
    # token there), waiting for the last stage's part.
    own_head_logits: tuple[int, torch.Tensor] | None = None
    # Speculation, at a ring's stage that embeds (see node.net.protocol): the tokens at each position so far, how
    # long a draft to make, and the draft in flight: (its first position, its length, when its round started).
    history: list[int] = field(default_factory=list)
    drafts: DraftLength | None = None
    draft_at: tuple[int, int, float] | None = None
    signer: ReceiptSigner | None = None  # signs this session's receipts (node.net.evidence)
    # The previous stage's session key, which signs what it pushes: endorsed on its push stream's opening, checked
    # at the first pushed step of hidden states.
    pusher_endorsement: object = None
    pusher_key: Ed25519PublicKey | None = None

    @property
    def session_id(self) -> str:
        return self.opened.session_id

    @functools.cached_property
    def signed_sampling(self) -> bytes:
        """The session's sampling parameters as token receipts sign them."""
        params = self.opened.sampling
        return sampling_bytes(params.temperature, params.top_p, params.seed)

    @property
    def key(self) -> tuple[str, str]:
        """Session ids are the client's own: another peer may use the same one (it cannot squat this one)."""
        return self.client, self.opened.session_id


class PushLink:
    """The stream on which a stage pushes one session's outputs to the next stage.

    It is opened as soon as the session is, in the background, so the first token does
    not wait for a stream setup; steps queue in the outbox meanwhile. When the next stage
    offers a direct link (`node.net.direct`) and `direct` allows, later steps go over that.
    """

    def __init__(self, session: Session, link: EmulatedLink, *, direct: bool = False,
                 on_failure: Callable[[], None] = lambda: None) -> None:
        self.session = session
        self.on_failure = on_failure  # a push that could not reach the next stage: the node re-measures its links
        self.link = link
        self.outbox = Outbox(link, on_overflow=self._next_stage_stalled)
        self.allow_direct = direct
        self._watcher: asyncio.Task | None = None
        self._dialer: asyncio.Task | None = None
        self._p2p: P2P | None = None
        self._direct: DirectWriter | None = None
        self.head_split: int | None = None  # the next stage (a ring's first) holds the LM head's rows [0, split)

    def start(self, p2p: P2P) -> None:
        self._p2p = p2p
        self._watcher = asyncio.create_task(self._run(p2p))

    async def _run(self, p2p: P2P) -> None:
        next_peer = self.session.opened.next_peer
        self.outbox.put(push_open(self.session.session_id, self.session.client, self.session.signer.endorsement))
        try:
            responses = await p2p.iterate_protobuf_handler(
                PeerID.from_base58(next_peer), PUSH_HANDLER, self.outbox.drain(), runtime_pb2.ExpertResponse
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.on_failure()
            self.session.outbox.put(
                error_response("push_failed", f"cannot reach the next stage {next_peer}: {e}", peer=next_peer)
            )
            return
        await self._watch(responses)

    async def _watch(self, responses: AsyncIterator[runtime_pb2.ExpertResponse]) -> None:
        """The next stage answers a push stream with its offer (`PushOffer`: a direct link, head sharing) or to
        refuse it; a refusal, a malformed answer or a broken stream is reported."""
        next_peer = self.session.opened.next_peer
        offered = False
        try:
            async for response in responses:
                offer = parse_push_offer(unpack_metadata(response))
                if offer is not None and not offered:
                    offered, self.head_split = True, offer.head_split
                    if offer.direct is not None and self.allow_direct:
                        self._dialer = asyncio.create_task(self._go_direct(offer.direct))
                    continue
                self.session.outbox.put(_with_peer(response, next_peer))
                return
        except asyncio.CancelledError:
            raise
        except ProtocolError as e:
            self.session.outbox.put(error_response(e.code, f"the next stage answered: {e}", peer=next_peer))
        except Exception as e:
            self.on_failure()
            self.session.outbox.put(
                error_response("push_failed", f"cannot reach the next stage {next_peer}: {e}", peer=next_peer)
            )

    async def _go_direct(self, offer: DirectOffer) -> None:
        try:
            writer = await dial(offer, await self._next_peer_hosts())
        except DirectLinkError as e:  # e.g. behind NAT, or a listener that fails the handshake: libp2p serves on
            logger.info("no direct link to %s, pushing over libp2p: %s", self.session.opened.next_peer, e)
            return
        self.outbox.put(direct_switch())  # the receiver reads the link only after this, so order holds
        self._direct = writer

    async def _next_peer_hosts(self) -> list[str]:
        """Where libp2p sees the next stage (it has just answered us): the only hosts its offer may name."""
        peer = PeerID.from_base58(self.session.opened.next_peer)
        return maddr_hosts([str(a) for info in await self._p2p.list_peers() if info.peer_id == peer
                            for a in info.addrs])

    def _next_stage_stalled(self) -> None:
        next_peer = self.session.opened.next_peer
        self.session.outbox.put(error_response("push_failed", f"the next stage {next_peer} does not take its pushes",
                                               peer=next_peer))
        self.session.outbox.put(None)

    @property
    def sends_at_once(self) -> bool:
        """Whether `send` puts a message on the wire before it returns (a direct link, no emulated delay), rather
        than leaving it to a task of the event loop."""
        return self._direct is not None and not self.link.active

    def send(self, request: runtime_pb2.ExpertRequest) -> None:
        if self._direct is None:
            self.outbox.put(request)
        elif self.link.active:  # emulated WAN: the same link's delays, so arrivals stay in order
            call_later_precisely(self.link.arrival_in(request.ByteSize()), self._direct.send, request)
        else:
            self._direct.send(request)

    def close(self) -> None:
        self.outbox.queue.put_nowait(None)
        for task in (self._watcher, self._dialer):
            if task is not None:
                task.cancel()
        if self._direct is not None:
            self._direct.close()


def _with_peer(response: runtime_pb2.ExpertResponse, peer: str) -> runtime_pb2.ExpertResponse:
    """The next stage's answer on a push stream, passed to our client naming that stage (its text bounded)."""
    try:
        error = unpack_metadata(response).get("error")
    except ProtocolError:
        error = None
    error = error if isinstance(error, dict) else {}
    return error_response(str(error.get("code", "push_failed"))[:32], str(error.get("message", ""))[:MAX_ERROR_CHARS],
                          peer=peer)


class SessionWaiters:
    """Push streams waiting for the session they feed to open (the client opens all stages at once, so a push
    may come first): each waits on a future the opening resolves, not by polling."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future]] = {}

    async def wait(self, session_id: str, find: Callable[[], Session | None], timeout_s: float = 10.0
                   ) -> Session | None:
        """`find()` once a session `session_id` opens (or at once), None after `timeout_s` without one."""
        deadline = time.monotonic() + timeout_s
        while (found := find()) is None and (left := deadline - time.monotonic()) > 0:
            future = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(session_id, []).append(future)
            try:
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                pass
            finally:
                waiting = self._waiting.get(session_id, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._waiting.pop(session_id, None)
        return found

    def opened(self, session_id: str) -> None:
        for future in self._waiting.get(session_id, ()):
            if not future.done():
                future.set_result(None)


class RateLimiter:
    """A token bucket per peer: `allow(peer)` spends one token, refilled at `rate_per_s` up to `burst`."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, at)

    def allow(self, peer: str) -> bool:
        now = time.monotonic()
        tokens, at = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if len(self._buckets) > 10_000:  # forget idle peers rather than grow without bound
            self._buckets = {p: v for p, v in self._buckets.items() if now - v[1] < 60}
        allowed = tokens >= 1
        self._buckets[peer] = (tokens - 1 if allowed else tokens, now)
        return allowed


class StageServer:
    """Answers inference and push streams for one stage."""

    def __init__(self, stage: Stage, *, kv_budget_bytes: int, max_length: int = 8192,
                 idle_timeout_s: float = 120.0, send_delay_s: float = 0.0, adversary: Adversary | None = None,
                 max_sessions_per_peer: int = 64, max_steps_per_s_per_peer: float = 1000.0,
                 test_slowdown_s: float = 0.0, send_bandwidth_bps: float = 0.0, uplink_bps: float = 0.0,
                 identity_key: RSAPrivateKey | None = None, drafter: DraftModel | None = None) -> None:
        """`drafter`: a small model that drafts for speculating rings at this first stage (`node.model.draft`);
        None: drafts by prompt lookup.
        `uplink_bps`: this node's measured uplink (0: not measured), which decides what is worth sending.
        `identity_key`: the node's identity (its peer id's key), which endorses each session's receipt key; None: a
        throwaway key (a stage outside a node: its receipts prove nothing to others)."""
        self.stage = stage
        self.identity_key = identity_key or RSAPrivateKey()
        self.uplink_bps = uplink_bps
        self.drafter = drafter
        self.adversary = adversary  # testing aid only: makes this node lie (node.serve.adversary)
        self.test_slowdown_s = test_slowdown_s  # testing aid only: every step takes this much longer
        self.budget = FairBudget(kv_budget_bytes)
        self.max_length = max_length
        self.idle_timeout_s = idle_timeout_s
        self.link = EmulatedLink(send_delay_s, send_bandwidth_bps)  # testing aid: a WAN uplink
        self.sessions: dict[tuple[str, str], Session] = {}  # by (client, session id): see Session.key
        self.waiters = SessionWaiters()  # push streams waiting for their session; a node shares one among its stages
        # Per-peer limits, so one client cannot crowd out the others.
        self.max_sessions_per_peer = max_sessions_per_peer
        self.step_limiter = RateLimiter(rate_per_s=max_steps_per_s_per_peer, burst=2 * max_steps_per_s_per_peer)
        self.steps_served = 0
        self.tokens_served = 0
        # Peers whose sessions are this machine's own (its user's chats): their tokens are counted apart too,
        # so the contribution shown is what others got. The node shares one set with all its stages.
        self.own_clients: set[str] = set()
        self.own_tokens_served = 0
        self.head_merges = 0  # tokens this stage sampled as a ring's first stage sharing the LM head
        self.direct_links = 0  # push streams that moved to a direct link
        self.push_failures = 0  # push streams that broke or could not open
        self.draft_tokens = self.draft_kept = 0  # speculative draft tokens verified here, and those kept
        self.layer_latency_s = 0.0  # moving average of measured decode time per layer (queueing included)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        # Decode steps of concurrent sessions that queue while a pass runs go through the layers together.
        self.batcher = StepBatcher(stage, executor=self._compute)
        self._p2p: P2P | None = None
        self.direct: DirectListener | None = None  # this node's port for direct links; None: libp2p only
        self._sweeper: asyncio.Task | None = None
        # Set when this stage is leaving (the node pauses or moved to other layers): new sessions are
        # refused with code "draining", open ones run to their end.
        self.draining = False

    @property
    def queue_len(self) -> int:
        return self.batcher.pending

    @property
    def free_kv_tokens(self) -> int:
        return self.budget.free_bytes // max(1, self.stage.shape.kv_bytes_per_token)

    def attach(self, p2p: P2P, direct: DirectListener | None = None) -> None:
        """Serve through `p2p`, whose handlers the node registers and dispatches to `rpc_inference` and `rpc_push`;
        starts the sweeper. With `direct`, pushes to and from other stages move to direct links where both ends
        allow."""
        self._p2p, self.direct = p2p, direct
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_idle_sessions())

    def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions.values()):
            session.outbox.queue.put_nowait(None)
        self.batcher.shutdown()
        self._compute.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict:
        return {
            "model": self.stage.source.name,
            "start": self.stage.start,
            "end": self.stage.end,
            "quant": self.stage.quant,
            "sessions": len(self.sessions),
            "queue_len": self.queue_len,
            "free_kv_tokens": self.free_kv_tokens,
            "steps_served": self.batcher.steps_done,
            "tokens_served": self.tokens_served,
            "compute_s": round(self.batcher.compute_s, 3),
            "decode_batches": {str(size): n for size, n in sorted(self.batcher.batch_sizes.items())},
            "gather_waits": self.batcher.gather_waits,
            "head_merges": self.head_merges,
            "direct_links": self.direct_links,
            "draft_tokens": self.draft_tokens,
            "draft_kept": self.draft_kept,
        }

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        client = context.remote_id.to_base58()
        try:
            first = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
            session = self._open(first, client)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        except Exception as e:
            if not isinstance(e, ProtocolError | CapacityError):  # a validation gap costs the sender, not the node
                logger.exception("unexpected error opening a session for %s", client)
                e = ProtocolError("bad_request", f"cannot open the session: {type(e).__name__}")
            yield _error_for(e)
            await linger(requests)
            return
        reader = asyncio.create_task(self._read_client_steps(session, requests))
        try:
            yield pack_response({"opened": session.session_id, "start": self.stage.start, "end": self.stage.end,
                                 "dtype": str(self.stage.dtype).removeprefix("torch."),
                                 "endorsement": session.signer.endorsement})
            async for message in session.outbox.drain():
                yield message
        finally:
            reader.cancel()
            self._close(session)

    async def _read_client_steps(self, session: Session, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        try:
            async for request in requests:
                if is_ping(request):
                    continue
                if not session.role.client_steps:
                    session.outbox.put(error_response("bad_request", "this stage takes its steps from the previous "
                                                      "stage's push stream, not from the client"))
                    continue
                if not self.step_limiter.allow(session.client):
                    session.outbox.put(error_response("busy", "too many steps per second from this peer; slow down"))
                    continue
                await self._process_step(session, request, pushed=False)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client's stream broke: nothing more will come
            logger.debug("client stream of session %s ended: %s", session.session_id, e)
        session.outbox.queue.put_nowait(None)  # the client closed its side: end the session

    async def rpc_push(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        pusher = context.remote_id.to_base58()
        try:
            first = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
            session_id, client = parse_push_open(first)
        except ProtocolError as e:
            yield _error_for(e)
            await linger(requests)
            return
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        session = self.pushed_session(session_id, client, pusher)  # the node's dispatcher waited for it to open
        if session is None:
            # Only the stage the client named as our predecessor may feed its session.
            yield error_response("bad_request", f"no session {session_id!r} here expects pushes from {pusher}")
            return
        session.pusher_endorsement = push_endorsement(first)  # the key that signs each pushed step
        offer = PushOffer(self.stage.head_share.rows[1] if session.role.shares_head else None,
                          self.direct.offer() if self.direct is not None else None)
        if offer != PushOffer():
            yield push_offer(offer)
        try:
            await self._read_pushes(session, requests, offer.direct)
        except DirectLinkError as e:  # neither end is known to be at fault: the client retries, banning no one
            session.outbox.put(error_response("link_failed", f"the direct link from the previous stage broke: {e}"))
        finally:
            if offer.direct is not None:
                self.direct.withdraw(offer.direct)

    def pushed_session(self, session_id: str, client: str | None, pusher: str) -> Session | None:
        """The open session `pusher` may feed: `client`'s session `session_id` if it takes pushes from `pusher`, the
        previous stage its client named. A pusher that names no client gets the one such session of that id."""
        def fed_by_pusher(session: Session | None) -> bool:
            return session is not None and session.role.takes_pushes and session.opened.prev_peer == pusher

        if client is not None:
            session = self.sessions.get((client, session_id))
            return session if fed_by_pusher(session) else None
        matches = [s for s in self.sessions.values() if s.session_id == session_id and fed_by_pusher(s)]
        return matches[0] if len(matches) == 1 else None

    async def _read_pushes(self, session: Session, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           direct: DirectOffer | None) -> None:
        """Runs the pushed steps of `session` in order: from the push stream, then (after the pusher's switch) from
        the direct link it dialled with `direct`'s ticket."""
        switched = False
        with contextlib.suppress(StopAsyncIteration, ConnectionError):
            async for request in requests:
                if session.key not in self.sessions:
                    return
                if direct is not None and is_direct_switch(request):
                    switched = True
                    break
                await self._process_step(session, request, pushed=True)
        if not switched:
            return
        reader = await self.direct.accepted(direct)
        self.direct_links += 1
        try:
            async for request in reader.messages():
                if session.key not in self.sessions:
                    return
                await self._process_step(session, request, pushed=True)
        finally:
            reader.close()

    def _open(self, request: runtime_pb2.ExpertRequest, client: str) -> Session:
        opened = parse_open(request, max_length_limit=self.max_length)
        if self.draining:
            raise ProtocolError("draining", f"this node is leaving layers {self.stage.start}:{self.stage.end}; "
                                "sessions open here finish, new ones go elsewhere")
        if not self.stage.start <= opened.start < opened.end <= self.stage.end:
            raise ProtocolError(
                "bad_range", f"this node serves layers {self.stage.start}:{self.stage.end}, "
                f"which do not include {opened.start}:{opened.end}"
            )
        stage = self.stage
        role = session_role(opened, num_layers=stage.source.num_layers, has_embedder=stage.embedder is not None,
                            has_head=stage.head is not None, has_head_share=stage.head_share is not None)
        if (client, opened.session_id) in self.sessions:
            raise ProtocolError("bad_request", f"session {opened.session_id!r} is already open here")
        if sum(s.client == client for s in self.sessions.values()) >= self.max_sessions_per_peer:
            raise ProtocolError("busy", f"a peer may hold at most {self.max_sessions_per_peer} sessions here")
        layers = (opened.start, opened.end)  # a chain may use any sub-range of what this node holds
        nbytes = self.stage.cache_bytes(opened.max_length, layers=layers)
        newcomer = self._reserve(nbytes, client)
        cache = self.stage.new_cache(opened.max_length, layers=layers)
        session = Session(opened, role, client, nbytes, newcomer, cache, Outbox(self.link))
        session.signer = ReceiptSigner(self.identity_key, session=opened.session_id, client=client, start=opened.start,
                                       end=opened.end, dtype=str(stage.dtype).removeprefix("torch."),
                                       quant=stage.quant, wire=opened.wire)
        session.outbox.on_overflow = lambda: self._close(session)
        if role.pushes:
            session.push_link = PushLink(session, self.link, direct=self.direct is not None,
                                         on_failure=self._count_push_failure)
            session.push_link.start(self._p2p)
        self.sessions[session.key] = session
        self.waiters.opened(session.session_id)
        return session

    def _count_push_failure(self) -> None:
        self.push_failures += 1

    def _reserve(self, nbytes: int, client: str) -> bool:
        """Reserves a session's KV memory within `client`'s share (`node.serve.admission`); when the node is full,
        sessions idle for RECLAIM_IDLE_S are reclaimed first to make room."""
        try:
            return self.budget.reserve(nbytes, client)
        except CapacityError as e:
            if e.own_share or not self._reclaim_idle(nbytes, self.budget.is_newcomer(client)):
                raise
        return self.budget.reserve(nbytes, client)

    def _reclaim_idle(self, nbytes: int, newcomer: bool) -> bool:
        """Closes sessions that ran no step for RECLAIM_IDLE_S, longest idle first, until `nbytes` are free (or
        none is left to close); returns whether any was closed."""
        now = time.monotonic()
        idle = sorted((s for s in self.sessions.values() if now - s.last_active > RECLAIM_IDLE_S),
                      key=lambda s: s.last_active)
        for session in idle:
            budget = self.budget
            if budget.free_bytes >= nbytes and not (
                    newcomer and budget.newcomer_bytes + nbytes > budget.newcomers_share * budget.budget_bytes):
                break
            logger.info("reclaiming session %s of %s, idle for %.0f s", session.session_id, session.client,
                        now - session.last_active)
            session.outbox.put(error_response("reclaimed", f"the session ran no step for "
                                              f"{now - session.last_active:.0f} s while others wait for memory"))
            session.outbox.put(None)
            self._close(session)
        return bool(idle)

    def _close(self, session: Session) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.budget.release(session.reserved_bytes, session.client, session.newcomer)
            self.batcher.forget(session.cache)
            session.cache = None
            if self.drafter is not None:  # on the compute thread: a draft running there holds the drafter's lock
                with contextlib.suppress(RuntimeError):  # the stage shut down: the drafter goes with it
                    self._compute.submit(self.drafter.forget, session.key)
            if session.push_link is not None:
                session.push_link.close()

    async def _process_step(self, session: Session, request: runtime_pb2.ExpertRequest, *, pushed: bool) -> None:
        """Validates a step from the client or (`pushed`) the previous stage, then runs it."""
        role = session.role
        if pushed and role.shares_head and is_head_message(request):
            await self._merge_head(session, request)
            return
        try:
            step = parse_step(
                request, hidden_size=self.stage.shape.hidden_size, expected_position=session.position,
                max_length=session.opened.max_length,
                vocab_size=self.stage.embedder.vocab_size if role.embeds else None,
                speculate=session.opened.speculate if pushed or role.checks_sampling else 0,
                model_vocab_size=self.stage.source.config.vocab_size,
            )
        except ProtocolError as e:
            # A bad step is refused without touching the cache; the session stays usable.
            session.outbox.put(_error_for(e))
            return
        mark("parsed", step.position)
        in_digest = digest(step.hidden if step.token_ids is None else step.token_ids)
        if pushed:  # what the previous stage pushed must be what it signed for: hidden states, or a ring's token
            try:
                self._check_pushed(session, step, in_digest)
            except EvidenceError as e:
                session.outbox.put(error_response("bad_receipt", f"the step pushed at position {step.position}: {e}",
                                                  peer=session.opened.prev_peer))
                return
        if pushed and role.ring is Ring.FIRST:
            session.produced += 1  # the last stage sampled this token (it did not share the head for it)
        await self._run_step(session, step, in_digest)

    def _check_pushed(self, session: Session, step: Step, in_digest: str) -> None:
        """EvidenceError unless the previous stage signed what it pushed: hidden states, or a ring's token."""
        session.pusher_key = session.pusher_key or session_key(
            session.pusher_endorsement, peer=session.opened.prev_peer, session=session.session_id,
            client=session.client)
        if step.hidden is not None:
            check_receipt(session.pusher_key, step.position, step.tokens, step.receipt, in_digest)
        else:
            check_token(session.pusher_key, step.position, step.receipt, session.signed_sampling)

    async def _run_step(self, session: Session, step: Step, in_digest: str | None = None) -> None:
        """Runs one step, then sends its output on: to the next stage or to the client; a ring's last
        stage instead samples the next token and feeds it back to the first stage."""
        if session.key not in self.sessions:
            return  # closed meanwhile (a one-stage ring feeds itself after its client left)
        session.last_active = started = time.monotonic()
        self.budget.served(session.client)
        role = session.role
        if step.position < session.position:  # after a rejected draft (parse_step bounds how far back)
            session.cache.truncate(step.position)
            session.position = step.position
        # The receipt names the input as received: at a speculating first stage, before its own draft is appended
        # (the client learns the draft from the echo, to re-run the step).
        received = step.hidden if step.token_ids is None else step.token_ids
        if role.embeds and session.opened.speculate:
            step = await self._with_draft(session, step)
        sampling = session.opened.sampling if step.sample and role.samples else None
        shared = session.push_link.head_split if sampling and session.push_link else None
        if self.adversary is not None and not self.adversary.shares_head:
            shared = None
        if self.adversary is not None and self.adversary.blames_now(session.session_id):
            neighbour = session.opened.next_peer or session.opened.prev_peer or self.stage.source.name
            session.outbox.put(error_response("push_failed", "the neighbour stopped answering", peer=neighbour))
            return
        try:
            mark("run", step.position)
            hidden = step.hidden if step.token_ids is None else await self._embed(step.token_ids)
            hidden = await self.batcher.run(session.cache, hidden, step.position,
                                            layers=(session.opened.start, session.opened.end))
            mark("computed", step.position)
            if self.test_slowdown_s:
                await asyncio.sleep(self.test_slowdown_s)
            echoed = hidden
            if self.adversary is not None:
                hidden, echoed = self.adversary.outputs(hidden, audited=session.opened.audit,
                                                        session=session.session_id)
            if shared is not None and self._share_pays(session, shared):
                await self._share_head(session, hidden, step.position + step.tokens, shared)
                sampling = None  # the first stage samples
            next_position = step.position + step.tokens - len(step.draft)  # of the first token sampled now
            if sampling and step.draft:
                tokens = await self._verify(hidden, step.draft, sampling, next_position)
            else:
                tokens = [await self._sample(hidden, sampling, next_position)] if sampling else []
            if self.adversary is not None:
                tokens = self.adversary.sampled(tokens, self.stage.source.config.vocab_size, step.draft)
        except Exception as e:  # a compute failure: end the session rather than trust its cache
            logger.exception("step failed in session %s", session.session_id)
            session.outbox.put(error_response("internal", f"step failed: {type(e).__name__}: {e}"))
            session.outbox.put(None)
            return
        if step.tokens == 1:  # a decode step: what the router needs to know of this node's speed
            per_layer = (time.monotonic() - started) / (session.opened.end - session.opened.start)
            previous = self.layer_latency_s or per_layer
            self.layer_latency_s = 0.8 * previous + 0.2 * per_layer
        session.position += step.tokens
        self.steps_served += 1
        self.tokens_served += step.tokens
        if session.client in self.own_clients:
            self.own_tokens_served += step.tokens
        if session.key not in self.sessions:
            return  # closed while the step ran
        # Hidden states leave a stage in the dtype they came in (a verifier's answer too, so the two compare).
        dtype = step.hidden.dtype if step.hidden is not None else hidden.dtype
        output, echoed = hidden.to(dtype), echoed.to(dtype)
        # The receipt signs what the client is told this stage sent on (its echo, or its answer), and names what the
        # previous stage signed for pushing here, so that the client can hold each end of the link to its word.
        told = echoed if role.samples or role.pushes else output
        in_digest = in_digest or digest(received)
        session.signer.step(step.position, step.tokens, in_digest)  # the rows it ran (a first stage's draft too)
        receipt = {"position": step.position, **session.signer.receipt(wire_digest(told, session.opened.wire)),
                   **({"draft": list(step.draft)} if step.draft and role.embeds else {}),
                   **({"prev": step.receipt} if step.receipt is not None else {})}
        if role.samples:
            if tokens:  # a ring's last stage sends tokens (or its head's part), not hidden states
                self._feed_tokens(session, tokens, next_position, signed_from=receipt["out"])
            self._echo(session, receipt, echoed)  # what it sampled from, for the client's checks
            return
        metadata = {"position": step.position, **({"sample": True} if step.sample else {}),
                    **({"draft": list(step.draft)} if step.draft else {})}
        if role.pushes:
            pushed = receipt if output is told else session.signer.receipt(wire_digest(output, session.opened.wire))
            signed = {key: pushed[key] for key in ("in", "out", "chain", "sig")}
            mark("push", step.position)
            session.push_link.send(pack({**metadata, "receipt": signed}, [output], wire=session.opened.wire))
            self._echo(session, receipt, echoed)  # after the push, which is on the critical path
        else:
            signed = {k: v for k, v in receipt.items() if k not in metadata}
            session.outbox.put(pack_response({**metadata, **signed}, [output], wire=session.opened.wire))

    @staticmethod
    def _echo(session: Session, receipt: dict, output: torch.Tensor) -> None:
        """The step's receipt for the client: a digest of the input as received, and the output sent on (every
        step of every session alike, so nothing tells a stage which steps the client checks)."""
        echo = {"echo": receipt["position"], **{k: v for k, v in receipt.items() if k != "position"}}
        session.outbox.put(pack_response(echo, [output], wire=session.opened.wire))

    async def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """A ring's first stage: a token (and its draft) is embedded on the loop (18 us a token); a prompt chunk
        reads a row file slice per distinct id (5 ms for 512 ids), on the compute thread so the loop keeps
        forwarding meanwhile."""
        if token_ids.shape[1] <= 1 + MAX_DRAFT_TOKENS:  # a token and its draft, if any
            return self.stage.embedder.embed(token_ids)
        return await asyncio.get_running_loop().run_in_executor(self._compute, self.stage.embedder.embed, token_ids)

    async def _with_draft(self, session: Session, step: Step) -> Step:
        """A speculating ring's first stage: records the step's tokens and, on a sampled step, appends a draft of
        what may follow, from the draft model if this node holds one (on the compute thread) or else by prompt
        lookup (`propose_draft`), as long as `DraftLength` finds worth it at the acceptance rate and round time
        seen. A step that arrives while a draft is out ends that draft's round: it starts at the position after
        the kept tokens."""
        ids = step.token_ids[0].tolist()
        del session.history[step.position:]
        session.history.extend(ids)
        if not step.sample:
            return step
        now = time.monotonic()
        drafts = session.drafts = session.drafts or DraftLength(session.opened.speculate)
        if session.draft_at is not None:
            first, drafted, started = session.draft_at
            drafts.observe(drafted, max(0, min(drafted, step.position - first)), now - started)
        end = step.position + step.tokens
        length = min(drafts.choose(), session.opened.max_length - end)
        draft = propose_draft(session.history, length) if self.drafter is None else \
            await asyncio.get_running_loop().run_in_executor(
                self._compute, self.drafter.propose, session.key, tuple(session.history), length)
        session.draft_at = (end, len(draft), now)
        if not draft:
            return step
        # The draft joins the history: the next step starts after the tokens kept, so it cuts the rest off above.
        session.history.extend(draft)
        return Step(None, step.position, torch.tensor([ids + draft]), sample=True, draft=tuple(draft))

    async def _verify(self, hidden: torch.Tensor, draft: tuple[int, ...], params: SamplingParams,
                      position: int) -> list[int]:
        """The last stage of a speculating ring: the draft's tokens the model keeps, then its own next one."""
        rows = hidden[:, -(len(draft) + 1):]

        def verify() -> list[int]:
            return verify_draft(self.stage.head.logits(rows)[0], draft, params, position)

        if self.batcher.alone:  # as the head's batches do: nothing else for the loop to do meanwhile
            tokens = verify()
        else:
            tokens = await asyncio.get_running_loop().run_in_executor(self._compute, verify)
        self.draft_tokens += len(draft)
        self.draft_kept += len(tokens) - 1
        return tokens

    async def _sample(self, hidden: torch.Tensor, params: SamplingParams, position: int) -> int:
        logits = await self.stage.head.next_logits(hidden, self._compute, alone_on_loop=self.batcher.alone)
        return await self._pick(logits, params, position)

    async def _pick(self, logits: torch.Tensor, params: SamplingParams, position: int) -> int:
        if params.temperature == 0:  # an argmax: cheap enough for the event loop
            return sample(logits, params, position)
        return await asyncio.get_running_loop().run_in_executor(self._compute, sample, logits, params, position)

    def _share_pays(self, session: Session, split: int) -> bool:
        """A greedy part of the head is two numbers; a sampled one is the logits of rows [split, vocab) (98 KB
        for SmolLM2), worth sending only over a link that carries them within a millisecond: loopback or a
        LAN, not a WAN, where it would cost more than the half head it saves."""
        vocab = self.stage.head.vocab_size
        if not 0 < split < vocab:
            return False
        uplink = self.link.bandwidth_bps or self.uplink_bps
        return session.opened.sampling.temperature == 0 or not uplink or 32 * (vocab - split) / uplink <= 1e-3

    async def _share_head(self, session: Session, hidden: torch.Tensor, position: int, split: int) -> None:
        """A ring's last stage sharing the head: its output goes to the first stage at once, then the part of the
        logits for rows [split, vocab) this stage computes meanwhile (see node.net.protocol)."""
        wire = session.opened.wire
        mark("push_head", position)
        session.push_link.send(pack({"position": position, "head": "input"}, [hidden[:, -1:].contiguous()], wire=wire))
        rows = (split, self.stage.head.vocab_size)
        # On the loop when alone (StepBatcher.alone) only if the input is already on the wire: otherwise the loop
        # must be free to send it while the compute thread computes.
        alone = self.batcher.alone and session.push_link.sends_at_once
        logits = await self.stage.head.next_logits(hidden, self._compute, alone_on_loop=alone, rows=rows)
        if session.opened.sampling.temperature == 0:
            best, index = logits.max(dim=0)
            part = pack({"position": position, "head": "part", "max": float(best), "argmax": split + int(index)})
        else:
            part = pack({"position": position, "head": "part"}, [logits])
        session.push_link.send(part)

    async def _merge_head(self, session: Session, request: runtime_pb2.ExpertRequest) -> None:
        """A ring's first stage sharing the head: computes its rows' logits on the last stage's output, then
        merges them with the last stage's part, samples and feeds itself the token."""
        head, params = self.stage.head_share, session.opened.sampling
        try:
            message = parse_head_message(
                request, hidden_size=self.stage.shape.hidden_size, expected_position=session.position,
                split=head.rows[1], vocab_size=self.stage.embedder.vocab_size, greedy=params.temperature == 0)
            own = session.own_head_logits
            if not isinstance(message, HeadInput) and (own is None or own[0] != message.position):
                raise ProtocolError("bad_step", f"a head part for position {message.position} before its input")
        except ProtocolError as e:
            session.outbox.put(_error_for(e))
            return
        try:
            if isinstance(message, HeadInput):
                mark("head_in", message.position)
                logits = await head.next_logits(message.hidden, self._compute, alone_on_loop=self.batcher.alone)
                session.own_head_logits = (message.position, logits)
                mark("head_own", message.position)
                return
            session.own_head_logits = None
            if message.best is not None:  # greedy: the better of two argmaxes, ties to the lower id as argmax does
                best, index = own[1].max(dim=0)
                token = int(index) if float(best) >= message.best[0] else message.best[1]
            else:
                token = await self._pick(torch.cat([own[1], message.logits]), params, message.position)
        except Exception as e:  # a compute failure: end the session rather than trust its state
            logger.exception("head merge failed in session %s", session.session_id)
            session.outbox.put(error_response("internal", f"head merge failed: {type(e).__name__}: {e}"))
            session.outbox.put(None)
            return
        mark("token", message.position)
        self.head_merges += 1
        if session.key in self.sessions:
            self._feed_tokens(session, [token], session.position)

    def _feed_tokens(self, session: Session, tokens: list[int], position: int, signed_from: str | None = None
                     ) -> None:
        """The tokens this stage sampled, from `position` on (several when a draft was kept), up to the one that
        ends generation: the last goes to the first stage (first, as that is the critical path) as the next step,
        unless generation ends with it, then all go to the client. A stage that embeds is the first one (a
        one-stage ring, or a ring's first stage sharing the head) and feeds itself; else it pushes the token.
        `signed_from`: the digest of the output they were sampled from (this step's): each token then goes with
        a token receipt (node.net.evidence) signing it, its position, the session's chain and the sampling
        parameters, to the first stage and the client alike, so that a token lie, or feeding one token and
        announcing another, is a proof others can check. (A first stage that merged the head's parts signs none.)"""
        params, max_length = session.opened.sampling, session.opened.max_length
        receipts: dict[tuple[int, int], dict] = {}  # (position, token) -> its receipt: one signature for both

        def signed(at: int, token: int) -> dict:
            if signed_from is None:
                return {}
            if (at, token) not in receipts:
                receipts[at, token] = self._token_receipt(session, signed_from, at, token)
            return {"receipt": receipts[at, token]}

        for count, token in enumerate(tokens, 1):
            session.produced += 1
            if params.is_last(token, session.produced) or position + count - 1 >= max_length:
                tokens = tokens[:count]
                break
        else:
            at, token = position + len(tokens) - 1, tokens[-1]
            if session.role.embeds:
                step = Step(None, at, torch.tensor([[token]]), sample=True)
                session.feeding = asyncio.create_task(self._run_step(session, step))
            elif session.push_link is not None:  # else a check of a ring's sampling: the token goes to the client
                vocab = self.stage.source.config.vocab_size
                fed = token if self.adversary is None else self.adversary.fed(token, vocab)
                session.push_link.send(pack({"position": at, "tokens": [fed], "sample": True, **signed(at, fed)}))
        for offset, token in enumerate(tokens):
            session.outbox.put(pack_response({"token": token, "position": position + offset,
                                              **signed(position + offset, token)}))

    @staticmethod
    def _token_receipt(session: Session, output_digest: str, position: int, token: int) -> dict:
        return session.signer.token(output_digest, position, token, session.signed_sampling)

    async def _sweep_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.idle_timeout_s / 2))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_active > self.idle_timeout_s:  # steps count as activity, pings do not
                    logger.info("session %s idle for %.0f s, closing", session.session_id, self.idle_timeout_s)
                    session.outbox.put(error_response("idle", f"no step for {self.idle_timeout_s:.0f} s"))
                    session.outbox.put(None)
                    self._close(session)


async def linger(requests: AsyncIterator, timeout_s: float = 2.0) -> None:
    """Waits for the peer to end its side before we close ours: closing at once can reset the stream
    and lose the refusal we just sent."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            async for _ in requests:
                pass


def _error_for(e: Exception) -> runtime_pb2.ExpertResponse:
    if isinstance(e, CapacityError):
        return error_response("no_capacity", str(e))
    assert isinstance(e, ProtocolError)
    return error_response(e.code, str(e))
