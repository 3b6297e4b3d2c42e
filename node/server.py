"""Serving a stage over hivemind's P2P streams: sessions, their KV caches, and a memory budget.

Compute runs on one worker thread so the event loop stays free to accept, validate
and answer other sessions while a step runs; steps of different sessions queue
there in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from node.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    ProtocolError,
    error_response,
    pack_response,
    parse_open,
    parse_step,
)
from node.stage import Stage

logger = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    peer: str
    max_length: int
    reserved_bytes: int
    cache: object
    position: int = 0
    opened_at: float = field(default_factory=time.monotonic)


class CapacityError(Exception):
    pass


class KVBudget:
    """Reserves each session's worst-case KV cache up front, so a full node says "no" instead of OOM."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.reserved_bytes = 0

    def reserve(self, nbytes: int) -> None:
        if self.reserved_bytes + nbytes > self.budget_bytes:
            free = self.budget_bytes - self.reserved_bytes
            raise CapacityError(f"no capacity: the session needs {nbytes} bytes of KV cache, {free} are free")
        self.reserved_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.reserved_bytes -= nbytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.reserved_bytes


class StageServer:
    """Answers inference streams for one stage."""

    def __init__(self, stage: Stage, *, kv_budget_bytes: int, max_length: int = 8192,
                 idle_timeout_s: float = 300.0) -> None:
        self.stage = stage
        self.budget = KVBudget(kv_budget_bytes)
        self.max_length = max_length
        self.idle_timeout_s = idle_timeout_s
        self.sessions: dict[str, Session] = {}
        self.steps_served = 0
        self.tokens_served = 0
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self._queued = 0

    @property
    def queue_len(self) -> int:
        return self._queued

    @property
    def free_kv_tokens(self) -> int:
        return self.budget.free_bytes // max(1, self.stage.shape.kv_bytes_per_token)

    async def add_handlers(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(
            INFERENCE_HANDLER, self.rpc_inference, runtime_pb2.ExpertRequest,
            stream_input=True, stream_output=True,
        )
        await p2p.add_protobuf_handler(INFO_HANDLER, self.rpc_info, runtime_pb2.ExpertRequest)

    async def remove_handlers(self, p2p: P2P) -> None:
        await p2p.remove_protobuf_handler(INFERENCE_HANDLER, stream_input=True, stream_output=True)
        await p2p.remove_protobuf_handler(INFO_HANDLER)

    def shutdown(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return pack_response(self.info())

    def info(self) -> dict:
        return {
            "model": self.stage.source.name,
            "start": self.stage.start,
            "end": self.stage.end,
            "sessions": len(self.sessions),
            "queue_len": self.queue_len,
            "free_kv_tokens": self.free_kv_tokens,
        }

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = context.remote_id.to_base58()
        session: Session | None = None
        try:
            first = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
            try:
                session = self._open(first, peer)
            except (ProtocolError, CapacityError) as e:
                yield _error_for(e)
                return
            yield pack_response({"opened": session.session_id, "start": self.stage.start, "end": self.stage.end})
            while True:
                request = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
                try:
                    yield await self._step(session, request)
                except ProtocolError as e:
                    # A bad step is refused without touching the cache; the session stays usable.
                    yield _error_for(e)
                except Exception as e:  # a compute failure may leave the cache half-updated: end the session
                    logger.exception("step failed in session %s", session.session_id)
                    yield error_response("internal", f"step failed: {type(e).__name__}: {e}")
                    return
        except (StopAsyncIteration, asyncio.CancelledError):
            pass
        except asyncio.TimeoutError:
            logger.info("session from %s idle for %.0f s, closing", peer, self.idle_timeout_s)
        finally:
            if session is not None:
                self._close(session)

    def _open(self, request: runtime_pb2.ExpertRequest, peer: str) -> Session:
        opened = parse_open(request, max_length_limit=self.max_length)
        if (opened.start, opened.end) != (self.stage.start, self.stage.end):
            raise ProtocolError(
                "bad_range", f"this node serves layers {self.stage.start}:{self.stage.end}, "
                f"not {opened.start}:{opened.end}"
            )
        if opened.session_id in self.sessions:
            raise ProtocolError("bad_request", f"session {opened.session_id!r} is already open here")
        nbytes = opened.max_length * self.stage.shape.kv_bytes_per_token
        self.budget.reserve(nbytes)
        session = Session(opened.session_id, peer, opened.max_length, nbytes, self.stage.new_cache())
        self.sessions[session.session_id] = session
        return session

    def _close(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_bytes)
            session.cache = None

    async def _step(self, session: Session, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        step = parse_step(
            request, hidden_size=self.stage.shape.hidden_size,
            expected_position=session.position, max_length=session.max_length,
        )
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            hidden = await loop.run_in_executor(
                self._compute, self.stage.forward, step.hidden, step.position, session.cache
            )
        finally:
            self._queued -= 1
        tokens = step.hidden.shape[1]
        session.position += tokens
        self.steps_served += 1
        self.tokens_served += tokens
        return pack_response({"position": step.position}, [hidden.to(step.hidden.dtype)])


def _error_for(e: Exception) -> runtime_pb2.ExpertResponse:
    if isinstance(e, CapacityError):
        return error_response("no_capacity", str(e))
    assert isinstance(e, ProtocolError)
    return error_response(e.code, str(e))
