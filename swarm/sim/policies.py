"""The Policy interface the simulator drives, a few shared helpers, and the policy registry.

A policy owns an assignment (which layers each live node serves) and answers route requests.
The engine tells it about joins and leaves, calls its periodic rebalance, and applies the same
physics (compute, network, KV memory) to every policy, so that only the decisions differ.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from swarm.sim.scenario import SimNode
from swarm.types import Assignment, Hop, LayerRange, ModelSpec, NodeLoad, NodeSpec, Route, RttFn

Load = Mapping[str, NodeLoad]


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

    def route(
        self, client: str, load: Load, *, exclude: frozenset[str] = frozenset(), start_layer: int = 0,
        end_layer: int | None = None,
    ) -> Route | None:
        raise NotImplementedError

    def kv_capacity_bytes(self, node: NodeSpec, rng: LayerRange) -> float | None:
        """KV bytes the node's software lets sessions use; None: all memory left after weights."""
        return None

    # --- helpers ---------------------------------------------------------------------------
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
    ids = [c[0] for c in cands]
    s = np.array([c[1] for c in cands])
    e = np.array([c[2] for c in cands])
    fixed = np.array([c[3] for c in cands], dtype=float)
    per = np.array([c[4] for c in cands], dtype=float)
    n_b = end - start + 1
    dist = np.full(n_b, np.inf)
    dist[0] = 0.0
    parent: list[tuple[int, int] | None] = [None] * n_b  # (candidate index, entry boundary)
    run = np.full(len(cands), np.inf)  # min over entry boundaries b of dist[b] - b * per + fixed
    run_arg = np.zeros(len(cands), dtype=np.int64)
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


class LayerhivePolicy(Policy):
    """Ours: an adapter over swarm.allocator / swarm.router / swarm.rebalancer, push transport.

    The simulator calls the very functions the live swarm runs; this class only keeps their state.
    """

    name = "layerhive"
    transport = "push"
    mid_session_failover = True
    rebalance_period_s = 60.0

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.current = Assignment({})
        self.rebalance_state = None
        # Little's law: concurrent sessions = arrival rate x session time; the session time is
        # estimated from a typical node before anything is measured (decode through all layers).
        self.expected_sessions = 16

    def _estimate_sessions(self, nodes: Sequence[NodeSpec]) -> int:
        if not nodes:
            return 16
        lat = sorted(n.layer_latency_s for n in nodes)[len(nodes) // 2]
        token_s = self.model.num_layers * lat + 0.2
        return max(1, math.ceil(self.ctx.expected_rate_per_s * self.ctx.output_tokens * token_s))

    def _allocate(self, previous: Assignment | None) -> Assignment:
        from swarm.allocator import allocate

        self.current = allocate(
            self.model, self.nodes, self.ctx.rtt, previous=previous,
            expected_sessions=self.expected_sessions, context_tokens=self.ctx.session_tokens,
            seed=self.ctx.seed,
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
            seed=self.ctx.seed,
        )
        if not moves:
            return None
        self.current = apply_moves(self.current, moves, live=self.nodes)
        self.ranges = dict(self.current.ranges)
        return self.current

    def route(
        self, client: str, load: Load, *, exclude: frozenset[str] = frozenset(), start_layer: int = 0,
        end_layer: int | None = None,
    ) -> Route | None:
        from swarm.router import route

        routes = route(
            self.model, self.nodes, self.current, self.ctx.rtt, client=client, load=load,
            transport=self.transport, alternates=0, exclude=exclude, start_layer=start_layer,
            end_layer=end_layer, session_tokens=self.ctx.session_tokens,
        )
        return routes[0] if routes else None


class RouteMemo:
    """Exact memo for client-centric shortest paths whose only load input is "has free KV".

    A remembered route stays optimal while the assignment is unchanged, its own nodes still have
    free KV (its cost is unchanged) and every node that lacked KV still lacks it (no other chain got
    cheaper). With `penalty_depends_on_load`, only routes computed when no node lacked KV are reused.
    """

    def __init__(self, penalty_depends_on_load: bool = False) -> None:
        self.epoch = -1
        self.memo: dict[tuple, tuple[Route, tuple[str, ...]]] = {}
        self.strict = penalty_depends_on_load
        self.last_was_hit = False  # the simulator times only real route computations

    def get(self, key: tuple, epoch: int, load: Load, tokens: int) -> Route | None:
        route = self._get(key, epoch, load, tokens)
        self.last_was_hit = route is not None
        return route

    def _get(self, key: tuple, epoch: int, load: Load, tokens: int) -> Route | None:
        if epoch != self.epoch:
            self.epoch, self.memo = epoch, {}
            return None
        hit = self.memo.get(key)
        if hit is None:
            return None
        route, lacking = hit
        if self.strict and lacking:
            return None
        if any(has_free_kv(load, x, tokens) for x in lacking):
            return None
        if not all(has_free_kv(load, h.node_id, tokens) for h in route.hops):
            return None
        return route

    def put(self, key: tuple, route: Route, lacking: list[str]) -> None:
        self.memo[key] = (route, tuple(lacking))


PolicyFactory = Callable[[PolicyContext], Policy]


def registry() -> dict[str, PolicyFactory]:
    """Policy name -> constructor. Imported lazily so that a missing module names itself clearly."""
    from swarm.baselines.bprr import BprrPolicy
    from swarm.baselines.exo import ExoPolicy
    from swarm.baselines.optimal import OptimalPolicy
    from swarm.baselines.parallax import ParallaxPolicy
    from swarm.baselines.petals import PetalsPolicy
    return {
        "layerhive": LayerhivePolicy,
        "petals": PetalsPolicy,
        "parallax": ParallaxPolicy,
        "exo": ExoPolicy,
        "bprr": BprrPolicy,
        "optimal": OptimalPolicy,
    }


POLICY_NAMES = ("layerhive", "petals", "parallax", "exo", "bprr", "optimal")
