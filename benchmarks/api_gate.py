"""What one hostile connection costs the API server's CPU: refused after its headers are parsed (what a flooder's
connections beyond the Guard's held refusals cost before the gate), parked by the gate, or closed by it at once.

A uvicorn server (httptools, on the asyncio loop and on uvloop) runs `Guard` (its tarpit off, so every refusal
goes out at once) in front of a trivial app, behind `node.app.api_gate.ConnectionGate`. From 127.0.0.1, `--count`
connections each send a request announcing a 100 MB body and 64 KB of it:
- refused: the gate has room, the Guard answers 413 and closes (the client reads the answer);
- parked: the address's one served slot is held by an idle connection, every new one is parked (left open);
- closed: as parked, but the gate parks none, so each is closed at accept.
The server's CPU seconds (user + system, psutil) over each batch, divided by the connections, are the cost of one.

Usage: python benchmarks/api_gate.py [--count 400]
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n")
BODY = b"x" * (64 << 10)


def serve(port: int, loop: str, served: int, parked: int) -> None:
    """The server (in its own process): Guard without a tarpit, behind a gate of `served` and `parked`."""
    import uvicorn

    from node.app.api_gate import ConnectionGate, gated_protocol, uvicorn_protocol
    from node.app.api_guard import FairShare, Guard

    async def hello(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = ConnectionGate(max_served_per_address=served, max_parked_per_address=parked, max_open=100_000,
                          park_timeout_s=600)
    app = Guard(hello, fair_share=FairShare(free_refusals=float("inf")))
    uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http=gated_protocol(uvicorn_protocol("httptools"), gate),
                log_level="warning", lifespan="off", timeout_keep_alive=600)


@contextlib.contextmanager
def server(loop: str, served: int, parked: int):
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--loop", loop, "--served",
                                str(served), "--parked", str(parked)])
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if probe.recv(100).startswith(b"HTTP/1.1 200"):
                    break
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.2)
        yield port, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def hostile_connection(port: int, wait: bool) -> socket.socket | str:
    """Opens one connection and sends the head and 64 KB of the body. `wait`: reads what became of it (refused or
    closed); else returns the socket, left open (parked)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if not wait:
        sock.sendall(HEAD + BODY)
        return sock
    try:
        sock.sendall(HEAD + BODY)
        reply = sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        reply = b""
    sock.close()
    return "refused" if reply.startswith(b"HTTP/1.1 413") else "closed"


def batch(loop: str, mode: str, count: int) -> tuple[float, dict[str, int]]:
    """CPU milliseconds per connection over `count` hostile connections (the server's idle CPU over the same time
    taken off), and what became of them."""
    served, parked = {"refused": (100_000, 0), "parked": (1, 100_000), "closed": (1, 0)}[mode]
    with server(loop, served, parked) as (port, process):
        holder = socket.create_connection(("127.0.0.1", port), timeout=5)  # takes the address's slot (parked/closed)
        holder.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        holder.recv(100)
        time.sleep(0.5)
        idle_from, idle_cpu = time.monotonic(), cpu_s(process)
        time.sleep(2)
        idle_rate = (cpu_s(process) - idle_cpu) / (time.monotonic() - idle_from)
        started, before = time.monotonic(), cpu_s(process)
        results = [hostile_connection(port, wait=mode != "parked") for _ in range(count)]
        time.sleep(0.5)  # the server's last callbacks
        spent = cpu_s(process) - before - idle_rate * (time.monotonic() - started)
        kept = [sock for sock in results if isinstance(sock, socket.socket)]
        answered = select.select(kept, [], [], 0.5)[0] if kept else []
        outcomes = Counter(result for result in results if isinstance(result, str))
        outcomes.update({"parked": len(kept) - len(answered), "answered while parked": len(answered)})
        for sock in [holder, *kept]:
            sock.close()
    return 1e3 * spent / count, {name: n for name, n in outcomes.items() if n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--served", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parked", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.loop, args.served, args.parked)
        return
    print(f"{'loop':8} {'connection':10} {'CPU ms each (runs)':>28} {'median':>7} {'vs refused':>10}  outcomes")
    for loop in ("asyncio", "uvloop"):
        refused_ms = None
        for mode in ("refused", "parked", "closed"):
            runs = [batch(loop, mode, args.count) for _ in range(args.repeats)]
            median = statistics.median(ms for ms, _ in runs)
            refused_ms = refused_ms or median
            print(f"{loop:8} {mode:10} {' '.join(f'{ms:.3f}' for ms, _ in runs):>28} {median:7.3f} "
                  f"{median / refused_ms:9.2f}x  {runs[-1][1]}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
