"""Network probes over the swarm's own P2P transport: round-trip time and uplink bandwidth.

A node registers two handlers with `add_probe_handlers`: `layerhive.ping`, a unary echo, and
`layerhive.sink`, an input stream that swallows byte chunks and answers once with how many bytes
it got. A peer then measures its RTT to that node as the median of a few pings, and its uplink by
streaming bytes into the sink. We measure through libp2p itself, not a third-party speed-test
site, because this is the path (daemons, multiplexing, relays) hidden states will take.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.net.protocol import ProtocolError, RemoteError, error_response, pack, pack_response, raise_if_error

PING_HANDLER = "layerhive.ping"
SINK_HANDLER = "layerhive.sink"
MAX_PING_BYTES = 1024  # a ping carries a sequence number; anything bigger is not a ping
MAX_SINK_BYTES = 64 << 20  # one uplink probe; a sender wanting more is refused, not believed
SINK_IDLE_TIMEOUT_S = 30.0  # a sender that stops mid-probe does not hold the stream forever
CHUNK_BYTES = 256 << 10  # well under hivemind's 4 MiB message limit, big enough to amortise framing
DEFAULT_UPLINK_BYTES = 4 << 20


class ProbeError(RuntimeError):
    """A probe could not be run against a peer: unreachable, no probe handlers, or a bad answer."""


# --- server side ------------------------------------------------------------------------------------


async def add_probe_handlers(p2p: P2P, *, send_delay_s: float = 0.0) -> None:
    """Let peers measure their RTT and uplink to this node. `send_delay_s` is the node's emulated link
    latency (a testing aid): pings answer that much later, as every message the node sends does."""

    async def ping(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        if send_delay_s > 0:
            await asyncio.sleep(send_delay_s)
        return await _ping(request, context)

    await p2p.add_protobuf_handler(PING_HANDLER, ping, runtime_pb2.ExpertRequest)
    await p2p.add_protobuf_handler(SINK_HANDLER, _sink, runtime_pb2.ExpertRequest, stream_input=True)


async def _ping(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    if len(request.metadata) > MAX_PING_BYTES or request.tensors:
        return error_response("bad_request", f"a ping carries at most {MAX_PING_BYTES} bytes of metadata only")
    return runtime_pb2.ExpertResponse(metadata=request.metadata)


async def _sink(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
) -> runtime_pb2.ExpertResponse:
    received = 0
    try:
        while True:
            try:
                request = await asyncio.wait_for(anext(requests), SINK_IDLE_TIMEOUT_S)
            except StopAsyncIteration:
                break
            received += sum(len(tensor.buffer) for tensor in request.tensors)
            if received > MAX_SINK_BYTES:
                return error_response("too_long", f"an uplink probe sends at most {MAX_SINK_BYTES} bytes")
    except asyncio.TimeoutError:
        return error_response("timeout", f"no chunk for {SINK_IDLE_TIMEOUT_S:.0f} s after {received} bytes")
    return pack_response({"received": received})


# --- client side ------------------------------------------------------------------------------------


def _peer(peer_id: PeerID | str) -> PeerID:
    return peer_id if isinstance(peer_id, PeerID) else PeerID.from_base58(peer_id)


async def _ping_once(p2p: P2P, peer: PeerID, handler: str, seq: int, timeout_s: float) -> float:
    request = pack({"ping": seq})
    started = time.perf_counter()
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer, handler, request, runtime_pb2.ExpertResponse), timeout_s
        )
    except asyncio.TimeoutError:
        raise ProbeError(f"{peer}: no answer to {handler} within {timeout_s:.0f} s") from None
    except Exception as e:  # unreachable peer, or a peer without this handler
        raise ProbeError(f"{peer}: {handler} failed: {type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - started
    try:
        metadata = raise_if_error(str(peer), response)
    except (RemoteError, ProtocolError) as e:
        raise ProbeError(f"{peer}: {handler} refused: {e}") from e
    if handler == PING_HANDLER and metadata != {"ping": seq}:
        raise ProbeError(f"{peer}: {handler} echoed {metadata!r}, expected {{'ping': {seq}}}")
    return elapsed


async def measure_rtt(
    p2p: P2P, peer_id: PeerID | str, n: int = 5, *, handler: str = PING_HANDLER, timeout_s: float = 10.0
) -> float:
    """Median round-trip time to `peer_id` in seconds, over `n` pings after one unmeasured warm-up
    (the warm-up pays for dialling and connection setup, which later calls do not).

    `handler` may name another cheap unary handler (e.g. `layerhive.info`) for peers without probes;
    the answer is then not checked to be an echo."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    peer = _peer(peer_id)
    await _ping_once(p2p, peer, handler, 0, timeout_s)
    samples = [await _ping_once(p2p, peer, handler, seq, timeout_s) for seq in range(1, n + 1)]
    return statistics.median(samples)


async def measure_uplink(
    p2p: P2P,
    peer_id: PeerID | str,
    nbytes: int = DEFAULT_UPLINK_BYTES,
    *,
    rtt_s: float | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    timeout_s: float = 60.0,
) -> float:
    """Uplink bandwidth to `peer_id` in bits per second: stream `nbytes` into its sink, timed from the
    first chunk sent to the final ack, minus one RTT (the ack's trip back and the stream's opening are
    latency, not bandwidth). `rtt_s` is measured first unless given."""
    if not 0 < nbytes <= MAX_SINK_BYTES:
        raise ValueError(f"nbytes must be in (0, {MAX_SINK_BYTES}], got {nbytes}")
    if not 0 < chunk_bytes <= 4 * CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {4 * CHUNK_BYTES}], got {chunk_bytes}")
    peer = _peer(peer_id)
    if rtt_s is None:
        rtt_s = await measure_rtt(p2p, peer, n=3)
    payload = os.urandom(chunk_bytes)  # random, so no layer on the way can compress it
    first_sent: list[float] = []

    async def chunks() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for offset in range(0, nbytes, chunk_bytes):
            size = min(chunk_bytes, nbytes - offset)
            if not first_sent:
                first_sent.append(time.perf_counter())
            yield runtime_pb2.ExpertRequest(
                tensors=[runtime_pb2.Tensor(buffer=payload[:size], size=[size], dtype="uint8")]
            )

    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer, SINK_HANDLER, chunks(), runtime_pb2.ExpertResponse), timeout_s
        )
    except asyncio.TimeoutError:
        raise ProbeError(f"{peer}: sending {nbytes} bytes took more than {timeout_s:.0f} s") from None
    except Exception as e:
        raise ProbeError(f"{peer}: {SINK_HANDLER} failed: {type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - first_sent[0]
    try:
        metadata = raise_if_error(str(peer), response)
    except (RemoteError, ProtocolError) as e:
        raise ProbeError(f"{peer}: {SINK_HANDLER} refused: {e}") from e
    if metadata.get("received") != nbytes:
        raise ProbeError(f"{peer}: sink acknowledged {metadata.get('received')!r} bytes, {nbytes} were sent")
    # On a fast link with a noisy RTT the difference can vanish; never credit more than half the
    # elapsed time to latency, so the estimate stays finite and errs on the slow side.
    transfer_s = max(elapsed - rtt_s, elapsed / 2)
    return nbytes * 8 / transfer_s

