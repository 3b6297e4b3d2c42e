"""The API's connections, bounded at accept, before a byte of HTTP is parsed: `ConnectionGate`, and
`gated_protocol`, the uvicorn protocol class that consults it.

`api_guard.Guard` answers a caller refused again and again slowly (a tarpit: its refusals wait, at no CPU), but it
can hold only so many refusals per caller (`MAX_HELD_PER_CALLER`); a flooder with more connections than that paid
again per refusal beyond them (a parse and an answer, 0.3 ms of CPU each with httptools). The gate bounds what one
source address can make the server read at all:
- at most `MAX_SERVED_PER_ADDRESS` connections of an address are served (read, parsed, answered) at once: as many
  as the Guard can hold refusals of, so every refusal of a flooder waits;
- its next `MAX_PARKED_PER_ADDRESS` are parked: accepted, but their reading paused, which costs an fd and no CPU
  while they wait. When a served connection of that address closes, its oldest parked one is served; one parked
  longer than `PARK_TIMEOUT_S` is closed (its client has likely gone);
- beyond those, and beyond `MAX_OPEN` connections in all, a new connection is closed at once.
The attacker's cost then grows with its connections (each waits, holding a socket on both sides) and ours does not.

At accept the address is all there is to go by (a request's API key is known only after its headers are parsed), so
an honest caller on the flooder's address (both on loopback, or behind one NAT) queues with the flooder's parked
connections: it is served when its turn comes, and keeps its slot for as long as it keeps its connection alive.
Callers from other addresses are not affected. IPv6 addresses count by their /64, the block one host gets.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from node.app.api_guard import MAX_HELD_PER_CALLER

MAX_SERVED_PER_ADDRESS = MAX_HELD_PER_CALLER  # so that every refusal of an address's served connections can wait
MAX_PARKED_PER_ADDRESS = 64  # parked connections of one address (each an fd here)
MAX_OPEN = 512  # connections served or parked in all (the fds the API spends on connections)
PARK_TIMEOUT_S = 30.0  # a connection parked longer is closed


@dataclass(eq=False)
class Ticket:
    """One connection's place at the gate: served, parked (with the timer that closes it), or closed at once."""

    address: str
    transport: asyncio.Transport
    state: str = "served"  # or "parked", "closed"
    timer: asyncio.TimerHandle | None = None
    early: bytes = b""  # read before the connection was parked (uvloop reads once after connection_made)
    unparked: Callable[[], None] = lambda: None  # hands `early` to the protocol once served


@dataclass
class _Address:
    served: int = 0
    parked: deque[Ticket] = field(default_factory=deque)


class ConnectionGate:
    """Decides at accept whether a connection is served, parked or closed, and serves an address's parked
    connections as its served ones close. Runs on the server's event loop (no locking)."""

    def __init__(self, *, max_served_per_address: int = MAX_SERVED_PER_ADDRESS,
                 max_parked_per_address: int = MAX_PARKED_PER_ADDRESS, max_open: int = MAX_OPEN,
                 park_timeout_s: float = PARK_TIMEOUT_S) -> None:
        self.max_served_per_address, self.max_parked_per_address = max_served_per_address, max_parked_per_address
        self.max_open, self.park_timeout_s = max_open, park_timeout_s
        self.addresses: dict[str, _Address] = {}
        self.open = 0
        self.counts: Counter[str] = Counter()  # connections served at once, parked, closed at once, parked then served

    def opened(self, transport: asyncio.Transport) -> Ticket:
        """A new connection: served, parked (its reading paused) or closed at once."""
        ticket = Ticket(address_of(transport.get_extra_info("peername")), transport)
        entry = self.addresses.get(ticket.address) or _Address()
        if self.open >= self.max_open or (entry.served >= self.max_served_per_address
                                          and len(entry.parked) >= self.max_parked_per_address):
            ticket.state = "closed"
            self.counts["closed"] += 1
            transport.abort()  # no FIN handshake to wait on, nothing read
            return ticket
        self.addresses[ticket.address] = entry
        self.open += 1
        if entry.served < self.max_served_per_address:
            entry.served += 1
            self.counts["served"] += 1
            return ticket
        transport.pause_reading()  # its bytes wait in the kernel's buffers, unread
        ticket.state = "parked"
        ticket.timer = asyncio.get_running_loop().call_later(self.park_timeout_s, transport.abort)
        entry.parked.append(ticket)
        self.counts["parked"] += 1
        return ticket

    def lost(self, ticket: Ticket) -> None:
        """A connection closed (by either side): its served slot goes to its address's oldest parked connection."""
        if ticket.state == "closed":
            return
        entry = self.addresses[ticket.address]
        self.open -= 1
        if ticket.state == "parked":
            entry.parked.remove(ticket)
            ticket.timer.cancel()
        else:
            entry.served -= 1
            if entry.parked:
                self._serve(entry.parked.popleft(), entry)
        ticket.state = "closed"
        if entry.served == 0 and not entry.parked:
            del self.addresses[ticket.address]

    def _serve(self, ticket: Ticket, entry: _Address) -> None:
        ticket.timer.cancel()
        ticket.state = "served"
        entry.served += 1
        self.counts["unparked"] += 1
        if not ticket.transport.is_closing():  # closed meanwhile: its connection_lost is on its way
            ticket.transport.resume_reading()
            ticket.unparked()

    def parked(self) -> int:
        return sum(len(entry.parked) for entry in self.addresses.values())


def address_of(peername) -> str:
    """The address a connection counts against: its IPv4 address, or the /64 of its IPv6 one."""
    if not peername:
        return "unknown"
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return str(peername[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def gated_protocol(protocol_class: type[asyncio.Protocol], gate: ConnectionGate) -> type[asyncio.Protocol]:
    """`protocol_class` (one of uvicorn's HTTP protocols) with every connection passed through `gate` as it is made
    and lost. Pass it to uvicorn as `http=`."""

    class Gated(protocol_class):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)  # sets up what connection_lost needs; reads nothing
            self.gate_ticket = gate.opened(transport)
            self.gate_ticket.unparked = self._unparked

        def data_received(self, data: bytes) -> None:
            if self.gate_ticket.state != "parked":
                super().data_received(data)
                return
            # A loop that starts reading after connection_made whatever it asked (uvloop) read once: keep those
            # bytes, unparsed, for when the connection is served, and stop reading. asyncio's loop reads nothing.
            self.transport.pause_reading()
            self.gate_ticket.early += data

        def connection_lost(self, exc: Exception | None) -> None:
            gate.lost(self.gate_ticket)
            super().connection_lost(exc)

        def _unparked(self) -> None:
            if self.gate_ticket.early:
                early, self.gate_ticket.early = self.gate_ticket.early, b""
                super().data_received(early)

    Gated.__name__ = Gated.__qualname__ = f"Gated{protocol_class.__name__}"
    return Gated


def uvicorn_protocol(name: str) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class called `name` ("httptools" or "h11")."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    return import_from_string(HTTP_PROTOCOLS[name])
