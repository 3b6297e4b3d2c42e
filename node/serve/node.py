"""A serving node: joins the DHT, takes a layer range, answers inference streams, heartbeats its record.

With a fixed range (`NodeConfig(start, end)`, `layerhive node --layers A:B`) the node serves that range,
as a manual override. Without one it joins: it measures itself, announces a "joining" record with its
capabilities, waits until the swarm's records settle, takes the range the deterministic plan over all
records gives it (`node.serve.assignment`), loads it and goes "online". While online it keeps re-planning;
when the plan moves it, the new layers load next to the old ones, and the old stage keeps its sessions
until they end (`_retire`), so coverage never has a gap. `pause` drains and withdraws; `resume` rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from node.model.checkpoint import ModelSource, resolve_model
from node.model.draft import DraftModel
from node.model.stage import Stage, default_device, default_dtype
from node.net.direct import DirectListener, listen_host, maddr_hosts
from node.net.identity import load_identity
from node.net.membership import DEFAULT_TTL_S, SwarmPeer, open_dht
from node.net.probe import add_probe_handlers
from node.net.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    MAX_OPENING_BYTES,
    PUSH_HANDLER,
    ProtocolError,
    error_response,
    max_message_bytes,
    pack_response,
    parse_open,
    parse_push_open,
)
from node.net.reachability import DIRECT
from node.net.streams import MessageTooLarge, PendingStreams, add_bounded_stream_handler
from node.serve.adversary import Adversary
from node.serve.assignment import (
    EpochTracker,
    SwarmStatus,
    check_records,
    model_spec,
    plan,
    planned_kv_budget,
    reference_memory,
    swarm_status,
)
from node.serve.benchmark import free_memory, measure_links, peer_id_of, run_bench, usable_memory
from node.serve.epochs import OwnEpoch, epoch_file
from node.serve.server import SessionWaiters, StageServer, linger
from swarm.records import ServerRecord, node_spec
from swarm.types import LayerRange

logger = logging.getLogger(__name__)

# Node states, as the controller reports them (record states are the swarm.records.STATES subset).
LINK_PROBE_BYTES = 1 << 20  # per uplink probe: 0.8 s at 10 Mbit/s, and twice that is all a measurement sends
LINK_REMEASURE_S = 600.0  # links change slowly; a failing push triggers a measurement sooner
LINK_RETRY_S = 60.0
NODE_STATES = ("stopped", "starting", "joining", "online", "draining", "paused", "failed")


@dataclass(frozen=True)
class NodeConfig:
    start: int | None = None  # a fixed range [start, end) (manual override); None: take one from the swarm
    end: int | None = None
    initial_peers: Sequence[str] = ()
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    device: str | None = None
    kv_budget_bytes: int | None = None  # default: the plan's KV share of the memory offered (_planned_kv_budget)
    max_length: int = 8192
    ttl_s: float = DEFAULT_TTL_S  # records expire after this; heartbeats and re-planning run every ttl_s / 3
    identity: str | None = None  # name of a persistent identity (peer id + signing key); None: a new one per run
    send_delay_s: float = 0.0  # emulated one-way latency on everything this node sends (WAN tests)
    send_bandwidth_bps: float = 0.0  # emulated uplink bandwidth for what this node sends (0: unlimited)
    test_perturb_scale: float = 0.0  # testing aid: noise added to outputs (a lying node; see node.serve.adversary)
    test_adversary: str = "liar"  # testing aid: how a node with test_perturb_scale > 0 lies
    dtype: str | None = None  # compute dtype ("float32", "bfloat16", "float16"); None: the device's default
    test_slowdown_s: float = 0.0  # testing aid: extra time per step, as on a slower GPU
    announce_maddrs: Sequence[str] = ()  # addresses peers should dial (e.g. behind port forwarding)
    relays: Sequence[str] | None = None  # relay peers to serve through; None: from the user's config
    max_memory_bytes: int | None = None  # offer at most this much memory for weights + KV cache
    region: str = ""
    bench: bool = True  # measure with `layerhive bench` (cached); False: a quick estimate (memory only)
    settle_periods: float = 2.0  # joining waits until the records stay unchanged this many heartbeat periods
    move_drain_s: float = 300.0  # how long a left range keeps serving its open sessions after a move
    direct_links: bool = True  # push to and take pushes from other stages over direct TCP links (node.net.direct)
    quant: str | None = None  # "none", "int8", "int4" (node.model.quant); None: by memory (benchmark.choose_quant)
    draft_model: str | None = None  # a small model with the target's tokenizer, drafting at a ring's first stage
    draft_quant: str = "none"  # how the draft model's layers are held (node.model.quant)

    @property
    def fixed(self) -> bool:
        return self.start is not None and self.end is not None

    @property
    def period_s(self) -> float:
        return self.ttl_s / 3


class Node:
    def __init__(self, source: ModelSource, config: NodeConfig) -> None:
        self.source, self.config = source, config
        self.spec = model_spec(source)
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = getattr(torch, config.dtype) if config.dtype else default_dtype(self.device)
        self.peer: SwarmPeer | None = None  # our DHT peer: announces our record, reads everyone's
        self.p2p: P2P | None = None
        self.server: StageServer | None = None  # the stage new sessions go to
        self.retiring: list[StageServer] = []  # stages left by a move or a pause, finishing their sessions
        self.record: ServerRecord | None = None
        self.state = "stopped"
        self.error: str | None = None
        self.listeners: list[Callable[[str], None]] = []  # called on the node's loop with the new state
        self.tracker = EpochTracker()  # other peers' newest epochs; our own come from `own_epoch`
        self.own_epoch = OwnEpoch(epoch_file(config.identity) if config.identity else None)
        self.sessions_opened = 0
        self.own_clients: set[str] = set()  # peer ids of this machine's own chat clients (see own_tokens_served)
        self._retired_tokens = self._retired_steps = self._retired_own_tokens = 0
        self._online_since: float | None = None
        self._online_s = 0.0
        self._capabilities: dict = {}
        self.drafter: DraftModel | None = None  # loaded with the first range that starts at layer 0
        self._heartbeat: asyncio.Task | None = None
        self._move: asyncio.Task | None = None
        self._retirements: set[asyncio.Task] = set()
        self._last_plan_key: tuple | None = None
        self.direct: DirectListener | None = None
        self.link_measurements = 0  # finished `_measure_links` runs
        self._links_measured_at: float | None = None
        self._link_failures_seen = 0
        self._links: asyncio.Task | None = None
        self.waiters = SessionWaiters()  # shared by our stages: a push may come for any of them
        self.pending = PendingStreams()  # streams not yet working (no opening yet, or waiting for their session)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the DHT, then serves the fixed range or joins; returns once the node is online."""
        config = self.config
        self._set_state("starting")
        identity = load_identity(config.identity) if config.identity else None
        self.peer = open_dht(config.initial_peers, config.host_maddrs, identity=identity,
                             announce_maddrs=config.announce_maddrs, relays=config.relays)
        self.p2p = await self.peer.dht.replicate_p2p()
        await self._add_handlers(self.p2p)
        if config.direct_links:
            most = max_message_bytes(self.source.hidden_size, int(self.source.config.vocab_size))
            self.direct = DirectListener(max_frame_bytes=most + 16)  # a sealed frame: the message and its tag
            await self.direct.start(listen_host(config.host_maddrs), maddr_hosts(self.visible_maddrs))
        # peers measure their RTT and uplink to us through these
        await add_probe_handlers(self.p2p, send_delay_s=self.config.send_delay_s)
        self._capabilities = await asyncio.get_running_loop().run_in_executor(None, self._measure)
        await self._measure_links()
        await self._go_online()

    async def _go_online(self) -> None:
        peer_id = self.peer.peer_id
        # Continue the swarm's epochs, and never go below our own: peers drop records older than they saw from us.
        epoch = max([r.epoch for r in await self._records()] + [self.own_epoch.newest])
        self.record = ServerRecord(peer_id=peer_id, model=self.source.name, start=0, end=1, state="joining",
                                   region=self.config.region, epoch=epoch, **self._capabilities,
                                   reachability=self.peer.reachability or DIRECT)  # as measured: what peers see
        if self.config.fixed:
            target = LayerRange(self.config.start, self.config.end)
        else:
            self._set_state("joining")
            await self._announce()
            self._start_heartbeat()
            target, epoch = await self._settled_range()
        self.server = await self._load(target)
        self.record = replace(self.record, start=target.start, end=target.end, state="online", epoch=epoch)
        await self._announce()
        self._start_heartbeat()
        self._set_state("online")
        logger.info("serving %s layers %s as %s (epoch %d)", self.source.name, target, peer_id, epoch)

    async def pause(self, deadline_s: float = 60.0) -> None:
        """Drains: refuses new sessions ("draining"), lets open ones finish for up to `deadline_s`, then
        announces "offline", stops heartbeating and frees the layers. The DHT peer stays up for `resume`.
        A node still "joining" (its join cancelled by the controller) serves nothing yet: it just withdraws."""
        if self.state not in ("online", "joining"):
            return
        self._cancel_move()
        servers = [s for s in [self.server, *self.retiring] if s is not None]
        if self.state == "online":
            self._set_state("draining")
            for server in servers:
                server.draining = True
            if self.record is not None:
                await self._announce("draining")
            deadline = time.monotonic() + deadline_s
            while any(s.sessions for s in servers) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        with contextlib.suppress(Exception):
            await self._announce("offline")
        for task in list(self._retirements):
            task.cancel()
        for server in servers:
            self._drop(server)
        self.server, self.retiring = None, []
        _free_memory(self.device)
        self._set_state("paused")

    async def resume(self) -> None:
        """Rejoins after `pause`: takes a new assignment (or the fixed range again)."""
        if self.state != "paused":
            return
        self._last_plan_key = None
        await self._go_online()

    async def set_memory_cap(self, max_memory_bytes: int | None) -> None:
        """Offers at most `max_memory_bytes` for weights and KV cache from now on (None: no cap). A serving
        node drains as in `pause` and rejoins with the new offer, so the swarm's plan takes it into account."""
        if max_memory_bytes is not None and max_memory_bytes <= 0:
            raise ValueError(f"the memory cap must be positive, got {max_memory_bytes} bytes")
        self.config = replace(self.config, max_memory_bytes=max_memory_bytes)
        if self.peer is None:  # not started: `start` measures with the new cap
            return
        serving = self.state == "online"
        if serving:
            await self.pause()
        self._capabilities = await asyncio.get_running_loop().run_in_executor(None, self._measure)
        if serving:
            await self.resume()

    async def stop(self) -> None:
        self._cancel_move()
        if self._links is not None:
            self._links.cancel()
        for task in list(self._retirements):
            task.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self.record is not None and self.state not in ("paused", "stopped"):
            try:
                await self._announce("offline")
            except Exception:
                logger.warning("could not announce going offline", exc_info=True)
        for server in [self.server, *self.retiring]:
            if server is not None:
                self._drop(server)
        self.server, self.retiring = None, []
        if self.direct is not None:
            await self.direct.close()
            self.direct = None
        if self.p2p is not None:  # our replica's connections to the daemon, closed on this loop while it runs
            await self.p2p.shutdown()
            self.p2p = None
        if self.peer is not None:
            self.peer.shutdown()
            self.peer = None
        self._set_state("stopped")

    @property
    def visible_maddrs(self) -> list[str]:
        assert self.peer is not None
        return self.peer.visible_maddrs

    @property
    def tokens_served(self) -> int:
        return self._retired_tokens + sum(s.tokens_served for s in self._servers())

    @property
    def own_tokens_served(self) -> int:
        """Of `tokens_served`, those of sessions opened by `own_clients`: this machine's own chats."""
        return self._retired_own_tokens + sum(s.own_tokens_served for s in self._servers())

    @property
    def steps_served(self) -> int:
        return self._retired_steps + sum(s.steps_served for s in self._servers())

    @property
    def online_s(self) -> float:
        since = self._online_since
        return self._online_s + (time.monotonic() - since if since is not None else 0.0)

    def fail(self, error: str) -> None:
        """Marks the node failed (an operation raised); `error` says why, for the UI."""
        self.error = error
        self._set_state("failed")

    def _servers(self) -> list[StageServer]:
        return [s for s in [self.server, *self.retiring] if s is not None]

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        now = time.monotonic()
        if self._online_since is not None:
            self._online_s += now - self._online_since
        self._online_since = now if state == "online" else None
        self.state = state
        for listener in list(self.listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("a state listener failed")

    # --- measuring, loading ---------------------------------------------------------------------------

    def _measure(self) -> dict:
        """The capability fields of our record (blocking). Memory is announced at the reference dtype."""
        config = self.config
        if config.bench and not config.fixed:  # a fixed range needs no plan, so no measurement worth waiting for
            try:
                result = run_bench(self.source, device=str(self.device), dtype=self.dtype,
                                   max_memory_bytes=config.max_memory_bytes, quant=config.quant)
                fields = result.record_fields()
                fields["memory_bytes"] = reference_memory(fields["memory_bytes"], self.dtype, self.source,
                                                          result.quant)
                return fields
            except Exception as e:
                logger.warning("bench failed (%s); estimating memory only", e)
        memory = usable_memory(self.device.type, *free_memory(self.device), config.max_memory_bytes)
        from node.serve.benchmark import choose_quant

        layers = config.end - config.start if config.fixed else None
        quant = config.quant or choose_quant(self.source, self.device, self.dtype, memory, layers=layers)
        return {"memory_bytes": reference_memory(memory, self.dtype, self.source, quant), "quant": quant}

    async def _measure_links(self) -> None:
        """Measures our uplink and RTTs to a few peers of the swarm (`measure_links`: bounded, a few pings and
        2 x 1 MB) and puts the uplink in our capabilities, so the next announce carries it. The first node of a
        swarm has no one to measure against: it measures later, on the heartbeat (`_links_due`)."""
        peers = [r.peer_id for r in await self._records() if r.peer_id != self.peer.peer_id]
        random.shuffle(peers)  # spread the probing load over the swarm
        peers += [p for p in (peer_id_of(m) for m in self.config.initial_peers) if p]
        try:
            result = await measure_links(self.p2p, peers, uplink_bytes=LINK_PROBE_BYTES)
        except Exception as e:  # a failed measurement keeps the last figures; it is retried on the heartbeat
            logger.warning("could not measure links: %s", e)
            return
        finally:
            self._links_measured_at = time.monotonic()
        self.link_measurements += 1
        if result.uplink_bps is None:
            logger.info("links not measured: %s", "; ".join(result.notes))
            return
        logger.info("measured uplink %.1f Mbit/s, RTT %s", result.uplink_bps / 1e6,
                    ", ".join(f"{p[:8]} {rtt * 1000:.1f} ms" for p, rtt in result.rtt_s.items()))
        self._capabilities["uplink_bps"] = result.uplink_bps
        if self.record is not None:
            self.record = replace(self.record, uplink_bps=result.uplink_bps)
        for server in self._servers():
            server.uplink_bps = result.uplink_bps

    def _links_due(self) -> bool:
        """Measure again: until a first uplink is measured (each heartbeat), every LINK_REMEASURE_S, and when a
        push to a next stage failed since the last time (at most every LINK_RETRY_S)."""
        if self._links is not None and not self._links.done():
            return False
        since = time.monotonic() - (self._links_measured_at or 0.0)
        failures = sum(s.push_failures for s in self._servers())
        troubled = failures > self._link_failures_seen
        self._link_failures_seen = failures
        if not self._capabilities.get("uplink_bps"):
            return since >= self.config.period_s
        return since >= LINK_REMEASURE_S or (troubled and since >= LINK_RETRY_S)

    async def _load(self, target: LayerRange) -> StageServer:
        config = self.config
        stage = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Stage(self.source, target.start, target.end, dtype=self.dtype, device=self.device,
                                quant=self._capabilities.get("quant", "none"))
        )
        if target.start == 0 and config.draft_model and self.drafter is None:
            self.drafter = await asyncio.get_running_loop().run_in_executor(None, self._load_drafter)
        budget = config.kv_budget_bytes
        if not budget:  # what the plan leaves for KV caches, less what else grows here with the sessions
            budget = self._planned_kv_budget(target) - stage.rotary.max_bytes(config.max_length)
            if target.start == 0 and self.drafter is not None:
                budget -= self.drafter.max_bytes  # the draft model lives in the same memory
            if budget <= 0:
                logger.warning("layers %s leave no memory for KV caches: sessions will be refused", target)
            budget = max(0, budget)
        server = StageServer(stage, kv_budget_bytes=budget, max_length=config.max_length,
                             send_delay_s=config.send_delay_s, adversary=_adversary(config),
                             test_slowdown_s=config.test_slowdown_s, send_bandwidth_bps=config.send_bandwidth_bps,
                             uplink_bps=self._capabilities.get("uplink_bps", 0.0),
                             identity_key=self.peer.identity.private_key,
                             drafter=self.drafter if target.start == 0 else None)
        server.own_clients = self.own_clients
        server.waiters = self.waiters
        server.attach(self.p2p, self.direct)
        return server

    def _load_drafter(self) -> DraftModel:
        source = resolve_model(self.config.draft_model)
        drafter = DraftModel(source, target_vocab_size=self.source.config.vocab_size, dtype=self.dtype,
                             device=self.device, quant=self.config.draft_quant)
        logger.info("drafting with %s (%s) for speculating rings", source.name, self.config.draft_quant)
        return drafter

    def _planned_kv_budget(self, layers: LayerRange) -> int:
        """The KV share of our announced memory that the plan leaves us once we hold `layers`."""
        return planned_kv_budget(self.spec, self.record.memory_bytes, layers, self.dtype,
                                 layer_bytes=node_spec(self.record, self.spec).layer_bytes)

    def _drop(self, server: StageServer) -> None:
        self._retired_tokens += server.tokens_served
        self._retired_own_tokens += server.own_tokens_served
        self._retired_steps += server.steps_served
        server.shutdown()
        server.stage = None  # the weights go with the last reference

    # --- the DHT record -------------------------------------------------------------------------------

    async def swarm_status(self) -> SwarmStatus | None:
        """The swarm as its DHT records show it (`node.serve.assignment.swarm_status`); None before joining a DHT."""
        if self.peer is None:
            return None
        records = await self.peer.list_servers(self.source.name, num_layers=self.source.num_layers)
        return swarm_status(self.spec, records, credit=await self.peer.read_credit(self.source.name),
                            liars=await self.peer.proof_book(self.source.name).liars(r.peer_id for r in records))

    async def _records(self) -> list[ServerRecord]:
        """The swarm's records but those of proven liars (node.net.proofbook): the plan gives them no layers. Proofs
        are read in the background, so a liar leaves the plan at the heartbeat after its proof was read."""
        records = await self.peer.list_servers(self.source.name, num_layers=self.source.num_layers)
        return await self.peer.proof_book(self.source.name).drop_liars(records, wait=False)

    async def _announce(self, state: str | None = None) -> None:
        assert self.record is not None and self.peer is not None
        server = self.server
        fields = {}
        if server is not None:
            fields = dict(free_kv_tokens=server.free_kv_tokens, queue_len=server.queue_len,
                          sessions=sum(len(s.sessions) for s in self._servers()))
            if server.layer_latency_s > 0:  # measured while serving: better than the bench for routing
                fields["layer_latency_s"] = server.layer_latency_s
        self.record = replace(self.record, state=state or self.record.state, **fields)
        self.own_epoch.note(self.record.epoch)
        await self.peer.announce(self.record, ttl_s=self.config.ttl_s)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        """Refreshes our record every period and, for a node without a fixed range, follows the plan."""
        while True:
            await asyncio.sleep(self.config.period_s)
            try:
                await self._announce()
                if self._links_due():  # in the background: a slow uplink must not hold the heartbeat
                    self._links = asyncio.create_task(self._measure_links())
                if self.state == "online" and not self.config.fixed:
                    await self._follow_plan()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("heartbeat failed")

    # --- following the plan ---------------------------------------------------------------------------

    async def _plan(self):
        """The plan over the swarm's records, with our own record as we hold it (the DHT's copy may lag)."""
        own = self.record
        others = [r for r in await self._records() if r.peer_id != own.peer_id]
        records = sorted(check_records(self.spec, others, self.tracker) + check_records(self.spec, [own]),
                         key=lambda r: r.peer_id)
        result = plan(self.spec, records)
        key = tuple((r.peer_id, r.state, r.start, r.end, r.epoch) for r in records if r.state in ("joining", "online"))
        return result, key

    async def _settled_range(self) -> tuple[LayerRange, int]:
        """Our range in the plan, once the planned records stayed unchanged for the settle window (so that
        nodes started together see each other before any of them loads), or after 5 windows regardless."""
        peer_id = self.record.peer_id
        settle_s = self.config.settle_periods * self.config.period_s
        started = stable_since = time.monotonic()
        last_key = None
        while True:
            result, key = await self._plan()
            now = time.monotonic()
            if key != last_key:
                last_key, stable_since = key, now
            mine = result.range_of(peer_id)
            if mine is not None and (now - stable_since >= settle_s or now - started >= 5 * settle_s):
                return mine, result.epoch
            await asyncio.sleep(min(0.5, self.config.period_s / 2))

    async def _follow_plan(self) -> None:
        """Starts a move when the plan gives us other layers in two successive checks (one check could
        see a half-propagated swarm)."""
        if self._move is not None and not self._move.done():
            return
        result, key = await self._plan()
        target = result.range_of(self.record.peer_id)
        current = LayerRange(self.record.start, self.record.end)
        if target is None or target == current:
            self._last_plan_key = None
            return
        if key != self._last_plan_key:
            self._last_plan_key = key
            return
        self._last_plan_key = None
        logger.info("the plan (epoch %d) moves this node from %s to %s", result.epoch, current, target)
        self._move = asyncio.create_task(self._move_to(target, result.epoch))

    async def _move_to(self, target: LayerRange, epoch: int) -> None:
        """Loads `target` next to the current stage, switches new sessions to it, then retires the old one."""
        new = await self._load(target)
        old, self.server = self.server, new
        self.record = replace(self.record, start=target.start, end=target.end, epoch=epoch)
        await self._announce()
        if old is not None:
            self.retiring.append(old)
            task = asyncio.create_task(self._retire(old))
            self._retirements.add(task)
            task.add_done_callback(self._retirements.discard)

    async def _retire(self, old: StageServer) -> None:
        """Keeps the left stage open to new sessions until other online nodes cover its layers (clients may
        still route there from older records), then drains it and frees its memory."""
        layers = range(old.stage.start, old.stage.end)
        deadline = time.monotonic() + self.config.move_drain_s
        while time.monotonic() < deadline:
            others = [r for r in check_records(self.spec, await self._records())
                      if r.state == "online" and r.peer_id != self.record.peer_id]
            if all(any(r.start <= layer < r.end for r in others) for layer in layers):
                break
            await asyncio.sleep(self.config.period_s / 2)
        old.draining = True
        while old.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.retiring.remove(old)
        self._drop(old)
        _free_memory(self.device)
        logger.info("left layers %d:%d", layers.start, layers.stop)

    def _cancel_move(self) -> None:
        if self._move is not None:
            self._move.cancel()
            self._move = None

    # --- serving: one set of handlers, dispatching to the stage that holds the session -----------------

    async def _add_handlers(self, p2p: P2P) -> None:
        """Streams are read with a size cap per message, from what a session of this model could send: its
        opening, then steps of at most a prefill chunk of hidden states (or a head part of logits)."""
        most = max_message_bytes(self.source.hidden_size, int(self.source.config.vocab_size))

        def limit(index: int) -> int:
            return MAX_OPENING_BYTES if index == 0 else most

        def too_large(e: MessageTooLarge) -> runtime_pb2.ExpertResponse:
            return error_response("too_large", str(e))

        for name, handler in ((INFERENCE_HANDLER, self._rpc_inference), (PUSH_HANDLER, self._rpc_push)):
            await add_bounded_stream_handler(p2p, name, handler, limit=limit, too_large=too_large)
        await p2p.add_protobuf_handler(INFO_HANDLER, self._rpc_info, runtime_pb2.ExpertRequest)

    def _server_for(self, start: int, end: int) -> StageServer | None:
        """The stage taking a new session of layers [start, end): the active one if it holds them, else a
        retiring one that does (it accepts until others cover its layers, then refuses with "draining")."""
        holding = [s for s in self._servers() if s.stage.start <= start < end <= s.stage.end]
        return next((s for s in holding if not s.draining), holding[0] if holding else self.server)

    async def _rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                             ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self.pending.admit(context.remote_id.to_base58()) as admitted:
            first = await _first_message(requests) if admitted else None
        if not admitted:
            yield _too_many_pending()
            await linger(requests, 1.0)
            return
        if first is None:
            return
        server = None
        with contextlib.suppress(ProtocolError):  # a bad opening is refused by the stage's own checks
            opened = parse_open(first, max_length_limit=self.config.max_length)
            server = self._server_for(opened.start, opened.end)
        if (server := server or self.server) is None:
            yield self._no_layers()
            return
        self.sessions_opened += 1
        async for response in server.rpc_inference(_prepend(first, requests), context):
            yield response

    async def _rpc_push(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        pusher = context.remote_id.to_base58()
        server = None
        with self.pending.admit(pusher) as admitted:
            if admitted and (first := await _first_message(requests)) is None:
                return
            try:
                session_id, client = parse_push_open(first) if admitted else (None, None)
            except ProtocolError as e:
                yield error_response(e.code, str(e))
                return
            if admitted:  # the client opens all stages at once: the session may open here just after its push
                await self.waiters.wait(session_id, lambda: self._holding(session_id, client, pusher))
                server = next((s for s in self._servers() if s.pushed_session(session_id, client, pusher)), None)
        if not admitted:
            yield _too_many_pending()
            await linger(requests, 1.0)
            return
        if server is None:
            yield error_response("bad_request", f"no session {session_id!r} here expects pushes from {pusher}")
            await linger(requests, 1.0)
            return
        async for response in server.rpc_push(_prepend(first, requests), context):
            yield response

    def _holding(self, session_id: str, client: str | None, pusher: str):
        return next((session for s in self._servers() if (session := s.pushed_session(session_id, client, pusher))),
                    None)

    def _no_layers(self) -> runtime_pb2.ExpertResponse:
        return error_response("draining", f"this node is {self.state}, it serves no layers now")

    async def _rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                        ) -> runtime_pb2.ExpertResponse:
        info = self.server.info() if self.server is not None else {"model": self.source.name}
        return pack_response({**info, "state": self.state})


def _too_many_pending() -> runtime_pb2.ExpertResponse:
    return error_response("busy", "too many of this peer's streams are waiting here; open fewer at once")


async def _first_message(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout_s: float = 10.0
                         ) -> runtime_pb2.ExpertRequest | None:
    """A stream's opening message; None if the peer closes or stays silent first."""
    try:
        return await asyncio.wait_for(anext(requests), timeout_s)
    except (StopAsyncIteration, asyncio.TimeoutError):
        return None


async def _prepend(first: runtime_pb2.ExpertRequest, rest: AsyncIterator[runtime_pb2.ExpertRequest]
                   ) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    yield first
    async for item in rest:
        yield item


def _adversary(config: NodeConfig) -> Adversary | None:
    """The hostile test mode the hidden CLI options ask for (tests and benchmarks only); None for an honest node."""
    if config.test_perturb_scale <= 0 and config.test_adversary != "blamer":
        return None
    return Adversary(config.test_adversary, config.test_perturb_scale)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
