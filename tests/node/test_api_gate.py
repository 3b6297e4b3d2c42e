"""The API's connection gate (node.app.api_gate) in a real uvicorn server, driven over real loopback sockets from
several source addresses (127.0.0.x: all of 127/8 is loopback on Linux)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from node.app.api_gate import ConnectionGate, address_of, gated_protocol, uvicorn_protocol

pytestmark = pytest.mark.timeout(120)

REQUEST = b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(scope, receive, send) -> None:
    """A trivial ASGI app: 200 "ok" to every request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def gated_server(gate: ConnectionGate, parser: str = "httptools", loop: str = "asyncio") -> Iterator[int]:
    """uvicorn (on asyncio's loop, as `node.app.api.serve` runs it) serving `hello` behind `gate` in a thread;
    yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(hello, http=gated_protocol(uvicorn_protocol(parser), gate), log_level="warning",
                            lifespan="off", loop=loop)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return sock


def ask(sock: socket.socket) -> bytes:
    """Sends a request on `sock` (kept alive) and returns its whole response."""
    sock.sendall(REQUEST)
    return answer(sock)


def answer(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (waits for it up to the socket's timeout)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# uvloop starts reading after connection_made whatever it asked: the gate keeps that one read for when it serves.
@pytest.mark.parametrize(("parser", "loop"), [("httptools", "asyncio"), ("h11", "asyncio"), ("httptools", "uvloop")])
def test_a_connection_beyond_its_address_cap_is_parked_unread_until_a_served_one_closes(parser: str, loop: str
                                                                                         ) -> None:
    gate = ConnectionGate(max_served_per_address=2, max_parked_per_address=2)
    with gated_server(gate, parser, loop) as port:
        first, second = connect(port), connect(port)
        assert ask(first).startswith(b"HTTP/1.1 200") and ask(second).startswith(b"HTTP/1.1 200")
        third = connect(port)
        wait_until(lambda: gate.parked() == 1)
        third.sendall(REQUEST)
        # Parked: its request is not read, so not answered, however long it waits (here 0.5 s) ...
        assert select.select([third], [], [], 0.5)[0] == []
        assert ask(second).startswith(b"HTTP/1.1 200")  # ... while its address's served ones are served on
        first.close()  # ... and it is served once one of them closes
        assert answer(third).startswith(b"HTTP/1.1 200")
        assert gate.counts == {"served": 2, "parked": 1, "unparked": 1}
        for sock in (second, third):
            sock.close()
        wait_until(lambda: gate.open == 0)
        assert gate.addresses == {}  # nothing kept of an address without connections


def test_beyond_its_parked_cap_an_address_is_closed_at_once_and_another_address_is_still_served() -> None:
    gate = ConnectionGate(max_served_per_address=2, max_parked_per_address=2)
    with gated_server(gate) as port:
        held = [connect(port) for _ in range(4)]  # 127.0.0.1 holds its full share: 2 served, 2 parked
        wait_until(lambda: gate.open == 4)
        assert gate.parked() == 2
        extra = connect(port)
        extra.sendall(REQUEST)
        assert closed_by_server(extra)
        assert gate.counts["closed"] == 1 and gate.open == 4
        honest = connect(port, source="127.0.0.2")
        assert ask(honest).startswith(b"HTTP/1.1 200")
        assert ask(honest).startswith(b"HTTP/1.1 200")  # kept alive, still served
        for sock in (*held, extra, honest):
            sock.close()
        wait_until(lambda: gate.open == 0)


def test_beyond_the_global_cap_every_new_connection_is_closed_at_once() -> None:
    gate = ConnectionGate(max_served_per_address=2, max_parked_per_address=2, max_open=3)
    with gated_server(gate) as port:
        served = [connect(port), connect(port), connect(port, source="127.0.0.2")]
        for sock in served:
            assert ask(sock).startswith(b"HTTP/1.1 200")
        late = connect(port, source="127.0.0.3")  # a fresh address, but no room left in all
        assert closed_by_server(late)
        assert gate.counts["closed"] == 1
        served[0].close()
        wait_until(lambda: gate.open == 2)
        again = connect(port, source="127.0.0.3")
        assert ask(again).startswith(b"HTTP/1.1 200")
        for sock in (*served, late, again):
            sock.close()


def test_a_connection_parked_too_long_is_closed() -> None:
    gate = ConnectionGate(max_served_per_address=1, max_parked_per_address=2, park_timeout_s=0.5)
    with gated_server(gate) as port:
        served, parked = connect(port), connect(port)
        assert ask(served).startswith(b"HTTP/1.1 200")
        parked.sendall(REQUEST)
        assert closed_by_server(parked)  # closed by the timeout, its request never read
        wait_until(lambda: gate.open == 1)
        assert gate.parked() == 0 and gate.counts["unparked"] == 0
        assert ask(served).startswith(b"HTTP/1.1 200")
        served.close()
        parked.close()


def test_addresses_count_by_host_ipv6_by_its_64() -> None:
    assert address_of(("10.1.2.3", 5)) == "10.1.2.3"
    assert address_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    assert address_of(("2001:db8:1:2:aaaa::1", 5, 0, 0)) == address_of(("2001:db8:1:2:bbbb::9", 7, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert address_of(("2001:db8:1:3::1", 5, 0, 0)) != address_of(("2001:db8:1:2::1", 5, 0, 0))
    assert address_of(None) == "unknown"
