"""Direct links: a stage's pushes to the next stage over a plain TCP connection, keyed over libp2p.

Every message over hivemind's P2P goes through two p2pd daemons (this process -> its daemon ->
the peer's daemon -> the peer): on a fast link that is most of a leg's time (0.83 ms for a
round trip here, 0.34 ms for the same bytes over TCP between the two processes). A ring pays a
leg per stage per token, so a push stream whose next stage listens for direct links moves to one:

1. The next stage answers the push stream (over libp2p, authenticated and encrypted) with an
   offer: its listening addresses, a one-time ticket and a fresh 256-bit key (`DirectOffer`).
2. The pushing stage dials one of them and sends the ticket, which binds the connection to
   that session and that peer; a connection without a valid ticket is dropped.
3. The pushing stage sends `{"direct": true}` as its last message on the libp2p stream and
   everything after it over the connection, each message sealed with ChaCha20-Poly1305 under a
   counter nonce, so a message that was forged, altered, replayed, or dropped before a later one
   breaks the link instead of reaching the stage (a cut after the last message looks like a close,
   and the client's timeout and pings find the stall). The receiver reads the connection only after that
   marker, so messages keep their order across the switch.

A peer that cannot be dialled (behind NAT, through a relay) keeps pushing over libp2p.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hivemind.proto import runtime_pb2

logger = logging.getLogger(__name__)

TICKET_BYTES = 16
MAX_FRAME_BYTES = 64 << 20  # a 512-token prefill chunk of a 16k-wide model in fp32 is 32 MiB
MAX_UNBOUND = 64  # connections waiting to present a ticket
TICKET_TIMEOUT_S = 5.0
DIAL_TIMEOUT_S = 2.0


class DirectLinkError(ConnectionError):
    pass


@dataclass(frozen=True)
class DirectOffer:
    addrs: tuple[tuple[str, int], ...]
    ticket: bytes
    key: bytes

    def to_wire(self) -> dict:
        return {"addrs": [list(a) for a in self.addrs], "ticket": self.ticket, "key": self.key}

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
    """The receiving end of one direct link: yields the messages sent over it, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes) -> None:
        self._reader, self._writer = reader, writer
        self._aead = ChaCha20Poly1305(key)

    async def messages(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        """Ends at a clean close; raises DirectLinkError on a message that does not open or parse."""
        for counter in range(1 << 62):
            try:
                size = int.from_bytes(await self._reader.readexactly(4), "little")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if not 16 <= size <= MAX_FRAME_BYTES:
                raise DirectLinkError(f"a frame of {size} bytes")
            try:
                sealed = await self._reader.readexactly(size)
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


async def dial(offer: DirectOffer, timeout_s: float = DIAL_TIMEOUT_S) -> DirectWriter:
    """Connects to the first of the offer's addresses that answers and presents its ticket."""
    errors = []
    for host, port in offer.addrs:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            errors.append(f"{host}:{port}: {e or type(e).__name__}")
            continue
        writer.write(offer.ticket)
        return DirectWriter(writer, offer.key)
    raise DirectLinkError(f"no address of the offer answered ({'; '.join(errors)})")


class DirectListener:
    """A node's TCP port for direct links; `offer()` makes a ticket, `accepted()` waits for its connection."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._waiting: dict[bytes, tuple[bytes, asyncio.Future]] = {}  # ticket -> (key, future reader)
        self._unbound = 0
        self.addrs: tuple[tuple[str, int], ...] = ()

    async def start(self, bind_host: str, advertise_hosts: Sequence[str]) -> None:
        """Listens on a free port of `bind_host` (where this node's libp2p peer listens: an address, or 0.0.0.0)
        and offers it at `advertise_hosts` (the addresses that peer is seen at), or at `bind_host` itself."""
        self._server = await asyncio.start_server(self._on_connection, bind_host, 0)
        port = self._server.sockets[0].getsockname()[1]
        hosts = [bind_host] if bind_host not in ("0.0.0.0", "::") else list(dict.fromkeys(advertise_hosts))
        self.addrs = tuple((host, port) for host in hosts[:8])

    def offer(self) -> DirectOffer:
        ticket, key = secrets.token_bytes(TICKET_BYTES), ChaCha20Poly1305.generate_key()
        self._waiting[ticket] = (key, asyncio.get_running_loop().create_future())
        return DirectOffer(self.addrs, ticket, key)

    async def accepted(self, offer: DirectOffer, timeout_s: float = TICKET_TIMEOUT_S) -> DirectReader:
        """The connection that presented the offer's ticket; the ticket is spent either way."""
        entry = self._waiting.get(offer.ticket)
        if entry is None:
            raise DirectLinkError("this offer was withdrawn")
        try:
            return await asyncio.wait_for(asyncio.shield(entry[1]), timeout_s)
        except asyncio.TimeoutError:
            raise DirectLinkError(f"no direct connection presented the ticket within {timeout_s:.0f} s") from None
        finally:
            self._waiting.pop(offer.ticket, None)
            entry[1].cancel()  # a no-op once it has its connection

    def withdraw(self, offer: DirectOffer) -> None:
        """Spends an offer that will not be accepted (its session ended first), closing its connection if any."""
        _, future = self._waiting.pop(offer.ticket, (None, None))
        if future is not None and future.done() and not future.cancelled():
            future.result().close()  # connected, but no one will read it
        elif future is not None:
            future.cancel()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._unbound >= MAX_UNBOUND:
            writer.close()
            return
        self._unbound += 1
        try:
            ticket = await asyncio.wait_for(reader.readexactly(TICKET_BYTES), TICKET_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            ticket = None
        finally:
            self._unbound -= 1
        key, future = self._waiting.get(ticket, (None, None)) if ticket else (None, None)
        if future is None or future.done():
            logger.debug("dropped a direct connection without a valid ticket")
            writer.close()
            return
        future.set_result(DirectReader(reader, writer, key))

    async def close(self) -> None:
        for ticket in list(self._waiting):
            self.withdraw(DirectOffer(self.addrs, ticket, bytes(32)))
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
