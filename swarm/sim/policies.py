"""The Policy interface the simulator drives, a few shared helpers, and the policy registry.

A policy owns an assignment (which layers each live node serves) and answers route requests.
The engine tells it about joins and leaves, calls its periodic rebalance, and applies the same
physics (compute, network, KV memory) to every policy, so that only the decisions differ.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from swarm.router import LoadTable, RouteIndex, RouteRequest, build_route_index, route
from swarm.sim.scenario import SimNode
from swarm.types import Assignment, Hop, LayerRange, ModelSpec, NodeLoad, NodeSpec, Route, RttFn

Load = Mapping[str, NodeLoad]
TTFT_WEIGHT = 4.0  # ours: a second of waiting for the first token weighs as much as four of decoding
STAGE_LEG_ESTIMATE_S = 0.005  # a hand-over between nearby stages, for session-time estimates


@dataclass(frozen=True)
class PolicyContext:
    model: ModelSpec
    rtt: RttFn
    hardware: Mapping[str, SimNode]  # every node of the scenario, for datasheet lookups
    seed: int
    session_tokens: int  # prompt + output tokens of a request (what a session's KV must hold)
    output_tokens: int
    expected_rate_per_s: float  # the workload's arrival rate (BPRR sizes its cache reservation on it)
    clients: tuple[tuple[str, float], ...] = ()  # (client endpoint, weight)

    def mean_client_rtt(self, node_id: str) -> float:
        if not self.clients:
            return 0.0
        total = sum(w for _, w in self.clients)
        return sum(w * self.rtt(c, node_id) for c, w in self.clients) / total


class Policy:
    """Base class: keeps the live node set and the current assignment."""

    name: ClassVar[str] = "base"
    transport: ClassVar[str] = "push"  # "push": stage to stage; "relay": the client relays every hop
    fails_when_full: ClassVar[bool] = False  # True: a route through a full node fails at once (Petals)
    mid_session_failover: ClassVar[bool] = True  # False: a dead stage ends the answer
    rebalance_period_s: float | None = None

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.rng = random.Random(ctx.seed)
        self.nodes: dict[str, NodeSpec] = {}
        self.ranges: dict[str, LayerRange] = {}
        self.epoch = 0

    # --- lifecycle -------------------------------------------------------------------------
    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        raise NotImplementedError

    def on_join(self, node: NodeSpec) -> Assignment:
        raise NotImplementedError

    def on_leave(self, node_id: str) -> Assignment:
        self.nodes.pop(node_id, None)
        self.ranges.pop(node_id, None)
        return self.assignment()

    def rebalance(self, now: float, load: Load) -> Assignment | None:
        return None

    def route(self, request: RouteRequest, load: Load) -> Route | None:
        """The chain for `request` (its client, span and exclusions; the workload's token counts are the
        context's), or None."""
        raise NotImplementedError

    def kv_capacity_bytes(self, node: NodeSpec, rng: LayerRange) -> float | None:
        """KV bytes the node's software lets sessions use; None: all memory left after weights."""
        return None

    # --- helpers ---------------------------------------------------------------------------
    def node_arrays(self) -> NodeArrays:
        """The current ranges as arrays (rebuilt when the epoch moves)."""
        cached = getattr(self, "_node_arrays", None)
        if cached is None or cached[0] != self.epoch:
            cached = self._node_arrays = (self.epoch, NodeArrays(self.ranges, self.nodes, self.ctx.rtt))
        return cached[1]

    def assignment(self) -> Assignment:
        self.epoch += 1
        return Assignment(dict(self.ranges), self.epoch)

    def capacity_layers(self, node: NodeSpec, fraction: float = 1.0) -> int:
        return int(node.memory_bytes * fraction // self.model.layer_bytes)


def weights_bytes(model: ModelSpec, rng: LayerRange, *, holds_head: bool = True) -> float:
    """Weights a node holds for `rng`: its layers plus half the head (embedding / LM head) at each end.

    With client-relayed transport the client runs embedding and LM head, so servers hold no head.
    """
    if not holds_head:
        return len(rng) * model.layer_bytes
    head = (0.5 * model.head_bytes if rng.start == 0 else 0.0) + (
        0.5 * model.head_bytes if rng.end == model.num_layers else 0.0
    )
    return len(rng) * model.layer_bytes + head


def has_free_kv(load: Load, node_id: str, tokens: int) -> bool:
    nl = load.get(node_id)
    return nl is None or nl.free_kv_tokens >= tokens


class NodeArrays:
    """A policy's ranges as arrays (in the ranges' own order), for vectorised client-centric routing.

    Pure speed: the decisions are the same as looping over the nodes one by one. Loads are read from a
    `LoadTable` in one gather, from any other Mapping one node at a time.
    """

    def __init__(self, ranges: Mapping[str, LayerRange], nodes: Mapping[str, NodeSpec], rtt: RttFn) -> None:
        self.ids = list(ranges)
        self.position = {n: i for i, n in enumerate(self.ids)}
        self.start = np.array([r.start for r in ranges.values()], dtype=np.int64)
        self.end = np.array([r.end for r in ranges.values()], dtype=np.int64)
        self.latency = np.array([nodes[n].layer_latency_s for n in self.ids], dtype=float)
        self.rtt = rtt
        self._rtt_from: dict[str, np.ndarray] = {}
        self._rows: tuple[object, np.ndarray] | None = None

    def rtt_from(self, client: str) -> np.ndarray:
        got = self._rtt_from.get(client)
        if got is None:
            got = self._rtt_from[client] = np.array([self.rtt(client, n) for n in self.ids], dtype=float)
        return got

    def excluded(self, exclude: frozenset[str]) -> np.ndarray:
        if not exclude:
            return np.zeros(len(self.ids), dtype=bool)
        return np.fromiter((n in exclude for n in self.ids), dtype=bool, count=len(self.ids))

    def _table_rows(self, table: LoadTable) -> np.ndarray:
        if self._rows is None or self._rows[0] is not table.position:
            self._rows = (table.position, np.array([table.position.get(n, -1) for n in self.ids], dtype=np.int64))
        return self._rows[1]

    def free_kv(self, load: Load, tokens: int) -> np.ndarray:
        """has_free_kv of every node."""
        if isinstance(load, LoadTable):
            rows = self._table_rows(load)
            ok = rows >= 0
            r = np.where(ok, rows, 0)
            return ~(ok & load.present[r]) | (load.free_kv_tokens[r] >= tokens)
        return np.fromiter((has_free_kv(load, n, tokens) for n in self.ids), dtype=bool, count=len(self.ids))

    def active_sessions(self, load: Load) -> np.ndarray:
        """Announced active sessions of every node (0 without a record)."""
        if isinstance(load, LoadTable):
            rows = self._table_rows(load)
            ok = rows >= 0
            r = np.where(ok, rows, 0)
            return np.where(ok & load.present[r], load.active_sessions[r], 0)
        out = np.zeros(len(self.ids), dtype=np.int64)
        for i, n in enumerate(self.ids):
            nl = load.get(n)
            out[i] = nl.active_sessions if nl is not None else 0
        return out


def covered(ranges: Mapping[str, LayerRange], num_layers: int, usable: Callable[[str], bool]) -> bool:
    """True when the usable nodes' ranges together cover every layer (sub-range hops make a chain)."""
    reach = np.zeros(num_layers + 1, dtype=np.int64)
    for node_id, r in ranges.items():
        if usable(node_id):
            reach[r.start] += 1
            reach[r.end] -= 1
    return bool(np.all(np.cumsum(reach)[:num_layers] > 0))


def boundary_shortest_path(
    candidates: Sequence[tuple[str, int, int, float, float]], start: int, end: int
) -> tuple[list[Hop], float] | None:
    """Cheapest chain covering [start, end) when each hop's cost is independent of its neighbours.

    candidates: (node_id, range start, range end, fixed cost per hop, cost per layer). A hop may use
    any sub-range of a node's range. This is exact for client-centric costs (Petals, BPRR), where
    a hop's cost depends only on the client and the server; vectorised over nodes for speed.
    """
    cands = [c for c in candidates if c[1] < end and c[2] > start]
    if not cands:
        return None
    return boundary_shortest_path_arrays(
        [c[0] for c in cands], np.array([c[1] for c in cands]), np.array([c[2] for c in cands]),
        np.array([c[3] for c in cands], dtype=float), np.array([c[4] for c in cands], dtype=float), start, end)


def boundary_shortest_path_arrays(
    ids: Sequence[str], s: np.ndarray, e: np.ndarray, fixed: np.ndarray, per: np.ndarray, start: int, end: int
) -> tuple[list[Hop], float] | None:
    """`boundary_shortest_path` over candidates given as arrays (all overlapping [start, end))."""
    if not len(ids):
        return None
    n_b = end - start + 1
    dist = np.full(n_b, np.inf)
    dist[0] = 0.0
    parent: list[tuple[int, int] | None] = [None] * n_b  # (candidate index, entry boundary)
    run = np.full(len(ids), np.inf)  # min over entry boundaries b of dist[b] - b * per + fixed
    run_arg = np.zeros(len(ids), dtype=np.int64)
    for b in range(start, end):
        active = (s <= b) & (b < e)
        if not active.any():
            return None
        entry = dist[b - start] - b * per + fixed
        better = active & (entry < run)
        run[better] = entry[better]
        run_arg[better] = b
        exit_cost = np.where(active, run + (b + 1) * per, np.inf)
        j = int(np.argmin(exit_cost))
        if not np.isfinite(exit_cost[j]):
            return None
        dist[b + 1 - start] = exit_cost[j]
        parent[b + 1 - start] = (j, int(run_arg[j]))
        # A node stays "entered" across boundaries, so `run` already includes hops entered earlier.
    hops: list[Hop] = []
    b = end
    while b > start:
        j, entry_b = parent[b - start]  # type: ignore[misc]
        hops.append(Hop(ids[j], entry_b, b))
        b = entry_b
    hops.reverse()
    merged: list[Hop] = []
    for h in hops:  # ties can split one node's run into two adjacent hops; join them
        if merged and merged[-1].node_id == h.node_id and merged[-1].end == h.start:
            merged[-1] = Hop(h.node_id, merged[-1].start, h.end)
        else:
            merged.append(h)
    return merged, float(dist[-1])


HopCosts = Callable[[RouteRequest, Load, "NodeArrays", np.ndarray, np.ndarray], np.ndarray]


def client_centric_route(policy: Policy, memo: RouteMemo, request: RouteRequest, load: Load,
                         hop_costs: HopCosts) -> Route | None:
    """The cheapest chain when a hop's cost depends only on the client and the server (Petals, BPRR), remembered
    in `memo` while it stays exact. `hop_costs(request, load, arrays, selected, free)`: the fixed cost of a hop
    on each selected node (positions in the policy's `NodeArrays`; `free`: whether each node has KV for the
    session); each layer adds the node's latency."""
    start, end = request.span(policy.model.num_layers)
    arr = policy.node_arrays()
    free = arr.free_kv(load, policy.ctx.session_tokens)
    remembered = memo.get(request, policy.epoch, free)
    if remembered is not None:
        return remembered
    sel = np.flatnonzero(~arr.excluded(request.exclude) & (arr.end > start) & (arr.start < end))
    found = boundary_shortest_path_arrays([arr.ids[i] for i in sel], arr.start[sel], arr.end[sel],
                                          hop_costs(request, load, arr, sel, free), arr.latency[sel], start, end)
    if found is None:
        return None
    chosen = Route(tuple(found[0]), found[1])
    hops = np.array([arr.position[h.node_id] for h in chosen.hops], dtype=np.int64)
    memo.put(request, chosen, sel[~free[sel]], hops)
    return chosen


class LayerhivePolicy(Policy):
    """Ours: an adapter over swarm.allocator / swarm.router / swarm.rebalancer, push transport.

    The simulator calls the very functions the live swarm runs; this class only keeps their state:
    * the expected concurrent sessions for the KV reservation (Little's law, `_estimate_sessions`) and
      the client regions are passed to `allocate`, which weighs latency against KV room with them;
    * a join or a leave is repaired incrementally, global improvements wait for the periodic rebalance;
    * each request is routed with the prompt-aware objective (decode per token + TTFT_WEIGHT x prefill
      / output tokens) over the loads every node announces.
    """

    name = "layerhive"
    transport = "push"
    mid_session_failover = True
    rebalance_period_s = 60.0

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.current = Assignment({})
        self._index: tuple[Assignment, RouteIndex] | None = None
        self.rebalance_state = None
        # Little's law: concurrent sessions = arrival rate x session time; the session time is
        # estimated from a typical node before anything is measured (decode through all layers).
        self.expected_sessions = 16

    def _estimate_sessions(self, nodes: Sequence[NodeSpec]) -> int:
        """Little's law: concurrent sessions = arrival rate x session time.

        A session lasts its prompt's upload and prefill plus `output_tokens` decode steps on the chains most
        requests take:
        the fastest nodes that together hold one copy of the model, plus a leg per stage and the client's
        round trip to its nearest node. (Sizing KV for a slow median chain over-reserves it, and fewer
        layers fit per node.)
        """
        from swarm.costmodel import layer_capacity

        if not nodes:
            return 16
        m, ctx = self.model, self.ctx
        left, decode, prefill, chain = m.num_layers, 0.0, 0.0, []
        for n in sorted(nodes, key=lambda n: (n.layer_latency_s, n.node_id)):
            take = min(left, layer_capacity(m, n, sessions=1, context_tokens=ctx.session_tokens))
            if take > 0:
                decode += take * n.layer_latency_s
                prefill += take * n.prefill_s_per_token_per_layer
                chain.append(n)
                left -= take
            if not left:
                break
        if left:  # the swarm cannot hold the model: any estimate will do until it can
            lat = sorted(n.layer_latency_s for n in nodes)[len(nodes) // 2]
            return max(1, math.ceil(ctx.expected_rate_per_s * ctx.output_tokens * (m.num_layers * lat + 0.2)))
        from swarm.costmodel import DEFAULT_CLIENT_UPLINK_BPS

        # Each client takes a chain near it: its round trip to the nearest node (weighted over clients).
        total_w = sum(w for _, w in ctx.clients)
        near = (sum(w * min(ctx.rtt(c, n.node_id) for n in nodes) for c, w in ctx.clients) / total_w
                if total_w > 0 else 0.0)
        token_s = decode + STAGE_LEG_ESTIMATE_S * len(chain) + near
        prompt = ctx.session_tokens - ctx.output_tokens
        upload_s = prompt * m.hidden_bytes_per_token * 8 / DEFAULT_CLIENT_UPLINK_BPS  # the prompt's hidden states
        session_s = prompt * prefill + upload_s + ctx.output_tokens * token_s
        return max(1, math.ceil(ctx.expected_rate_per_s * session_s))

    def _allocate(self, previous: Assignment | None) -> Assignment:
        from swarm.allocator import allocate

        # A join or a leave is repaired incrementally (one or two ranges change, as the rebalancer's
        # urgent rule does); whether a global re-plan pays off is the periodic rebalance's call.
        self.current = allocate(
            self.model, self.nodes, self.ctx.rtt, previous=previous,
            expected_sessions=self.expected_sessions, context_tokens=self.ctx.session_tokens,
            seed=self.ctx.seed, replan_threshold=math.inf, clients=self.ctx.clients,
        )
        self.ranges = dict(self.current.ranges)
        return self.current

    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        self.nodes = {n.node_id: n for n in nodes}
        self.expected_sessions = self._estimate_sessions(nodes)
        return self._allocate(None)

    def on_join(self, node: NodeSpec) -> Assignment:
        self.nodes[node.node_id] = node
        return self._allocate(self.current)

    def on_leave(self, node_id: str) -> Assignment:
        self.nodes.pop(node_id, None)
        kept = {k: v for k, v in self.current.ranges.items() if k != node_id}
        previous = Assignment(kept, self.current.epoch)
        return self._allocate(previous)

    def rebalance(self, now: float, load: Load) -> Assignment | None:
        from swarm.rebalancer import RebalanceState, apply_moves, plan_rebalance

        if self.rebalance_state is None:
            self.rebalance_state = RebalanceState()
        moves, self.rebalance_state = plan_rebalance(
            self.model, self.nodes, self.current, self.ctx.rtt, load=load, state=self.rebalance_state,
            now_s=now, expected_sessions=self.expected_sessions, context_tokens=self.ctx.session_tokens,
            seed=self.ctx.seed, clients=self.ctx.clients,
        )
        if not moves:
            return None
        self.current = apply_moves(self.current, moves, live=self.nodes)
        self.ranges = dict(self.current.ranges)
        return self.current

    def route(self, request: RouteRequest, load: Load) -> Route | None:
        ctx = self.ctx
        ours = replace(request, transport=self.transport, alternates=0, session_tokens=ctx.session_tokens,
                       prompt_tokens=ctx.session_tokens - ctx.output_tokens, output_tokens=ctx.output_tokens,
                       ttft_weight=TTFT_WEIGHT)
        routes = route(self._route_index(), ours, load)
        return routes[0] if routes else None

    def _route_index(self) -> RouteIndex:
        """The router's index of the current assignment, built once per assignment: every change of the node
        set goes through `_allocate`, which makes a new assignment."""
        if self._index is None or self._index[0] is not self.current:
            self._index = (self.current, build_route_index(self.model, self.nodes, self.current, self.ctx.rtt))
        return self._index[1]


class RouteMemo:
    """Exact memo for client-centric shortest paths whose only load input is "has free KV".

    A remembered route stays optimal while the assignment is unchanged, its own nodes still have
    free KV (its cost is unchanged) and every node that lacked KV still lacks it (no other chain got
    cheaper). With `penalty_depends_on_load`, only routes computed when no node lacked KV are reused.
    Nodes are positions in the policy's `NodeArrays`; `free` is its `free_kv` vector for this request.
    """

    def __init__(self, penalty_depends_on_load: bool = False) -> None:
        self.epoch = -1
        self.memo: dict[tuple, tuple[Route, np.ndarray, np.ndarray]] = {}
        self.strict = penalty_depends_on_load
        self.last_was_hit = False  # the simulator times only real route computations

    def get(self, key: tuple, epoch: int, free: np.ndarray) -> Route | None:
        route = self._get(key, epoch, free)
        self.last_was_hit = route is not None
        return route

    def _get(self, key: tuple, epoch: int, free: np.ndarray) -> Route | None:
        if epoch != self.epoch:
            self.epoch, self.memo = epoch, {}
            return None
        hit = self.memo.get(key)
        if hit is None:
            return None
        route, lacking, hops = hit
        if self.strict and len(lacking):
            return None
        if free[lacking].any() or not free[hops].all():
            return None
        return route

    def put(self, key: tuple, route: Route, lacking: np.ndarray, hops: np.ndarray) -> None:
        self.memo[key] = (route, lacking, hops)
