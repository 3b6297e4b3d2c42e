"""A serving node: joins the DHT, loads its layers, answers inference streams, heartbeats its record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import psutil
import torch
from hivemind import DHT

from node.checkpoint import ModelSource
from node.identity import NodeIdentity, load_identity
from node.membership import DEFAULT_TTL_S, announce, open_dht
from node.probe import add_probe_handlers
from node.server import StageServer
from node.stage import Stage, default_device, default_dtype
from swarm.records import ServerRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    start: int
    end: int
    initial_peers: Sequence[str] = ()
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    device: str | None = None
    kv_budget_bytes: int | None = None  # default: a quarter of the memory left after loading
    max_length: int = 8192
    ttl_s: float = DEFAULT_TTL_S
    identity: str | None = None  # name of a persistent identity (peer id + signing key); None: a new one per run
    send_delay_s: float = 0.0  # emulated one-way latency on everything this node sends (WAN tests)
    test_perturb_scale: float = 0.0  # testing aid: noise added to every output (a lying node; see node.verify)


def start_dht(initial_peers: Sequence[str], host_maddrs: Sequence[str], *, client_mode: bool = False,
              identity: NodeIdentity | None = None) -> DHT:
    """A DHT peer that signs its records with `identity` (an ephemeral one if None) and validates everyone's."""
    return open_dht(initial_peers, host_maddrs, client_mode=client_mode, identity=identity)


class Node:
    def __init__(self, source: ModelSource, config: NodeConfig) -> None:
        self.source, self.config = source, config
        self.dht: DHT | None = None
        self.server: StageServer | None = None
        self.record: ServerRecord | None = None
        self._heartbeat: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.config
        device = torch.device(config.device) if config.device else default_device()
        dtype = default_dtype(device)
        identity = load_identity(config.identity) if config.identity else None
        self.dht = start_dht(config.initial_peers, config.host_maddrs, identity=identity)
        loop = asyncio.get_running_loop()
        stage = await loop.run_in_executor(
            None, lambda: Stage(self.source, config.start, config.end, dtype=dtype, device=device)
        )
        budget = config.kv_budget_bytes or default_kv_budget(device)
        self.server = StageServer(stage, kv_budget_bytes=budget, max_length=config.max_length,
                                  send_delay_s=config.send_delay_s, test_perturb_scale=config.test_perturb_scale)
        p2p = await self.dht.replicate_p2p()
        await self.server.add_handlers(p2p)
        await add_probe_handlers(p2p)  # peers measure their RTT and uplink to us through these
        self.record = ServerRecord(
            peer_id=self.dht.peer_id.to_base58(), model=self.source.name,
            start=config.start, end=config.end, state="online",
        )
        await self._announce()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        logger.info("serving %s layers %d:%d as %s", self.source.name, config.start, config.end,
                    self.record.peer_id)

    @property
    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def _announce(self, state: str | None = None) -> None:
        assert self.record is not None and self.server is not None and self.dht is not None
        self.record = replace(
            self.record, state=state or self.record.state, free_kv_tokens=self.server.free_kv_tokens,
            queue_len=self.server.queue_len, sessions=len(self.server.sessions),
            layer_latency_s=self.server.layer_latency_s,
        )
        await announce(self.dht, self.record, ttl_s=self.config.ttl_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.ttl_s / 3)
            try:
                await self._announce()
            except Exception:
                logger.exception("heartbeat failed")

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.record is not None:
            try:
                await self._announce("offline")
            except Exception:
                logger.warning("could not announce going offline", exc_info=True)
        if self.server is not None:
            self.server.shutdown()
        if self.dht is not None:
            self.dht.shutdown()


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return int(psutil.virtual_memory().available * 0.25)
