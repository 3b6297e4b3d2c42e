"""Discrete-event simulation of a swarm serving requests under one policy.

The clock is simulated; only the policy's own run time is measured on the wall clock (reported as
scheduler_ms). The physics is the same for every policy:

* compute: a node's step serves all its sessions at once (continuous batching), so one layer costs
  max(memory-bound decode time, batch x compute-bound time per token) -- the roofline;
* network: a leg costs RTT/2 + bytes / sender's uplink; push transport crosses stages+1 legs per
  token, client relaying crosses 2 legs per stage; a leg carries hidden states, except that with push
  transport and a model whose head is served by the swarm (head_bytes > 0: the chain's ends hold the
  embedding and the LM head, and are charged its memory) the client sends token ids and receives the
  sampled token (costmodel.chain_token_s / chain_prefill_s, as scenario-format.md describes head_bytes);
* KV memory: a session reserves (prompt + output) tokens of KV for each layer it runs on a node;
  a node whose KV is full admits nobody (the policy decides whether the request waits or fails);
* churn: a leaving node kills its sessions, which fail over by re-routing the lost layers and
  replaying prompt + generated tokens there (a prefill); loading layers takes time.

Decode is advanced in chunks of tokens whose per-token time is fixed at the chunk's start: this
keeps a 1,000-node, 600-s run to seconds (plus the policy's own routing time) while following load
changes closely.

Metric definitions (scenario-format.md, plus a few extra keys):
  throughput_tokens_per_s  output tokens produced inside [0, duration_s], divided by duration_s;
  per_token_latency_ms     decode time per output token, percentiles over tokens;
  ttft_ms                  arrival -> first output token (queueing + prefill + one decode step);
  failed                   arrivals that found no chain, were refused (Petals, full cache), or lost a
                           stage with no failover (or no replacement chain);
  pending                  still queued or running when the drain period after duration_s ran out;
  uncovered_s              time inside [0, duration_s] with no complete chain of loaded nodes;
  layers_moved             layers (re)loaded because a node's range changed (a joiner's first load is
                           not counted); failovers: sessions re-routed after losing a stage.
Arrivals are drawn once from the scenario seed, so every policy sees the same requests. The swarm
is already loaded at t=0; later joins and moves load weights at LOAD_BYTES_PER_S before serving.
Every node's announcement (active sessions, free KV tokens) is kept current in a `router.LoadTable`,
which policies receive as their `load` mapping (the live swarm's records, without their staleness).
`simulate(..., measure_from_s, measure_until_s)` restricts the latency percentiles to the sessions
arriving in that interval (swarm/sim/capacity.py leaves out warm-up and cool-down that way).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from swarm.baselines.bprr import BprrPolicy
from swarm.baselines.exo import ExoPolicy
from swarm.baselines.optimal import OptimalPolicy
from swarm.baselines.parallax import ParallaxPolicy
from swarm.baselines.petals import PetalsPolicy
from swarm.costmodel import TOKEN_ID_BYTES
from swarm.router import LoadTable, RouteRequest
from swarm.sim.metrics import Recorder
from swarm.sim.policies import LayerhivePolicy, Policy, PolicyContext, covered, weights_bytes
from swarm.sim.scenario import Scenario
from swarm.types import Assignment, Hop, LayerRange, NodeSpec

CHUNKS_PER_ANSWER = 8  # decode is advanced in about this many steps per request
LOAD_BYTES_PER_S = 2e9  # reading a layer's weights from local disk when (re)loading it
CLIENT_UPLINK_BPS = 100e6
MIN_DRAIN_S = 300.0  # after the arrival window, in-flight work may finish for this long (or duration)


PolicyFactory = Callable[[PolicyContext], Policy]

# The policies the simulator can run, by name: ours and the baselines it is measured against.
POLICIES: dict[str, PolicyFactory] = {
    "layerhive": LayerhivePolicy,
    "petals": PetalsPolicy,
    "parallax": ParallaxPolicy,
    "exo": ExoPolicy,
    "bprr": BprrPolicy,
    "optimal": OptimalPolicy,
}
POLICY_NAMES = tuple(POLICIES)



@dataclass
class _Node:
    spec: NodeSpec
    alive: bool = False
    rng: LayerRange | None = None
    ready_at: float = math.inf
    load_version: int = 0
    kv_cap: float = 0.0
    kv_used: float = 0.0
    sessions: set[int] = field(default_factory=set)
    step: float = 0.0  # current time of one layer's decode step for one token

    def refresh_step(self) -> None:
        b = max(1, len(self.sessions))
        self.step = max(self.spec.layer_latency_s, b * self.spec.prefill_s_per_token_per_layer)


@dataclass
class _Session:
    sid: int
    client: str
    arrival: float
    hops: list[Hop] = field(default_factory=list)
    kv: dict[str, float] = field(default_factory=dict)
    net_s: float = 0.0  # network time per decode token on the current chain
    tokens_done: int = 0
    decoding: bool = False
    chunk_start: float = 0.0
    chunk_tokens: int = 0
    per_token: float = 0.0
    version: int = 0
    first_token_seen: bool = False


# Event kinds, ordered so that simultaneous events resolve deterministically.
_JOIN, _LEAVE, _READY, _REBALANCE, _PREFILL_DONE, _CHUNK_DONE, _ARRIVAL = range(7)


class Simulator:
    def __init__(self, scenario: Scenario, policy: Policy, *, measure_from_s: float = 0.0,
                 measure_until_s: float = math.inf) -> None:
        self.measure_from_s, self.measure_until_s = measure_from_s, measure_until_s
        self.sc = scenario
        self.model = scenario.model
        self.policy = policy
        self.rtt = scenario.rtt_fn()
        self.wl = scenario.workload
        self.session_tokens = self.wl.prompt_tokens + self.wl.output_tokens
        self.chunk = max(1, math.ceil(self.wl.output_tokens / CHUNKS_PER_ANSWER))
        self.nodes = {n.node_id: _Node(n.spec) for n in scenario.nodes}
        # What every node announces (sessions, free KV), kept current as arrays the router reads whole.
        self.loads = LoadTable(self.nodes)
        for nid in self.nodes:
            self._announce(nid)
        self.sessions: dict[int, _Session] = {}
        self.queue: deque[_Session] = deque()  # admitted nowhere yet, waiting for KV memory
        self.events: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.rec = Recorder(self.wl.duration_s)
        self.unusable: frozenset[str] = frozenset()
        self.is_covered = False
        self.uncovered_since: float | None = 0.0
        self.end_time = self.wl.duration_s + max(MIN_DRAIN_S, self.wl.duration_s)

    # --- event plumbing ------------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, a, b))

    def run(self) -> dict:
        rng = np.random.default_rng(self.sc.seed)
        self._schedule_arrivals(rng)
        self._node_index = {nid: i for i, nid in enumerate(self.nodes)}
        self._node_ids = list(self.nodes)
        initial = [n for n in self.sc.nodes if n.join_s <= 0]
        for n in self.sc.nodes:
            if n.join_s > 0:
                self._push(n.join_s, _JOIN, self._node_index[n.node_id])
            if n.leave_s is not None:
                self._push(n.leave_s, _LEAVE, self._node_index[n.node_id])
        for n in initial:
            self.nodes[n.node_id].alive = True
        t0 = time.perf_counter()
        assignment = self.policy.allocate([n.spec for n in initial])
        self.rec.allocate_s = time.perf_counter() - t0
        # The swarm is already up when the scenario starts: initial ranges are loaded at t=0.
        self._apply(assignment, preloaded=True)
        if self.policy.rebalance_period_s:
            self._push(self.policy.rebalance_period_s, _REBALANCE)
        while self.events:
            t, kind, _, a, b = heapq.heappop(self.events)
            if t > self.end_time:
                break
            self.now = t
            self._dispatch(kind, a, b)
        self.now = min(max(self.now, self.wl.duration_s), self.end_time)
        self._update_coverage()
        pending = len(self.queue) + len(self.sessions)
        return self.rec.summary(pending)

    def _schedule_arrivals(self, rng: np.random.Generator) -> None:
        rate, horizon = self.wl.arrival_rate_per_s, self.wl.duration_s
        n_max = int(rate * horizon + 10 * math.sqrt(rate * horizon) + 10)
        times = np.cumsum(rng.exponential(1.0 / rate, size=n_max))
        times = times[times < horizon]
        weights = np.array([c.weight for c in self.sc.clients], dtype=float)
        picks = rng.choice(len(self.sc.clients), size=len(times), p=weights / weights.sum())
        self.clients = [c.endpoint for c in self.sc.clients]
        for i, (t, c) in enumerate(zip(times, picks, strict=True)):
            self._push(float(t), _ARRIVAL, i, int(c))

    def _dispatch(self, kind: int, a: int, b: int) -> None:
        if kind == _ARRIVAL:
            self._arrival(a, self.clients[b])
        elif kind == _CHUNK_DONE:
            self._chunk_done(a, b)
        elif kind == _PREFILL_DONE:
            self._prefill_done(a, b)
        elif kind == _READY:
            self._ready(self._node_ids[a], b)
        elif kind == _JOIN:
            self._join(self._node_ids[a])
        elif kind == _LEAVE:
            self._leave(self._node_ids[a])
        elif kind == _REBALANCE:
            self._rebalance()

    # --- requests --------------------------------------------------------------------------------
    def _arrival(self, sid: int, client: str) -> None:
        self.rec.arrivals += 1
        s = _Session(sid, client, self.now)
        if not self.is_covered:
            self.rec.failed += 1  # no complete chain exists at all
            return
        if self._try_start(s):
            return
        if self.policy.fails_when_full:
            self.rec.failed += 1  # e.g. Petals: a server without free cache fails the request at once
        else:
            self.queue.append(s)

    def _route(self, client: str, start: int, end: int, exclude: frozenset[str]):
        request = RouteRequest(client, start_layer=start, end_layer=end, exclude=exclude, alternates=0)
        t0 = time.perf_counter()
        r = self.policy.route(request, self.loads)
        memo = getattr(self.policy, "memo", None)
        if memo is None or not memo.last_was_hit:  # a simulator-side memo hit is not scheduler work
            self.rec.route_s.append(time.perf_counter() - t0)
        return r

    def _admissible(self, hops: list[Hop], exclude: frozenset[str]) -> dict[str, float] | None:
        need: dict[str, float] = {}
        per_layer = self.session_tokens * self.model.kv_bytes_per_token_per_layer
        for h in hops:
            n = self.nodes.get(h.node_id)
            if n is None or h.node_id in exclude or h.node_id in self.unusable or n.rng is None:
                return None
            if not (n.rng.start <= h.start < h.end <= n.rng.end):
                return None
            need[h.node_id] = need.get(h.node_id, 0.0) + (h.end - h.start) * per_layer
        for nid, b in need.items():
            n = self.nodes[nid]
            if n.kv_used + b > n.kv_cap + 1e-6:
                return None
        return need

    def _try_start(self, s: _Session) -> bool:
        route = self._route(s.client, 0, self.model.num_layers, self.unusable)
        if route is None:
            return False
        hops = list(route.hops)
        if not _is_chain(hops, 0, self.model.num_layers):
            raise RuntimeError(f"policy {self.policy.name} returned a broken chain {hops}")
        need = self._admissible(hops, frozenset())
        if need is None:
            return False
        self.sessions[s.sid] = s
        s.hops = hops
        self._occupy(s, hops, need)
        self._start_prefill(s, hops, self.wl.prompt_tokens)
        return True

    def _occupy(self, s: _Session, hops: list[Hop], need: dict[str, float]) -> None:
        for nid, b in need.items():
            n = self.nodes[nid]
            n.kv_used += b
            n.sessions.add(s.sid)
            n.refresh_step()
            self._announce(nid)
            s.kv[nid] = s.kv.get(nid, 0.0) + b

    def _release(self, s: _Session, only: str | None = None) -> None:
        for nid in [only] if only is not None else list(s.kv):
            b = s.kv.pop(nid, 0.0)
            n = self.nodes[nid]
            n.kv_used = max(0.0, n.kv_used - b)
            n.sessions.discard(s.sid)
            n.refresh_step()
            self._announce(nid)

    def _start_prefill(self, s: _Session, hops: list[Hop], tokens: int) -> None:
        """Run `tokens` tokens through `hops` (a prompt, or a replay after failover), then decode."""
        t = self._net_s(s.client, hops, tokens) if hops else 0.0
        for h in hops:
            n = self.nodes[h.node_id]
            others = len(n.sessions) - 1
            flops_t = n.spec.prefill_s_per_token_per_layer
            t += (h.end - h.start) * max(n.spec.layer_latency_s, (tokens + others) * flops_t)
        s.decoding = False
        s.version += 1
        self._push(self.now + t, _PREFILL_DONE, s.sid, s.version)

    def _net_s(self, client: str, hops: list[Hop], tokens: int) -> float:
        size = tokens * self.model.hidden_bytes_per_token * 8  # bits, as uplinks are in bits/s
        rtt = self.rtt
        if self.policy.transport == "relay":
            nodes = self.nodes
            return sum(
                rtt(client, h.node_id) + size / CLIENT_UPLINK_BPS + size / nodes[h.node_id].spec.uplink_bps
                for h in hops
            )
        # Push: with model.head_bytes > 0 the chain's ends hold the embedding and the LM head (that is
        # what they are charged memory for), so the client sends token ids and gets back one sampled token.
        holds_head = self.model.head_bytes > 0
        first = tokens * TOKEN_ID_BYTES * 8 if holds_head and hops[0].start == 0 else size
        last = TOKEN_ID_BYTES * 8 if holds_head and hops[-1].end == self.model.num_layers else size
        t = rtt(client, hops[0].node_id) / 2 + first / CLIENT_UPLINK_BPS
        for a, b in itertools.pairwise(hops):
            t += rtt(a.node_id, b.node_id) / 2 + size / self.nodes[a.node_id].spec.uplink_bps
        return t + rtt(hops[-1].node_id, client) / 2 + last / self.nodes[hops[-1].node_id].spec.uplink_bps

    def _measured(self, s: _Session) -> bool:
        """Whether this session's latencies count (sessions arriving inside the measured interval)."""
        return self.measure_from_s <= s.arrival < self.measure_until_s

    def _per_token(self, s: _Session) -> float:
        nodes = self.nodes
        return s.net_s + sum((h.end - h.start) * nodes[h.node_id].step for h in s.hops)

    def _prefill_done(self, sid: int, version: int) -> None:
        s = self.sessions.get(sid)
        if s is None or s.version != version:
            return
        s.net_s = self._net_s(s.client, s.hops, 1)
        if not s.first_token_seen:
            s.first_token_seen = True
            if self._measured(s):
                self.rec.ttft.append(self.now + self._per_token(s) - s.arrival)
        self._next_chunk(s)

    def _next_chunk(self, s: _Session) -> None:
        s.decoding = True
        s.chunk_start = self.now
        s.chunk_tokens = min(self.chunk, self.wl.output_tokens - s.tokens_done)
        s.per_token = self._per_token(s)
        s.version += 1
        self._push(self.now + s.chunk_tokens * s.per_token, _CHUNK_DONE, s.sid, s.version)

    def _chunk_done(self, sid: int, version: int) -> None:
        s = self.sessions.get(sid)
        if s is None or s.version != version:
            return
        self.rec.tokens(s.per_token, s.chunk_start, s.chunk_tokens, measured=self._measured(s))
        s.tokens_done += s.chunk_tokens
        if s.tokens_done >= self.wl.output_tokens:
            self.rec.completed += 1
            self._finish(s)
        else:
            self._next_chunk(s)

    def _finish(self, s: _Session) -> None:
        self._release(s)
        self.sessions.pop(s.sid, None)
        self._drain_queue()

    def _fail(self, s: _Session) -> None:
        self.rec.failed += 1
        self._finish(s)

    def _drain_queue(self) -> None:
        while self.queue and self.is_covered:
            if not self._try_start(self.queue[0]):
                return
            self.queue.popleft()

    # --- failures and membership ----------------------------------------------------------------
    def _interrupt(self, s: _Session, lost: str) -> None:
        """Node `lost` stopped serving `s`: credit tokens made so far, then fail over or fail."""
        if s.decoding:
            done = min(s.chunk_tokens, int((self.now - s.chunk_start) / s.per_token)) if s.per_token else 0
            self.rec.tokens(s.per_token, s.chunk_start, done, measured=self._measured(s))
            s.tokens_done += done
        s.version += 1
        s.decoding = False
        self._release(s, only=lost)
        if not self.policy.mid_session_failover:
            self._fail(s)
            return
        self.rec.failovers += 1
        lost_hops = [h for h in s.hops if h.node_id == lost]
        kept = [h for h in s.hops if h.node_id != lost]
        new_hops: list[Hop] = []
        for h in lost_hops:
            exclude = self.unusable | {x.node_id for x in kept} | {lost}
            route = self._route(s.client, h.start, h.end, exclude)
            need = None if route is None else self._admissible(list(route.hops), exclude)
            if need is None or not _is_chain(list(route.hops), h.start, h.end):
                self._fail(s)
                return
            self._occupy(s, list(route.hops), need)
            new_hops.extend(route.hops)
        s.hops = sorted(kept + new_hops, key=lambda h: h.start)
        # Rebuild the lost layers' KV on the replacements: replay the prompt and the tokens so far.
        self._start_prefill(s, new_hops, self.wl.prompt_tokens + s.tokens_done)

    def _join(self, node_id: str) -> None:
        self.nodes[node_id].alive = True
        moved = self._apply(self.policy.on_join(self.nodes[node_id].spec), joining=node_id)
        for nid, sids in moved:
            self._reroute(sids, nid)
        self._drain_queue()

    def _leave(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if not n.alive:
            return
        n.alive = False
        n.rng = None
        n.load_version += 1
        self._announce(node_id)
        victims = sorted(n.sessions)
        self._update_unusable()
        assignment = self.policy.on_leave(node_id)
        moved_victims = self._apply(assignment)
        self._reroute(victims, node_id)
        for nid, sids in moved_victims:
            self._reroute(sids, nid)
        self._drain_queue()

    def _reroute(self, sids: list[int], lost: str) -> None:
        for sid in sids:
            s = self.sessions.get(sid)
            if s is not None and lost in s.kv:
                self._interrupt(s, lost)

    def _rebalance(self) -> None:
        assignment = self.policy.rebalance(self.now, self.loads)
        if assignment is not None:
            for nid, sids in self._apply(assignment):
                self._reroute(sids, nid)
            self._drain_queue()
        if self.now + self.policy.rebalance_period_s < self.wl.duration_s:
            self._push(self.now + self.policy.rebalance_period_s, _REBALANCE)

    def _ready(self, node_id: str, version: int) -> None:
        n = self.nodes[node_id]
        if n.alive and n.load_version == version:
            n.ready_at = self.now
            self._update_unusable()
            self._drain_queue()

    def _apply(
        self, assignment: Assignment, *, preloaded: bool = False, joining: str | None = None
    ) -> list[tuple[str, list[int]]]:
        """Adopt a new assignment; return (node, its sessions) for nodes whose range changed."""
        changed: list[tuple[str, list[int]]] = []
        for nid, n in self.nodes.items():
            new = assignment.ranges.get(nid) if n.alive else None
            if new == n.rng:
                continue
            old = n.rng
            if new is not None and not preloaded and nid != joining:
                # Layer loads caused by re-planning (a joining node's first load is not a move).
                self.rec.layers_moved += len(new) - (_overlap_len(new, old) if old is not None else 0)
            n.rng = new
            n.load_version += 1
            if n.sessions:
                changed.append((nid, sorted(n.sessions)))
            if new is None:
                n.kv_cap = 0.0
                self._announce(nid)
                continue
            cap = n.spec.memory_bytes - weights_bytes(
                self.model, new, holds_head=self.policy.transport == "push")
            sw_cap = self.policy.kv_capacity_bytes(n.spec, new)
            n.kv_cap = max(0.0, cap if sw_cap is None else min(cap, sw_cap))
            self._announce(nid)
            to_load = len(new) - (_overlap_len(new, old) if old is not None else 0)
            if preloaded or to_load == 0:
                n.ready_at = self.now
            else:
                n.ready_at = math.inf
                self._push(self.now + to_load * self.model.layer_bytes / LOAD_BYTES_PER_S, _READY,
                           self._node_index[nid], n.load_version)
        self._update_unusable()
        return changed

    def _announce(self, node_id: str) -> None:
        """Refresh the node's load record: its sessions and the KV tokens it can still admit."""
        n = self.nodes[node_id]
        layers = len(n.rng) if n.rng is not None else 0
        per_token = layers * self.model.kv_bytes_per_token_per_layer
        free = int(max(0.0, n.kv_cap - n.kv_used) / per_token) if per_token else 0
        self.loads.set(node_id, queue_len=0, active_sessions=len(n.sessions), free_kv_tokens=free)

    def _update_unusable(self) -> None:
        self.unusable = frozenset(
            nid for nid, n in self.nodes.items() if not n.alive or n.rng is None or n.ready_at > self.now
        )
        self._update_coverage()

    def _update_coverage(self) -> None:
        ranges = {nid: n.rng for nid, n in self.nodes.items() if n.rng is not None}
        now_covered = covered(ranges, self.model.num_layers, lambda nid: nid not in self.unusable)
        horizon = min(self.now, self.wl.duration_s)
        if self.uncovered_since is not None and (now_covered or self.now >= self.wl.duration_s):
            self.rec.uncovered_s += max(0.0, horizon - self.uncovered_since)
            self.uncovered_since = None if now_covered else horizon
        if not now_covered and self.uncovered_since is None and self.now < self.wl.duration_s:
            self.uncovered_since = self.now
        self.is_covered = now_covered


def _overlap_len(a: LayerRange, b: LayerRange) -> int:
    return max(0, min(a.end, b.end) - max(a.start, b.start))


def _is_chain(hops: list[Hop], start: int, end: int) -> bool:
    pos = start
    for h in hops:
        if h.start != pos or h.end <= h.start:
            return False
        pos = h.end
    return pos == end


def simulate(scenario: Scenario, policy_name: str, *, measure_from_s: float = 0.0,
             measure_until_s: float = math.inf) -> dict:
    """Run one policy on a scenario and return its metrics (scenario-format.md).

    Latency percentiles (per-token, TTFT) cover the sessions arriving in [measure_from_s,
    measure_until_s) (default: all), e.g. to leave out a warm-up; counts and throughput cover all.
    """
    factories = POLICIES
    if policy_name not in factories:
        raise KeyError(f"unknown policy {policy_name!r}; known: {', '.join(sorted(factories))}")
    wl = scenario.workload
    ctx = PolicyContext(
        model=scenario.model,
        rtt=scenario.rtt_fn(),
        hardware={n.node_id: n for n in scenario.nodes},
        seed=scenario.seed,
        session_tokens=wl.prompt_tokens + wl.output_tokens,
        output_tokens=wl.output_tokens,
        expected_rate_per_s=wl.arrival_rate_per_s,
        clients=tuple((c.endpoint, c.weight) for c in scenario.clients),
    )
    return Simulator(scenario, factories[policy_name](ctx), measure_from_s=measure_from_s,
                     measure_until_s=measure_until_s).run()
