"""Can peers dial this node directly, only through a relay, or not at all?

Serving through a relay (libp2p circuit relay v2): the node keeps a reservation on a relay peer (usually a
bootstrap peer, see node.app.bootstrap) and announces `<relay multiaddr>/p2p-circuit` as its address, so peers
that look it up dial the relay, which splices the two connections. p2pd's autorelay is what keeps the
reservation; we announce the circuit addresses ourselves because p2pd (hivemind 1.1.12) does not add them
to the addresses it tells peers about.

Measuring: a node asks a peer (the bootstrap) to dial it back through `layerhive.dialback`; the bootstrap
opens a plain TCP connection to each direct address the node claims. Success means "direct"; if every
answer is "no", the node is "relayed" when it announces circuit addresses, else "unreachable".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.net.protocol import ProtocolError, error_response, pack, pack_response, raise_if_error, unpack_metadata

logger = logging.getLogger(__name__)

DIALBACK_HANDLER = "layerhive.dialback"
DIALBACK_TIMEOUT_S = 3.0  # a NAT drops the SYN silently: no answer in this long counts as "not dialable"
MAX_DIALBACK_ADDRS = 4  # a peer cannot make the bootstrap knock on many doors with one request
DIRECT, RELAYED, UNREACHABLE = "direct", "relayed", "unreachable"


def circuit_maddrs(relays: Sequence[str]) -> list[str]:
    """The addresses a node reachable through `relays` announces: `<relay>/p2p-circuit` for each."""
    for relay in relays:
        if "/p2p/" not in relay:
            raise ValueError(f"relay address {relay!r} must end with /p2p/<relay peer id>")
    return [f"{relay.rstrip('/')}/p2p-circuit" for relay in relays]


def is_circuit(maddr: object) -> bool:
    return "/p2p-circuit" in str(maddr)


def relay_p2p_options(relays: Sequence[str], announce_maddrs: Sequence[str]) -> dict[str, Any]:
    """hivemind P2P options for a node that serves through `relays`: it reserves a slot on each (autorelay
    with the relays as static relays; forced "private", since AutoNAT needs several peers and minutes to
    decide), and announces the circuit addresses plus any explicit `announce_maddrs`."""
    install_static_relay_flag()
    return dict(
        use_relay=True, use_auto_relay=True, force_reachability="private", trusted_relays=list(relays),
        announce_maddrs=[*announce_maddrs, *circuit_maddrs(relays)],
    )


_installed = False


def install_static_relay_flag() -> None:
    """Makes p2pd use the trusted relays *only* (`-relayDiscovery=0`) whenever it is given some.

    With discovery on (hivemind's only mode), go-libp2p's autorelay waits for 4 candidate relays or a
    3-minute boot delay before reserving a slot; with static relays it reserves at once. hivemind passes
    no such flag, so we add it where hivemind builds p2pd's command line. Only p2pd started with
    `trustedRelays` is affected, i.e. only the P2Ps `relay_p2p_options` configures."""
    global _installed
    if _installed:
        return
    original = P2P._make_process_args

    def make_process_args(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("trustedRelays") and kwargs.get("autoRelay"):
            kwargs["relayDiscovery"] = False
        return original(*args, **kwargs)

    P2P._make_process_args = staticmethod(make_process_args)
    _installed = True


# --- the bootstrap's side -------------------------------------------------------------------------------


async def add_dialback_handler(p2p: P2P) -> None:
    await p2p.add_protobuf_handler(DIALBACK_HANDLER, _dialback, runtime_pb2.ExpertRequest)


async def _dialback(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    try:
        maddrs = unpack_metadata(request).get("maddrs")
    except ProtocolError as e:
        return error_response("bad_request", str(e))
    if not isinstance(maddrs, list) or not all(isinstance(m, str) for m in maddrs):
        return error_response("bad_request", "expected {'maddrs': [multiaddr, ...]}")
    targets = [t for t in (tcp_target(m) for m in maddrs[:MAX_DIALBACK_ADDRS]) if t is not None]
    results = await asyncio.gather(*(tcp_dialable(host, port) for host, port in targets))
    dialable = [f"{host}:{port}" for (host, port), ok in zip(targets, results, strict=True) if ok]
    return pack_response({"dialable": dialable})


def tcp_target(maddr: str) -> tuple[str, int] | None:
    """(host, port) of a direct /ip4|ip6/HOST/tcp/PORT[/p2p/ID] address; None for anything else."""
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or is_circuit(maddr):
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    return (parts[1], port) if 0 < port < 65536 else None


async def tcp_dialable(host: str, port: int, timeout_s: float = DIALBACK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens. Only the handshake: libp2p's own handshake would also
    prove the peer id, which a TCP connect does not (a peer could point us at someone else's open port)."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


# --- the node's side ------------------------------------------------------------------------------------


async def measure_reachability(p2p: P2P, probers: Sequence[PeerID], *, relayed: bool,
                               timeout_s: float = 2 * DIALBACK_TIMEOUT_S + 5) -> str:
    """DIRECT if any prober could dial one of our direct addresses; else RELAYED if we serve through a
    relay, else UNREACHABLE. With no prober able to answer (none given, or none has the handler), we
    cannot tell: RELAYED for a node that serves through a relay, else DIRECT (peers may well dial us)."""
    direct = [str(m) for m in await p2p.get_visible_maddrs() if not is_circuit(m)]
    answered = False
    for prober in probers:
        try:
            response = await asyncio.wait_for(p2p.call_protobuf_handler(
                prober, DIALBACK_HANDLER, pack({"maddrs": direct}), runtime_pb2.ExpertResponse), timeout_s)
            dialable = raise_if_error(str(prober), response).get("dialable")
        except Exception as e:  # an old bootstrap without the handler, or an unreachable one
            logger.info("reachability probe via %s failed: %s", prober, e)
            continue
        answered = True
        if dialable:
            return DIRECT
    if relayed:
        return RELAYED
    return UNREACHABLE if answered else DIRECT


async def measure_in_dht(_dht: Any, node: Any, probers: Sequence[str], relayed: bool) -> str:
    """`measure_reachability` run inside a DHT's process (`DHT.run_coroutine`), on the DHT's own P2P."""
    return await measure_reachability(node.p2p, [PeerID.from_base58(p) for p in probers], relayed=relayed)


def peer_ids_of(maddrs: Sequence[str]) -> list[str]:
    """The distinct peer ids named by /p2p/<id> at the end of `maddrs`, in order."""
    ids: list[str] = []
    for maddr in maddrs:
        if "/p2p/" in maddr:
            peer = maddr.rsplit("/p2p/", 1)[1].strip("/")
            if peer and peer not in ids:
                ids.append(peer)
    return ids
