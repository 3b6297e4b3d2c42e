"""Hostile peers, as real processes: `python -m tests.node.hostile_peers ATTACK --initial-peers ... [options]`.

The hostile-peer tests and `benchmarks/hostile.py` start these against a swarm of real nodes. Each attack
prints `ready` once it runs and then keeps attacking until killed or its `--duration` ends; it prints a line
`result {json}` with what it saw (codes of the refusals it got, sessions it could open) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from node.model.checkpoint import resolve_model
from node.net.credit import credit_key
from node.net.dhtkeys import owner_subkey, servers_key
from node.net.direct import DirectOffer
from node.net.identity import NodeIdentity, ephemeral_identity
from node.net.membership import _ParentBoundDHT, open_dht
from node.net.protocol import (
    INFERENCE_HANDLER,
    PUSH_HANDLER,
    PushOffer,
    digest,
    pack,
    parse_push_offer,
    push_offer,
    push_open,
    unpack_metadata,
)
from node.serve.node import Node, NodeConfig
from swarm.records import MAX_EPOCH, ServerRecord

ATTACKS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict]]] = {}


def attack(name: str):
    def register(fn):
        ATTACKS[name] = fn
        return fn

    return register


def ready() -> None:
    print("ready", flush=True)


async def until_done(duration_s: float) -> None:
    """Keeps what the attack holds for `duration_s` more seconds (0: none)."""
    await asyncio.sleep(max(0.0, duration_s))


# --- lying records ---------------------------------------------------------------------------------------


class LyingNode(Node):
    """A node that serves its layers (slowly, if asked) but announces absurd claims: a layer in 0.1 us, 50 TB
    of memory, and the largest epoch a record may carry."""

    async def _announce(self, state: str | None = None) -> None:
        self.record = dataclasses.replace(self.record, state=state or self.record.state, layer_latency_s=1e-7,
                                          prefill_s_per_token_per_layer=1e-9, memory_bytes=5e13, epoch=MAX_EPOCH,
                                          free_kv_tokens=1 << 20)
        await self.peer.announce(self.record, ttl_s=self.config.ttl_s)


@attack("lying-record")
async def lying_record(args: argparse.Namespace) -> dict:
    start, end = (int(x) for x in args.layers.split(":"))
    node = LyingNode(resolve_model(args.model), NodeConfig(
        start=start, end=end, initial_peers=args.initial_peers, test_slowdown_s=args.slowdown_ms / 1000,
        ttl_s=args.ttl, bench=False))
    await node.start()
    print(f"peer {node.record.peer_id}", flush=True)
    ready()
    try:
        await asyncio.sleep(args.duration or float("inf"))  # serves (and lies) until killed
    finally:
        await node.stop()
    return {"steps_served": node.steps_served}


# --- attacks on a node's streams ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def attacker(args: argparse.Namespace) -> AsyncIterator[P2P]:
    """The attacker's own peer (a client-mode DHT peer on loopback) and its p2p replica."""
    peer = await asyncio.to_thread(open_dht, args.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    p2p = await peer.dht.replicate_p2p()
    try:
        yield p2p
    finally:
        await p2p.shutdown()
        peer.shutdown()


def opening(args: argparse.Namespace, session_id: str, **fields) -> runtime_pb2.ExpertRequest:
    start, end = (int(x) for x in args.layers.split(":"))
    return pack({"open": {"session_id": session_id, "start": start, "end": end, "max_length": args.max_length,
                          "relay": True, **fields}})


async def raw_stream(p2p: P2P, target: str, handler: str = INFERENCE_HANDLER):
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(target), handler)
    return reader, writer


async def first_answer(reader: asyncio.StreamReader, timeout_s: float = 30.0) -> str:
    """The code of the first answer on a raw stream: an error code, "ok", or "closed"."""
    try:
        response, error = await asyncio.wait_for(P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader), timeout_s)
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    except asyncio.TimeoutError:
        return "silent"
    if error is not None:
        return "rpc_error"
    return str(unpack_metadata(response).get("error", {}).get("code", "ok"))


@attack("oversized")
async def oversized(args: argparse.Namespace) -> dict:
    """`count` streams, each sending a message whose header announces `size_mb` MB, then that many bytes."""
    size = int(args.size_mb * (1 << 20))

    async def one(p2p: P2P, with_opening: bool) -> tuple[str, int]:
        reader, writer = await raw_stream(p2p, args.target)
        if with_opening:  # past the opening, the cap is a step's
            await P2P.send_protobuf(opening(args, uuid.uuid4().hex), writer)
            await first_answer(reader)
        writer.write(P2P.MESSAGE_MARKER + size.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        sent, chunk = 0, b"\0" * (1 << 20)
        try:
            while sent < size:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
                sent += len(chunk)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        answer = await first_answer(reader, 10)
        writer.close()
        return answer, sent

    async with attacker(args) as p2p:
        ready()
        results = await asyncio.gather(*(one(p2p, i % 2 == 1) for i in range(args.count)), return_exceptions=True)
        await until_done(args.duration)
    answers = [r for r in results if isinstance(r, tuple)]
    return {"codes": sorted({code for code, _ in answers}), "max_sent_mb": max((s for _, s in answers), default=0)
            / (1 << 20), "failed": sum(not isinstance(r, tuple) for r in results)}


@attack("never-read")
async def never_read(args: argparse.Namespace) -> dict:
    """`count` sessions that send refused steps with a large field as fast as they may, and never read a reply."""
    bad_step = pack({"position": "x" * (256 << 10)})  # answered with an error text, which must not echo it

    async def one(p2p: P2P) -> int:
        reader, writer = await raw_stream(p2p, args.target)
        await P2P.send_protobuf(opening(args, uuid.uuid4().hex), writer)
        sent = 0
        deadline = time.monotonic() + (args.duration or 3600)
        try:
            while time.monotonic() < deadline:
                await asyncio.wait_for(P2P.send_protobuf(bad_step, writer), 5)
                sent += 1
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        writer.close()
        return sent

    async with attacker(args) as p2p:
        ready()
        sent = await asyncio.gather(*(one(p2p) for _ in range(args.count)), return_exceptions=True)
    return {"steps_sent": sum(n for n in sent if isinstance(n, int))}


@attack("push-flood")
async def push_flood(args: argparse.Namespace) -> dict:
    """`count` push streams naming sessions that do not exist, held open."""

    async def one(p2p: P2P) -> str:
        reader, writer = await raw_stream(p2p, args.target, PUSH_HANDLER)
        await P2P.send_protobuf(push_open(uuid.uuid4().hex, str(p2p.peer_id)), writer)
        code = await first_answer(reader, 60)
        writer.close()
        return code

    async with attacker(args) as p2p:
        ready()
        started = time.monotonic()
        codes = await asyncio.gather(*(one(p2p) for _ in range(args.count)), return_exceptions=True)
        held_s = time.monotonic() - started
        await until_done(max(0.0, args.duration - held_s))
    return {"codes": dict(Counter(c if isinstance(c, str) else type(c).__name__ for c in codes)),
            "held_s": round(held_s, 1)}


@attack("idle-hoard")
async def idle_hoard(args: argparse.Namespace) -> dict:
    """`count` sessions of `max_length` tokens from each of `peers` fresh peer ids, opened and never stepped."""

    held: list = []  # the streams stay open (their sessions reserved) as long as we hold them

    async def hoard(p2p: P2P) -> list:
        async def one() -> str:
            reader, writer = await raw_stream(p2p, args.target)
            await P2P.send_protobuf(opening(args, uuid.uuid4().hex), writer)
            held.append((reader, writer))
            return await first_answer(reader)

        return [await one() for _ in range(args.count)]

    results = []
    async with contextlib.AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(attacker(args)) for _ in range(args.peers)]
        for p2p in peers:
            results += await hoard(p2p)
        ready()
        await until_done(args.duration)
    return {"codes": dict(Counter(results))}


# --- attacks on direct links -----------------------------------------------------------------------------


async def listen_recording(host: str, received: list[bytes]) -> tuple[asyncio.Server, int]:
    """A TCP port that records whatever is written to it (a third party's, or one posing as a listener)."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            received.append(await asyncio.wait_for(reader.read(1 << 16), 10))
        writer.close()

    server = await asyncio.start_server(on_connection, host, 0)
    return server, server.sockets[0].getsockname()[1]


@attack("bad-offer")
async def bad_offer(args: argparse.Namespace) -> dict:
    """As a session's next stage, answers the target's push stream with direct offers naming a third party's port
    (on 127.0.0.2) or a port of ours that cannot prove the offer's key; records what reaches either."""
    to_victim: list[bytes] = []
    to_fake: list[bytes] = []
    tickets: list[bytes] = []
    victim, victim_port = await listen_recording("127.0.0.2", to_victim)
    fake, fake_port = await listen_recording("127.0.0.1", to_fake)

    async def as_next_stage(requests, context):
        async for _ in requests:
            break  # the push stream's opening
        ticket = uuid.uuid4().bytes
        tickets.append(ticket)
        addrs = (("127.0.0.2", victim_port),) if len(tickets) % 2 else (("127.0.0.1", fake_port),)
        yield push_offer(PushOffer(None, DirectOffer(addrs, ticket, uuid.uuid4().bytes * 2)))
        async for _ in requests:
            pass

    async with attacker(args) as p2p:
        await p2p.add_protobuf_handler(PUSH_HANDLER, as_next_stage, runtime_pb2.ExpertRequest, stream_input=True,
                                       stream_output=True)
        sessions = []
        for _ in range(args.count):
            reader, writer = await raw_stream(p2p, args.target)
            await P2P.send_protobuf(opening(args, uuid.uuid4().hex, relay=False, next=str(p2p.peer_id)), writer)
            sessions.append((await first_answer(reader), writer))
        ready()
        await asyncio.sleep(max(5.0, args.duration))
    victim.close()
    fake.close()
    leaked = [t for t in tickets if any(t in data for data in to_victim + to_fake)]
    return {"opened": sum(code == "ok" for code, _ in sessions), "offers": len(tickets),
            "victim_connections": len(to_victim), "victim_bytes": sum(map(len, to_victim)),
            "fake_connections": len(to_fake), "tickets_leaked": len(leaked)}


@attack("direct-squat")
async def direct_squat(args: argparse.Namespace) -> dict:
    """Learns the target's direct port from an offer (posing as a session's previous stage), then holds `count`
    connections to it from 127.0.0.2 that never present a ticket."""
    async with attacker(args) as p2p:
        me = str(p2p.peer_id)
        session_id = uuid.uuid4().hex
        reader, writer = await raw_stream(p2p, args.target)
        await P2P.send_protobuf(opening(args, session_id, relay=False, prev=me), writer)
        await first_answer(reader)
        push_reader, push_writer = await raw_stream(p2p, args.target, PUSH_HANDLER)
        await P2P.send_protobuf(push_open(session_id, me), push_writer)
        response, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, push_reader)
        offer = parse_push_offer(unpack_metadata(response))
        host, port = offer.direct.addrs[0]

        async def squat() -> asyncio.StreamWriter | None:
            """A connection that never presents a ticket: its writer while the listener keeps it, else None."""
            try:
                conn_reader, conn_writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
            except OSError:
                return None
            try:
                if await asyncio.wait_for(conn_reader.read(1), 0.5) == b"":
                    conn_writer.close()
                    return None  # closed on us at once
            except asyncio.TimeoutError:
                return conn_writer  # the listener waits for our hello
            except ConnectionError:
                return None
            return conn_writer

        most_held, refused, rounds = 0, 0, 0
        deadline = time.monotonic() + max(args.duration, 1.0)
        ready()
        while time.monotonic() < deadline:  # the listener drops silent ones after a while: open them again
            writers = await asyncio.gather(*(squat() for _ in range(args.count)))
            held = [w for w in writers if w is not None]
            most_held, refused, rounds = max(most_held, len(held)), refused + len(writers) - len(held), rounds + 1
            await asyncio.sleep(2.0)
            for writer in held:
                writer.close()
    return {"most_held": most_held, "refused": refused, "rounds": rounds}


@attack("forged-pushes")
async def forged_pushes(args: argparse.Namespace) -> dict:
    """Opens a session naming itself the previous stage, then pushes `count` steps whose receipts it did not sign
    (no endorsed session key, a zero signature), each at the session's next position, and reads every answer."""
    hidden_size = resolve_model(args.model).config.hidden_size
    async with attacker(args) as p2p:
        me, session_id = str(p2p.peer_id), uuid.uuid4().hex
        reader, writer = await raw_stream(p2p, args.target)
        await P2P.send_protobuf(opening(args, session_id, relay=False, prev=me), writer)
        opened = await first_answer(reader)
        push_reader, push_writer = await raw_stream(p2p, args.target, PUSH_HANDLER)
        await P2P.send_protobuf(push_open(session_id, me), push_writer)
        ready()
        codes: Counter = Counter()
        for _ in range(args.count):
            hidden = torch.randn(1, 1, hidden_size)
            receipt = {"in": "0" * 32, "out": digest(hidden), "chain": b"\0" * 32, "sig": b"\0" * 64}
            await P2P.send_protobuf(pack({"position": 0, "receipt": receipt}, [hidden]), push_writer)
            codes[await first_answer(reader)] += 1
        push_writer.close()
        writer.close()
    return {"opened": opened, "codes": dict(codes)}


# --- attacks on the DHT ------------------------------------------------------------------------------------


class RawDHT(_ParentBoundDHT):
    """hivemind's DHT as any peer may run it (no validators, no bounds), in a process that ends with this one's."""

    bounded = False


@attack("dht-junk")
async def dht_junk(args: argparse.Namespace) -> dict:
    """A DHT peer without validators that keeps, and offers to every peer near our keys: a 1 MB server record,
    `count` copies of its own signed server record under distinct subkeys (its owner key with a comment added), and
    signed values of no Layerhive kind, or of another kind than their key's. It serves them to readers until its
    `--duration` ends; it reports how many of each the other peers accepted."""
    identity = ephemeral_identity()
    dht = RawDHT(initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        plant = functools.partial(_plant_junk, identity.private_key, resolve_model(args.model).name,
                                  args.count, max(args.duration, 60.0) + 60.0)
        accepted = await asyncio.to_thread(dht.run_coroutine, plant)
        print(f"peer {dht.peer_id.to_base58()}", flush=True)
        print("accepted " + json.dumps(accepted), flush=True)
        ready()
        await until_done(args.duration)
    finally:
        dht.shutdown()
    return {"accepted": accepted}


async def _plant_junk(private_key: RSAPrivateKey, model: str, count: int, ttl_s: float, _dht: DHT, node: Any
                      ) -> dict[str, int]:
    """Runs in the attacker's DHT process (a hivemind DHT call carries at most a few KB in: all is made here)."""
    me = NodeIdentity(private_key)
    subkey, expiration = owner_subkey(me), get_dht_time() + ttl_s
    record = ServerRecord(peer_id=me.peer_id, model=model, start=0, end=1, memory_bytes=1e9).to_dict()

    def signed(key_name: str, sub: str, value: dict) -> tuple[DHTID, str, bytes]:
        key_id, value_bytes = DHTID.generate(source=key_name), MSGPackSerializer.dumps(value)
        unsigned = DHTRecord(key_id.to_bytes(), MSGPackSerializer.dumps(sub), value_bytes, expiration)
        signature = private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(unsigned)))
        return key_id, sub, value_bytes + b"[signature:" + signature + b"]"

    junk = {
        "huge": [signed(servers_key(model), subkey, {**record, "pad": "x" * (1 << 20)})],
        "many": [signed(servers_key(model), subkey.replace("]", f" copy{i}]"), record) for i in range(count)],
        "no_kind": [signed(servers_key(model), subkey, {"hello": "world"}),
                    signed(credit_key(model), subkey, {"hello": "world"})],
        "wrong_key": [signed(credit_key(model), subkey, record)],
    }
    accepted = {}
    for name, entries in junk.items():
        for key_id, sub, value in entries:
            node.protocol.storage.store_subkey(key_id, sub, value, expiration)
        accepted[name] = await _offer(node, entries[:1000], expiration)
    return accepted


async def _offer(node: Any, entries: list[tuple[DHTID, str, bytes]], expiration: float) -> int:
    """Offers `entries` to every peer near their keys, 100 a call; how many of them the peers stored, in all."""
    stored = 0
    for key_id in {key_id for key_id, _, _ in entries}:
        mine = [(sub, value) for k, sub, value in entries if k == key_id]
        for peer in (await node.find_nearest_nodes([key_id], exclude_self=True))[key_id].values():
            for i in range(0, len(mine), 100):
                batch = mine[i:i + 100]
                ok = await node.protocol.call_store(peer, [key_id] * len(batch), [v for _, v in batch],
                                                    expiration, subkeys=[s for s, _ in batch])
                stored += sum(bool(x) for x in ok or [])
    return stored


# --- running them (the tests and benchmarks/hostile.py) ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


class Hostile:
    """A hostile process (`python -m tests.node.hostile_peers ATTACK ...`), started and waited for `ready`."""

    def __init__(self, attack: str, initial_peers: list[str], model: str, *args: str, ready_timeout_s: float = 180
                 ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.node.hostile_peers", attack, "--initial-peers", *initial_peers,
             "--model", model, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        deadline = time.monotonic() + ready_timeout_s
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("ready"):
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise AssertionError(f"the hostile process {attack} did not start:\n" + "\n".join(self.lines[-30:]))

    def value(self, prefix: str) -> str:
        return next(line.removeprefix(prefix).strip() for line in self.lines if line.startswith(prefix))

    def result(self, timeout_s: float = 120) -> dict:
        """Waits for the attack to end (its --duration) and returns what it reported."""
        out, _ = self.process.communicate(timeout=timeout_s)
        self.lines += out.splitlines()
        return json.loads(self.value("result "))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def hostile(*args, **kwargs) -> Iterator[Hostile]:
    process = Hostile(*args, **kwargs)
    try:
        yield process
    finally:
        process.stop()


class RssPeak:
    """The peak resident memory of a process (and its p2p daemon), sampled on a thread while in the context."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.idle = self.now()
        self._stop = threading.Event()

    def now(self) -> int:
        with contextlib.suppress(psutil.Error):
            return sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
        return 0

    def __enter__(self) -> RssPeak:
        self.idle = self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.idle) / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--target", default=None, help="the peer id attacked")
    parser.add_argument("--layers", default="0:1", help="START:END the attack names (or serves, for a lying node)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds the attack holds what it took (a lying node: serves this long; 0: until killed)")
    parser.add_argument("--slowdown-ms", type=float, default=0.0)
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--count", type=int, default=64, help="how many streams, sessions or connections")
    parser.add_argument("--size-mb", type=float, default=64.0, help="how large an oversized message is")
    parser.add_argument("--max-length", type=int, default=256, help="the sessions' max_length")
    parser.add_argument("--peers", type=int, default=1, help="how many peer ids the attack uses")
    args = parser.parse_args(argv)
    result = asyncio.run(ATTACKS[args.attack](args))
    print("result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
