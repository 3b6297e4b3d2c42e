"""A long-lived bootstrap and relay peer that anyone with a public address can host.

New peers join the swarm through it (it is a full DHT peer that validates records like every Layerhive
peer), nodes that cannot be dialled directly keep a relay reservation on it and serve through it, and it
answers `layerhive.dialback` so nodes can measure their own reachability (node.net.reachability).
A persistent identity keeps its peer id, and so the multiaddrs users put in their config, across restarts.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

from node.net.identity import load_identity
from node.net.membership import SwarmPeer, open_dht
from node.net.reachability import add_dialback_handler

DEFAULT_IDENTITY = "bootstrap"


async def start_bootstrap(host_maddrs: Sequence[str], *, announce_maddrs: Sequence[str] = (),
                          initial_peers: Sequence[str] = (), identity: str | None = DEFAULT_IDENTITY) -> SwarmPeer:
    """A running bootstrap/relay peer with its dial-back handler; `identity=None` for a throwaway peer id."""
    peer = open_dht(initial_peers, host_maddrs, identity=load_identity(identity) if identity else None,
                    announce_maddrs=announce_maddrs, relay_service=True)
    try:
        await add_dialback_handler(await peer.dht.replicate_p2p())
    except BaseException:
        peer.shutdown()
        raise
    return peer


async def run_bootstrap(host_maddrs: Sequence[str], *, announce_maddrs: Sequence[str] = (),
                        initial_peers: Sequence[str] = (), identity: str | None = DEFAULT_IDENTITY) -> None:
    """Serves until SIGINT/SIGTERM, after printing the multiaddrs to give users as initial peers."""
    peer = await start_bootstrap(host_maddrs, announce_maddrs=announce_maddrs, initial_peers=initial_peers,
                                 identity=identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("bootstrap and relay peer online; initial peers:", flush=True)
        for maddr in peer.visible_maddrs:
            print(f"  {maddr}", flush=True)
        await stop.wait()
    finally:
        peer.shutdown()
