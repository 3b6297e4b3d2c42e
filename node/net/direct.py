"""Direct links: a stage's pushes to the next stage over a plain TCP connection, keyed over libp2p.

Every message over hivemind's P2P goes through two p2pd daemons (this process -> its daemon ->
the peer's daemon -> the peer): on a fast link that is most of a leg's time (0.83 ms for a
round trip here, 0.34 ms for the same bytes over TCP between the two processes). A ring pays a
leg per stage per token, so a push stream whose next stage listens for direct links moves to one:

1. The next stage answers the push stream (over libp2p, authenticated and encrypted) with an
   offer: its listening addresses, a one-time ticket and a fresh 256-bit key (`DirectOffer`).
2. The pushing stage dials one of those addresses, but only one whose host is the offering peer's own (where
   libp2p sees it: an offer cannot make a node scan or write to a third party). It names the offer (a hash of
   the ticket) and sends a random challenge; the listener must answer with the challenge's HMAC under the
   offer's key, which only the offering peer holds. Only then does the ticket go out, which binds the
   connection to that session and that peer; a connection without a valid ticket is dropped. A listener takes
   at most a few connections at a time per source address that have not presented a ticket yet.
3. The pushing stage sends `{"direct": true}` as its last message on the libp2p stream and
   everything after it over the connection, each message sealed with ChaCha20-Poly1305 under a
   counter nonce, so a message that was forged, altered, replayed, or dropped before a later one
   breaks the link instead of reaching the stage (a cut after the last message looks like a close,
   and the client's timeout and pings find the stall). The receiver reads the connection only after that
   marker, so messages keep their order across the switch.

A peer that cannot be dialled (behind NAT, through a relay), or whose listener fails the handshake, keeps
pushing over libp2p: the switch marker is sent only once the link is proven, so a failed link costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hivemind.proto import runtime_pb2

from node.net.steptrace import mark

logger = logging.getLogger(__name__)

TICKET_BYTES = 16
OFFER_ID_BYTES = 16
CHALLENGE_BYTES = 16
PROOF_BYTES = 32
MAX_FRAME_BYTES = 64 << 20  # a 512-token prefill chunk of a 16k-wide model in fp32 is 32 MiB
MAX_UNBOUND = 64  # connections waiting to present a ticket
MAX_UNBOUND_PER_SOURCE = 4  # of which from one address
TICKET_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 2.0
_PROOF_CONTEXT = b"layerhive direct listener"


class DirectLinkError(ConnectionError):
    pass


@dataclass(frozen=True)
class DirectOffer:
    addrs: tuple[tuple[str, int], ...]
    ticket: bytes
    key: bytes

    def to_wire(self) -> dict:
        return {"addrs": [list(a) for a in self.addrs], "ticket": self.ticket, "key": self.key}

    @property
    def offer_id(self) -> bytes:
        """Names the offer on the connection without revealing its ticket."""
        return hashlib.sha256(self.ticket).digest()[:OFFER_ID_BYTES]

    def proof(self, challenge: bytes) -> bytes:
        """What only the holder of the offer's key can answer to `challenge`."""
        return hmac.new(self.key, _PROOF_CONTEXT + challenge, hashlib.sha256).digest()

    @classmethod
    def from_wire(cls, fields) -> DirectOffer:
        """Raises ValueError on anything but what `to_wire` makes."""
        if not isinstance(fields, dict) or set(fields) != {"addrs", "ticket", "key"}:
            raise ValueError("a direct offer is a map of addrs, ticket and key")
        addrs, ticket, key = fields["addrs"], fields["ticket"], fields["key"]
        if not isinstance(ticket, bytes) or len(ticket) != TICKET_BYTES or not isinstance(key, bytes) \
                or len(key) != 32:
            raise ValueError(f"a direct offer's ticket is {TICKET_BYTES} bytes and its key 32")
        if not isinstance(addrs, list) or not 0 < len(addrs) <= 8 or not all(
                isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and 0 < len(a[0]) <= 64
                and isinstance(a[1], int) and not isinstance(a[1], bool) and 0 < a[1] < 65536 for a in addrs):
            raise ValueError("a direct offer's addrs are 1 to 8 [host, port] pairs")
        return cls(tuple((host, port) for host, port in addrs), ticket, key)


def listen_host(host_maddrs: Sequence[str]) -> str:
    """The address a node's libp2p peer listens on (its first /ip4 or /ip6 TCP multiaddr), for the direct port."""
    for maddr in host_maddrs:
        parts = str(maddr).split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2]
    return "127.0.0.1"


def maddr_hosts(maddrs: Sequence[str]) -> list[str]:
    """The IP addresses in a peer's visible multiaddrs, less relayed ones: where others may dial it directly."""
    hosts = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "ip6") and "p2p-circuit" not in parts \
                and parts[2] not in ("0.0.0.0", "::"):
            hosts.append(parts[2])
    return list(dict.fromkeys(hosts))


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


class DirectReader:
    """The receiving end of one direct link: yields the messages sent over it, in order; a frame announcing
    more than `max_frame_bytes` breaks the link before it is read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                 max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._reader, self._writer = reader, writer
        self._aead = ChaCha20Poly1305(key)
        self.max_frame_bytes = max_frame_bytes

    async def messages(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        """Ends at a clean close; raises DirectLinkError on a message that does not open or parse."""
        for counter in range(1 << 62):
            try:
                size = int.from_bytes(await self._reader.readexactly(4), "little")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if not 16 <= size <= self.max_frame_bytes:
                raise DirectLinkError(f"a frame of {size} bytes")
            try:
                sealed = await self._reader.readexactly(size)
                mark("rx")
                request = runtime_pb2.ExpertRequest.FromString(self._aead.decrypt(_nonce(counter), sealed, None))
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                raise DirectLinkError(f"the link broke mid-message: {e}") from None
            except InvalidTag:
                raise DirectLinkError("a message failed authentication (forged, altered or out of order)") from None
            except Exception as e:  # a sealed message that is not a request: the sender's bug or lie
                raise DirectLinkError(f"a message does not parse: {type(e).__name__}") from None
            yield request  # outside the try: what the consumer's loop raises is not the link's fault

    def close(self) -> None:
        self._writer.close()


class DirectWriter:
    """The sending end of one direct link."""

    def __init__(self, writer: asyncio.StreamWriter, key: bytes) -> None:
        self._writer = writer
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def send(self, request: runtime_pb2.ExpertRequest) -> None:
        """Queues one message on the socket (asyncio writes it at once when its buffer is empty)."""
        sealed = self._aead.encrypt(_nonce(self._counter), request.SerializeToString(), None)
        self._counter += 1
        self._writer.write(len(sealed).to_bytes(4, "little") + sealed)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


def owned_addrs(offer: DirectOffer, peer_hosts: Sequence[str]) -> list[tuple[str, int]]:
    """The offer's addresses on the offering peer's own hosts (`peer_hosts`: where libp2p sees that peer)."""
    return [(host, port) for host, port in offer.addrs if host in set(peer_hosts)]


async def dial(offer: DirectOffer, peer_hosts: Sequence[str], timeout_s: float = DIAL_TIMEOUT_S) -> DirectWriter:
    """Connects to the first of the offer's addresses on `peer_hosts` that answers and proves it holds the offer's
    key, then presents the ticket. Raises DirectLinkError if none does (nothing of the ticket went out)."""
    addrs = owned_addrs(offer, peer_hosts)
    if not addrs:
        raise DirectLinkError(f"the offer names no address of its peer's hosts {list(peer_hosts)}: "
                              f"{[f'{h}:{p}' for h, p in offer.addrs]}")
    errors = []
    for host, port in addrs:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            errors.append(f"{host}:{port}: {e or type(e).__name__}")
            continue
        try:
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            writer.write(offer.offer_id + challenge)
            proof = await asyncio.wait_for(reader.readexactly(PROOF_BYTES), timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            writer.close()
            errors.append(f"{host}:{port}: no proof of the key ({type(e).__name__})")
            continue
        if not hmac.compare_digest(proof, offer.proof(challenge)):
            writer.close()
            errors.append(f"{host}:{port}: a wrong proof of the key")
            continue
        writer.write(offer.ticket)
        return DirectWriter(writer, offer.key)
    raise DirectLinkError(f"no address of the offer answered ({'; '.join(errors)})")


class DirectListener:
    """A node's TCP port for direct links; `offer()` makes a ticket, `accepted()` waits for its connection."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._server: asyncio.Server | None = None
        self._waiting: dict[bytes, tuple[DirectOffer, asyncio.Future]] = {}  # offer id -> (offer, future reader)
        self._unbound: dict[str, int] = {}  # source address -> its connections without a ticket yet
        self.addrs: tuple[tuple[str, int], ...] = ()
        self.max_frame_bytes = max_frame_bytes

    async def start(self, bind_host: str, advertise_hosts: Sequence[str]) -> None:
        """Listens on a free port of `bind_host` (where this node's libp2p peer listens: an address, or 0.0.0.0)
        and offers it at `advertise_hosts` (the addresses that peer is seen at), or at `bind_host` itself."""
        self._server = await asyncio.start_server(self._on_connection, bind_host, 0)
        port = self._server.sockets[0].getsockname()[1]
        hosts = [bind_host] if bind_host not in ("0.0.0.0", "::") else list(dict.fromkeys(advertise_hosts))
        self.addrs = tuple((host, port) for host in hosts[:8])

    def offer(self) -> DirectOffer:
        offer = DirectOffer(self.addrs, secrets.token_bytes(TICKET_BYTES), ChaCha20Poly1305.generate_key())
        self._waiting[offer.offer_id] = (offer, asyncio.get_running_loop().create_future())
        return offer

    async def accepted(self, offer: DirectOffer, timeout_s: float = TICKET_TIMEOUT_S) -> DirectReader:
        """The connection that presented the offer's ticket; the ticket is spent either way."""
        entry = self._waiting.get(offer.offer_id)
        if entry is None:
            raise DirectLinkError("this offer was withdrawn")
        try:
            return await asyncio.wait_for(asyncio.shield(entry[1]), timeout_s)
        except asyncio.TimeoutError:
            raise DirectLinkError(f"no direct connection presented the ticket within {timeout_s:.0f} s") from None
        finally:
            self._waiting.pop(offer.offer_id, None)
            entry[1].cancel()  # a no-op once it has its connection

    def withdraw(self, offer: DirectOffer) -> None:
        """Spends an offer that will not be accepted (its session ended first), closing its connection if any."""
        _, future = self._waiting.pop(offer.offer_id, (None, None))
        if future is not None and future.done() and not future.cancelled():
            future.result().close()  # connected, but no one will read it
        elif future is not None:
            future.cancel()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str((writer.get_extra_info("peername") or ("?",))[0])
        if sum(self._unbound.values()) >= MAX_UNBOUND or self._unbound.get(source, 0) >= MAX_UNBOUND_PER_SOURCE:
            writer.close()
            return
        self._unbound[source] = self._unbound.get(source, 0) + 1
        try:
            entry = await asyncio.wait_for(self._handshake(reader, writer), TICKET_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            entry = None
        finally:
            self._unbound[source] -= 1
            if not self._unbound[source]:
                del self._unbound[source]
        if entry is None or entry[1].done():
            logger.debug("dropped a direct connection from %s without a valid ticket", source)
            writer.close()
            return
        offer, future = entry
        future.set_result(DirectReader(reader, writer, offer.key, self.max_frame_bytes))

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[DirectOffer, asyncio.Future] | None:
        """Proves we hold the named offer's key, then checks the ticket; the offer's entry, or None."""
        hello = await reader.readexactly(OFFER_ID_BYTES + CHALLENGE_BYTES)
        entry = self._waiting.get(hello[:OFFER_ID_BYTES])
        if entry is None:
            return None
        writer.write(entry[0].proof(hello[OFFER_ID_BYTES:]))
        ticket = await reader.readexactly(TICKET_BYTES)
        return entry if hmac.compare_digest(ticket, entry[0].ticket) else None

    async def close(self) -> None:
        for offer, _ in list(self._waiting.values()):
            self.withdraw(offer)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
