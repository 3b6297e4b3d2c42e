"""hivemind's protobuf streams, served with bounds: a message's size is checked before it is read, a reply the
peer does not read in time ends the stream, and each peer may hold only a few streams that are not yet working.

hivemind's own stream handler reads a message of whatever length its 8-byte header announces: a peer could make
a node hold 64 MB (or 2^63 bytes) for one message before anything looks at it. `add_bounded_stream_handler`
speaks the same framing (so clients keep using `P2P.iterate_protobuf_handler`) but refuses a message whose header
announces more than the stream could legitimately carry, before reading its body, and ends the stream.
Replies go out through the same writer with a deadline: a peer that stops reading its replies is dropped instead
of pinning them in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

Handler = Callable[[AsyncIterator[runtime_pb2.ExpertRequest], P2PContext],
                   AsyncIterator[runtime_pb2.ExpertResponse]]

WRITE_TIMEOUT_S = 30.0  # a reply not taken by the peer within this ends the stream (a slow or hostile reader)
MAX_PREFETCH = 4  # messages read ahead of the handler


class MessageTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes, more than the {limit} this stream may carry")
        self.size, self.limit = size, limit


async def receive_bounded(reader: asyncio.StreamReader, limit: int) -> runtime_pb2.ExpertRequest | None:
    """The next request in hivemind's framing (a marker byte, an 8-byte length, the body), or None at the end
    of the stream; raises MessageTooLarge before reading a body longer than `limit`."""
    marker = await reader.readexactly(1)
    size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if size > limit:
        raise MessageTooLarge(size, limit)
    body = await reader.readexactly(size)
    if marker == P2P.ERROR_MARKER:  # the caller's end-of-stream (or error) marker
        return None
    if marker != P2P.MESSAGE_MARKER:
        raise ValueError(f"not a message marker: {marker!r}")
    return runtime_pb2.ExpertRequest.FromString(body)


class PendingStreams:
    """Counts each peer's streams that are open but not yet working (waiting for their first message or for
    their session), so that one peer cannot park hundreds of them; `admit` refuses beyond `per_peer` of one
    peer's, or `total` of everyone's."""

    def __init__(self, per_peer: int = 16, total: int = 512) -> None:
        self.per_peer, self.total = per_peer, total
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def admit(self, peer: str):
        """A context in which the stream counts as pending; yields False (and counts nothing) if over a cap."""
        if self.counts.get(peer, 0) >= self.per_peer or sum(self.counts.values()) >= self.total:
            yield False
            return
        self.counts[peer] = self.counts.get(peer, 0) + 1
        try:
            yield True
        finally:
            self.counts[peer] -= 1
            if not self.counts[peer]:
                del self.counts[peer]


async def add_bounded_stream_handler(p2p: P2P, name: str, handler: Handler, *, limit: Callable[[int], int],
                                     too_large: Callable[[MessageTooLarge], runtime_pb2.ExpertResponse],
                                     write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
    """Serves `handler` (requests in, responses out) on stream protocol `name`. `limit(i)` is the largest body
    the i-th message (from 0) may have; a larger one is answered with `too_large(error)` and ends the stream."""

    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)

        async def incoming() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (request := await requests.get()) is not None:
                yield request

        async def send(response) -> None:
            started = time.monotonic()
            await asyncio.wait_for(P2P.send_protobuf(response, writer), write_timeout_s)
            if time.monotonic() - started > write_timeout_s / 2:
                logger.info("%s: a peer took %.0f s to read a reply", name, time.monotonic() - started)

        async def answer() -> None:
            try:
                async with aclosing(handler(incoming(), context)) as responses:
                    async for response in responses:
                        await send(response)
            except asyncio.TimeoutError:
                logger.info("%s: %s did not read its replies for %.0f s; stream closed", name,
                            info.peer_id, write_timeout_s)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except Exception as e:
                logger.warning("%s handler failed: %s", name, e, exc_info=True)
                with contextlib.suppress(Exception):
                    await send(RPCError(message=f"{type(e).__name__}"))

        with contextlib.closing(writer):
            answering = asyncio.create_task(answer())
            try:
                await read_requests(info, reader, writer, requests, answering)
            finally:
                answering.cancel()

    async def read_requests(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            requests: asyncio.Queue, answering: asyncio.Task) -> None:
        """Feeds the handler the peer's requests, each checked against its limit before it is read, until the
        peer closes the stream (its end-of-stream marker stops the requests, not the replies) or the handler ends."""
        ended = False
        for index in range(1 << 62):
            receiving = asyncio.create_task(receive_bounded(reader, limit(index)))
            if not await _first_of(receiving, answering):
                return
            try:
                request = receiving.result()
            except MessageTooLarge as e:
                logger.info("%s: %s sent %s", name, info.peer_id, e)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(P2P.send_protobuf(too_large(e), writer), 5.0)
                    # Closing with unread bytes pending resets the stream and loses the answer: read a bounded part
                    # of the rest, into nothing, for a moment first.
                    await asyncio.wait_for(_discard(reader, min(e.size, 4 * e.limit)), 2.0)
                return
            except Exception as e:  # closed by the peer, not our framing, or a body that is not a request
                logger.debug("%s: stream from %s ended: %s", name, info.peer_id, type(e).__name__)
                return
            if ended:
                return  # nothing may follow the end marker
            if not await _first_of(asyncio.create_task(requests.put(request)), answering):
                return  # the handler ended without taking it
            ended = request is None

    await p2p.add_binary_stream_handler(name, handle)


async def _discard(reader: asyncio.StreamReader, nbytes: int) -> None:
    while nbytes > 0 and (chunk := await reader.read(min(nbytes, 1 << 16))):
        nbytes -= len(chunk)


async def _first_of(task: asyncio.Task, other: asyncio.Task) -> bool:
    """Waits for `task` unless `other` ends first (then cancels `task` and returns False)."""
    await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return True
    task.cancel()
    return False


async def remove_bounded_stream_handler(p2p: P2P, name: str) -> None:
    await p2p.remove_binary_stream_handler(name)
