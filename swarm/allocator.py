"""Phase 1: which contiguous layer range each node serves.

Public API (stable):

    allocate(model, nodes, rtt, *, previous=None, expected_sessions=16, context_tokens=2048, seed=0,
             replan_threshold=0.25, clients=()) -> Assignment
    layer_capacity(model, node, *, sessions=1, context_tokens=2048, embedding=False, lm_head=False) -> int
    kv_sessions_per_node(model, nodes, *, expected_sessions=16, context_tokens=2048) -> float
    explain_allocation(model, nodes, assignment=None, *, expected_sessions=16, context_tokens=2048) -> list[str]
    layer_throughput(model, nodes, assignment, *, batch=1) -> numpy.ndarray   # tokens/s per layer
    swarm_throughput(model, nodes, assignment, *, batch=1) -> float           # min over layers
    uncovered_layers(model, assignment) -> list[int]
    zones_of(nodes, rtt, *, threshold_s=ZONE_RTT_S) -> dict[NodeId, int]
    node_windows(model, node, *, sessions=1, context_tokens=2048) -> list[tuple[int, int]]
    as_node_map(nodes) -> dict[NodeId, NodeSpec]

`nodes` may be a sequence of NodeSpec or a mapping id -> NodeSpec everywhere.

Global plan (no `previous`):
  1. KV budget. Each node reserves KV cache for a share of the expected concurrent sessions, at
     `context_tokens` each. The even share is sessions / replicas the swarm's memory holds; if that
     would leave some layer uncovered, it shrinks: to one session, then below one (a shorter context),
     then to none, so that whatever the memory can hold is covered: coverage first.
  2. Zones. Regions closer than ZONE_RTT_S (e.g. London-Frankfurt) form a zone, so that a pipeline
     never zigzags across continents.
  3. Pipelines. Inside each zone, as many disjoint node groups as possible that can each hold all
     layers (greedy bin covering: largest nodes first, closed by one of the few smallest nodes that
     complete the group, which waste the least memory: the one adding the least per-token time). Nodes
     of zones that cannot make one pipeline alone are pooled into cross-zone pipelines, ordered zone by
     zone (one long leg, not many).
  4. Water-filling inside each pipeline: the stage time lambda solving
     sum_i min(cap_i, (lambda - leg_i) / latency_i) = L (exactly: the sum is piecewise linear), then
     largest-remainder rounding. Unlike Parallax the stage time includes the node's outgoing network
     leg (RTT/2 + hidden state / uplink, relays penalised) and uses the node's measured per-layer
     latency. Nodes are ordered zone by zone and region by region, slow uplinks last (a last stage
     holding the LM head sends only token ids).
  5. Reinforcement. Nodes left over take the window of their capacity that covers uncovered layers
     first, then the weakest layers of their own zone, then of the swarm (Petals' rule, zone aware).
  6. Tight memory. If a gap remains, one chain over as many nodes as it takes (`_chain_cover`) is laid
     first and everyone else placed around it, so every layer is covered whenever the memory allows.
  7. The latency/throughput trade-off. Steps 2-6 run for a few KV shares: the even one, then doubling
     up to the whole load (twice the expected sessions plus two standard deviations: batches slow down
     under load, so sessions stay open longer). Each plan is scored by filling the expected sessions
     into its pipelines as the router would, fastest first for each client (`clients`: (endpoint,
     weight), their legs included), where a pipeline slows once its batch turns compute bound and a
     session without KV room waits (`_plan_cost`, with Little's law for the slowdown). The plan of
     least mean time per token wins: few stages and fast chains under light load, more KV room (a
     stage more) when the load needs it. A swarm that cannot meet the load keeps its fastest plan.
Incremental plan (`previous` given): survivors keep their ranges (shrunk only if they no longer fit
with one session of KV, or with the even share when that is below one), joiners take the weakest
window as in step 5 at the even share, and a gap left by a departure
is closed by extending a neighbour or moving one redundant node, so a join or a leave changes one or
two ranges. The global plan replaces it only if it raises the swarm's min-layer throughput by more than
`replan_threshold`, or if it covers layers the incremental one cannot.
"""

from __future__ import annotations

import bisect
import logging
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from swarm.costmodel import (
    handover_s,
    kv_bytes_per_layer,
    kv_share_bytes,
    layer_capacity,
    node_rate_tokens_per_s,
    range_fits,
    region_rtt_matrix,
    weight_bytes_per_layer,
)
from swarm.types import Assignment, LayerRange, ModelSpec, NodeId, NodeSpec, RttFn

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_EXPECTED_SESSIONS",
    "ZONE_RTT_S",
    "allocate",
    "as_node_map",
    "explain_allocation",
    "kv_sessions_per_node",
    "layer_capacity",
    "layer_throughput",
    "node_windows",
    "swarm_throughput",
    "uncovered_layers",
    "zones_of",
]

_log = logging.getLogger("swarm.allocator")

DEFAULT_EXPECTED_SESSIONS = 16
DEFAULT_CONTEXT_TOKENS = 2048
ZONE_RTT_S = 0.040  # regions closer than this behave as one place for pipelining


def as_node_map(nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec]) -> dict[NodeId, NodeSpec]:
    """Normalise the `nodes` argument (mapping or iterable of NodeSpec) to an id -> spec dict."""
    if isinstance(nodes, Mapping):
        return dict(nodes)
    return {n.node_id: n for n in nodes}


# --- metrics ---------------------------------------------------------------------------------------


def layer_throughput(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    assignment: Assignment | Mapping[NodeId, LayerRange],
    *,
    batch: int = 1,
) -> np.ndarray:
    """Decode tokens/s each layer can carry: the sum of the rates of the nodes serving it.

    A node's rate through its stage is `node_rate_tokens_per_s` (compute- or uplink-bound), the
    Petals notion of block throughput. Nodes absent from `nodes` (departed) count for nothing.
    """
    node_map = as_node_map(nodes)
    ranges = assignment.ranges if isinstance(assignment, Assignment) else assignment
    diff = np.zeros(model.num_layers + 1)
    for node_id, rng in ranges.items():
        node = node_map.get(node_id)
        if node is None or rng.end > model.num_layers:
            continue
        rate = node_rate_tokens_per_s(model, node, len(rng), batch=batch)
        diff[rng.start] += rate
        diff[rng.end] -= rate
    return np.cumsum(diff[:-1])


def swarm_throughput(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    assignment: Assignment | Mapping[NodeId, LayerRange],
    *,
    batch: int = 1,
) -> float:
    """The swarm's bottleneck: the smallest per-layer throughput (0 if a layer is uncovered)."""
    return float(layer_throughput(model, nodes, assignment, batch=batch).min())


def uncovered_layers(model: ModelSpec, assignment: Assignment | Mapping[NodeId, LayerRange]) -> list[int]:
    ranges = assignment.ranges if isinstance(assignment, Assignment) else assignment
    covered = np.zeros(model.num_layers + 1, dtype=np.int64)
    for rng in ranges.values():
        if rng.end <= model.num_layers:
            covered[rng.start] += 1
            covered[rng.end] -= 1
    return [int(i) for i in np.flatnonzero(np.cumsum(covered[:-1]) == 0)]


# --- zones -----------------------------------------------------------------------------------------


def zones_of(
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec], rtt: RttFn, *, threshold_s: float = ZONE_RTT_S
) -> dict[NodeId, int]:
    """Zone index of every node: single-linkage clusters of regions closer than `threshold_s`."""
    node_map = as_node_map(nodes)
    regions, matrix = region_rtt_matrix(node_map.values(), rtt)
    zone_of_region = _cluster_regions(matrix, threshold_s)
    index = {r: zone_of_region[i] for i, r in enumerate(regions)}
    return {nid: index[n.region] for nid, n in node_map.items()}


def _cluster_regions(matrix: np.ndarray, threshold_s: float) -> list[int]:
    parent = list(range(len(matrix)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(matrix)):
        for j in range(i + 1, len(matrix)):
            if matrix[i, j] <= threshold_s:
                parent[max(find(i), find(j))] = min(find(i), find(j))
    roots = sorted({find(i) for i in range(len(matrix))})
    return [roots.index(find(i)) for i in range(len(matrix))]


# --- planning data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Info:
    """What planning needs of one node, with its capacities for each chain-end role."""

    spec: NodeSpec
    cap: int  # interior range
    cap_first: int  # range starting at layer 0 (holds the embedding)
    cap_last: int  # range ending at the last layer (holds the LM head)
    cap_both: int  # the whole chain alone
    zone: int
    tiebreak: int

    @property
    def node_id(self) -> NodeId:
        return self.spec.node_id


def _largest_first(info: _Info) -> tuple[int, float, int]:
    """The order in which the planner hands out ranges: most layers held first, then the fastest, then a
    seeded tiebreak (the same order on every node)."""
    return -info.cap, info.spec.layer_latency_s, info.tiebreak


def _fastest_first(info: _Info) -> tuple[float, int]:
    """Fastest per layer first, then the seeded tiebreak."""
    return info.spec.layer_latency_s, info.tiebreak


KV_FRACTION_STEPS = 64  # below one session, the reservation shrinks in 1/64ths of one context


class _Memory(NamedTuple):
    """Per node: the memory it offers, and one layer's weights as it holds them (quantized or not)."""

    offered: np.ndarray
    per_layer: np.ndarray


def _memory(model: ModelSpec, nodes: Iterable[NodeSpec]) -> _Memory:
    nodes = list(nodes)
    return _Memory(np.array([n.memory_bytes for n in nodes], dtype=float),
                   np.array([weight_bytes_per_layer(model, n) for n in nodes], dtype=float))


def _capacities(model: ModelSpec, memory: _Memory, sessions: float, context_tokens: int, *,
                first: bool, last: bool) -> np.ndarray:
    """`layer_capacity` of many nodes at once (the same arithmetic, vectorised)."""
    per_layer = memory.per_layer + kv_bytes_per_layer(model, sessions, context_tokens)
    free = memory.offered - model.head_bytes / 2 * (int(first) + int(last))
    fits = np.floor(np.divide(free, per_layer, out=np.zeros_like(free), where=per_layer > 0) + 1e-9)
    caps = np.minimum(model.num_layers, fits)
    return np.where((free > 0) & (per_layer > 0), np.maximum(caps, 0), 0).astype(np.int64)


def _chain_coverable(model: ModelSpec, memory: _Memory, sessions: float, context_tokens: int) -> bool:
    """Whether some chain of distinct nodes holds every layer at this KV share (exact, heads counted).

    One node holding everything, or a first node (with the embedding), a last one (with the LM head)
    and every other node's full interior capacity in between.
    """
    L = model.num_layers
    if not len(memory.offered):
        return False
    cap = _capacities(model, memory, sessions, context_tokens, first=False, last=False)
    if _capacities(model, memory, sessions, context_tokens, first=True, last=True).max() >= L:
        return True
    if len(memory.offered) < 2:
        return False
    first = _capacities(model, memory, sessions, context_tokens, first=True, last=False)
    last = _capacities(model, memory, sessions, context_tokens, first=False, last=True)
    lose_first = np.where(first > 0, cap - first, np.iinfo(np.int64).max // 4)
    lose_last = np.where(last > 0, cap - last, np.iinfo(np.int64).max // 4)
    f = np.argsort(lose_first, kind="stable")[:2]
    g = np.argsort(lose_last, kind="stable")[:2]
    best_loss = min(int(lose_first[i] + lose_last[j]) for i in f for j in g if i != j)
    return int(cap.sum()) - best_loss >= L


def kv_sessions_per_node(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    *,
    expected_sessions: int = DEFAULT_EXPECTED_SESSIONS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> float:
    """Sessions each node reserves KV cache for: its share of the expected concurrent sessions.

    The share is sessions / replicas (the number of full copies the swarm's memory holds), rounded
    up; it is lowered if reserving it would leave some layer uncovered: first down to one session,
    then below one (a fraction of one `context_tokens` context, in 1/64ths: shorter sessions still
    fit), and to 0 (weights only) when the swarm cannot even hold the weights, so that the allocator
    covers what it can. Whole shares are ints; fractions are floats in (0, 1).
    """
    memory = _memory(model, as_node_map(nodes).values())
    L = model.num_layers
    heads = model.head_bytes > 0

    def total(sessions: float) -> int:
        """Layers the swarm can hold, as if every node held both head parts: conservative, so that
        a share this allows is sure to leave the allocator room to cover every layer."""
        return int(_capacities(model, memory, sessions, context_tokens, first=heads, last=heads).sum())

    if total(1) >= L:
        replicas = total(1) / max(L, 1)  # copies of the model the memory holds (fractional)
        share = max(1, math.ceil(expected_sessions / replicas))
        if total(share) >= L:
            return share
        lo, hi = 1, share  # total(lo) >= L > total(hi): largest share that still covers
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) >= L else (lo, mid)
        return lo
    if _chain_coverable(model, memory, 1, context_tokens):
        return 1
    # Not one full session next to the weights: shrink the reservation rather than leave layers out.
    if not _chain_coverable(model, memory, 0.0, context_tokens):
        return 0.0  # not even the weights fit: cover what can be covered
    lo, hi = 0, KV_FRACTION_STEPS  # coverable at lo / KV_FRACTION_STEPS, not at hi / KV_FRACTION_STEPS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _chain_coverable(model, memory, mid / KV_FRACTION_STEPS, context_tokens) else (lo, mid)
    return lo / KV_FRACTION_STEPS


def explain_allocation(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    assignment: Assignment | Mapping[NodeId, LayerRange] | None = None,
    *,
    expected_sessions: int = DEFAULT_EXPECTED_SESSIONS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> list[str]:
    """Plain-language notes on what limits an allocation: empty when nothing does.

    States the KV reservation when it had to shrink below one full session, and, when layers stay
    uncovered, why: which layers, how many layers the swarm's memory holds without any KV cache, and
    the largest node against the size of one layer (plus the head parts a chain end holds).
    """
    node_map = as_node_map(nodes)
    notes: list[str] = []
    L = model.num_layers
    if not node_map:
        return [f"no nodes: none of the {L} layers can be served"]
    share = kv_sessions_per_node(model, node_map, expected_sessions=expected_sessions,
                                 context_tokens=context_tokens)
    one_session = kv_bytes_per_layer(model, 1, context_tokens) / 1e9
    if 0 < share < 1:
        notes.append(
            f"KV reservation shrunk to {share:g} of one {context_tokens}-token session per node "
            f"(~{int(share * context_tokens)} tokens): one full session's KV ({one_session:.3g} GB per layer) "
            "does not fit next to the weights on enough nodes to cover every layer"
        )
    elif share == 0:
        notes.append(
            f"no KV cache reserved: the weights alone take the memory needed to cover the layers (one "
            f"{context_tokens}-token session needs {one_session:.3g} GB per layer); sessions get only what "
            "memory is left"
        )
    if assignment is None:
        assignment = allocate(model, node_map, lambda a, b: 0.0, expected_sessions=expected_sessions,
                              context_tokens=context_tokens)
    missing = uncovered_layers(model, assignment)
    if missing:
        memory = _memory(model, node_map.values())
        weights_only = int(_capacities(model, memory, 0.0, context_tokens, first=False, last=False).sum())
        largest = max(node_map.values(), key=lambda n: (n.memory_bytes, n.node_id))
        runs = ", ".join(f"{a}:{b}" for a, b in _gaps(np.isin(np.arange(L), missing, invert=True)))
        notes.append(
            f"layers {runs} uncovered ({len(missing)} of {L}): even without KV cache the {len(node_map)} nodes "
            f"hold {weights_only} layers; the largest, {largest.node_id}, has {largest.memory_bytes / 1e9:.3g} GB "
            f"and one layer needs {model.layer_bytes / 1e9:.3g} GB"
            + (f" (a chain end also holds {model.head_bytes / 2e9:.3g} GB of embedding or LM head)"
               if model.head_bytes > 0 else "")
        )
    return notes


def _infos(
    model: ModelSpec, node_map: Mapping[NodeId, NodeSpec], rtt: RttFn, sessions: float, context_tokens: int,
    seed: int, zones: Mapping[NodeId, int] | None = None,
) -> dict[NodeId, _Info]:
    zones = zones if zones is not None else zones_of(node_map, rtt)
    ids = sorted(node_map)
    memory = _memory(model, (node_map[n] for n in ids))
    caps = [
        _capacities(model, memory, sessions, context_tokens, first=first, last=last).tolist()
        for first, last in ((False, False), (True, False), (False, True), (True, True))
    ]
    out: dict[NodeId, _Info] = {}
    for i, nid in enumerate(ids):
        if caps[0][i] > 0 or caps[3][i] > 0:
            out[nid] = _Info(
                spec=node_map[nid],
                cap=caps[0][i],
                cap_first=caps[1][i],
                cap_last=caps[2][i],
                cap_both=caps[3][i],
                zone=zones[nid],
                tiebreak=zlib.crc32(f"{seed}:{nid}".encode()),
            )
    return out


# --- global plan: pipelines and water-filling ------------------------------------------------------


def _order_pipeline(group: Sequence[_Info], zone_rtt: np.ndarray) -> list[_Info]:
    """Zone by zone (nearest-neighbour tour of the zones), region by region, slow uplinks last."""
    zones = sorted({g.zone for g in group})
    if len(zones) > 1:
        weight = {z: sum(g.cap for g in group if g.zone == z) for z in zones}
        tour = [max(zones, key=lambda z: (weight[z], -z))]
        while len(tour) < len(zones):
            rest = [z for z in zones if z not in tour]
            tour.append(min(rest, key=lambda z: (zone_rtt[tour[-1], z], z)))
        rank = {z: i for i, z in enumerate(tour)}
    else:
        rank = {zones[0]: 0}
    return sorted(
        group, key=lambda g: (rank[g.zone], g.spec.region, g.spec.relayed, -g.spec.uplink_bps, g.tiebreak)
    )


def _stage_caps(ordered: Sequence[_Info], L: int) -> list[int]:
    if len(ordered) == 1:
        return [min(ordered[0].cap_both, L)]
    caps = [min(g.cap, L) for g in ordered]
    caps[0] = min(ordered[0].cap_first, L)
    caps[-1] = min(ordered[-1].cap_last, L)
    return caps


def _build_pipelines(
    cands: Sequence[_Info], L: int, zone_rtt: np.ndarray, rtt: RttFn
) -> tuple[list[list[_Info]], list[_Info]]:
    """Greedy bin covering: as many groups as possible whose ordered capacities sum to >= L.

    A group takes the largest nodes until one more completes it; the closing node is chosen among the
    few smallest that would (which waste the least memory) as the one adding the least per-token time:
    its share of layers at its speed plus its hop from the nearest member.
    """
    pool = sorted(cands, key=_largest_first)
    neg_caps = [-g.cap for g in pool]
    pipelines: list[list[_Info]] = []
    pool_caps = sum(min(g.cap, L) for g in pool)
    while pool and (pool_caps if len(pool) > 1 else min(pool[0].cap_both, L)) >= L:
        group: list[_Info] = []
        taken: list[int] = []  # indices into pool, removed when the group completes
        remaining = set(range(len(pool)))
        done = False
        while remaining and not done:
            have = sum(_stage_caps(_order_pipeline(group, zone_rtt), L)) if group else 0
            need = L - have
            # Smallest nodes that complete the group: scan upwards from the first one big enough.
            idx = bisect.bisect_right(neg_caps, -need) - 1
            closing: list[tuple[float, int, int]] = []
            for j in range(idx, max(-1, idx - 9), -1):
                if j in remaining and _covers(group + [pool[j]], L, zone_rtt):
                    g = pool[j]
                    hop = min((rtt(g.node_id, m.node_id) for m in group), default=0.0) / 2
                    closing.append((min(need, g.cap) * g.spec.layer_latency_s + hop, g.cap, j))
            if closing:
                j = min(closing)[2]
                group.append(pool[j])
                taken.append(j)
                done = True
            else:
                largest = min(remaining)
                group.append(pool[largest])
                taken.append(largest)
                remaining.discard(largest)
                if _covers(group, L, zone_rtt):
                    done = True
        if not done:
            break
        keep = sorted(set(range(len(pool))) - set(taken))
        pool_caps -= sum(min(pool[i].cap, L) for i in taken)
        pool = [pool[i] for i in keep]
        neg_caps = [neg_caps[i] for i in keep]
        pipelines.append(group)
    return pipelines, pool


def _covers(group: Sequence[_Info], L: int, zone_rtt: np.ndarray) -> bool:
    return sum(_stage_caps(_order_pipeline(group, zone_rtt), L)) >= L


def _water_fill(L: int, caps: Sequence[int], latency: Sequence[float], legs: Sequence[float]) -> list[int]:
    """Layers per stage equalising stage time (latency_i x layers_i + leg_i) under the caps."""
    cap = np.asarray(caps, dtype=float)
    lat = np.maximum(np.asarray(latency, dtype=float), 1e-12)
    leg = np.asarray(legs, dtype=float)

    def layers_at(stage_s: float) -> np.ndarray:
        return np.minimum(cap, np.maximum(0.0, (stage_s - leg) / lat))

    # The total is piecewise linear in the stage time, with breakpoints where a stage starts taking
    # layers (its leg) or fills up (leg + cap x latency): find the segment that reaches L, solve it.
    points = np.unique(np.concatenate([leg, leg + cap * lat]))
    totals = np.minimum(cap[None, :], np.maximum(0.0, (points[:, None] - leg[None, :]) / lat[None, :])).sum(axis=1)
    k = int(np.searchsorted(totals, L, side="left"))
    if k >= len(points):
        stage_s = float(points[-1]) + 1e-9  # not enough room: everyone at their cap
    elif k == 0:
        stage_s = float(points[0])
    else:
        p0, f0 = float(points[k - 1]), float(totals[k - 1])
        active = (leg <= p0) & (p0 < leg + cap * lat)
        slope = float((1.0 / lat[active]).sum())
        stage_s = p0 + (L - f0) / slope if slope > 0 else float(points[k])
    exact = layers_at(stage_s)
    base = np.minimum(np.floor(exact + 1e-9), cap).astype(int)
    short = L - int(base.sum())
    # Largest remainder first; ties to the faster node. Anyone with room can absorb a remainder.
    order = sorted(range(len(cap)), key=lambda i: (-(exact[i] - base[i]), lat[i], i))
    while short > 0:
        progressed = False
        for i in order:
            if short > 0 and base[i] < cap[i]:
                base[i] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    for i in sorted(range(len(cap)), key=lambda i: (-lat[i], i)):
        while short < 0 and base[i] > 0:
            base[i] -= 1
            short += 1
    return [int(b) for b in base]


def _at_least_one_each(layers: list[int], caps: list[int]) -> list[int]:
    """Give every stage that can hold a layer at least one, taken from the busiest stages."""
    layers = list(layers)
    for i, n in enumerate(layers):
        if n == 0 and caps[i] > 0:
            donor = max(range(len(layers)), key=lambda j: (layers[j], -j))
            if layers[donor] > 1:
                layers[donor] -= 1
                layers[i] = 1
    return layers


def _leg_after(model: ModelSpec, a: _Info, b: _Info | None, rtt: RttFn, zone_rtt: np.ndarray) -> float:
    """Outgoing leg of a stage: to the next stage, or (last stage) to a client in its own zone."""
    if b is None:
        return handover_s(model, float(zone_rtt[a.zone, a.zone]), a.spec)
    return handover_s(model, rtt(a.node_id, b.node_id), a.spec, b.spec)


def _layout_pipeline(
    model: ModelSpec, group: Sequence[_Info], rtt: RttFn, zone_rtt: np.ndarray
) -> tuple[dict[NodeId, LayerRange], list[_Info]]:
    """Contiguous ranges for one pipeline; stages that water-filling leaves empty are returned."""
    L = model.num_layers

    def fill(ordered: list[_Info]) -> list[int]:
        caps = _stage_caps(ordered, L)
        legs = [_leg_after(model, g, ordered[i + 1] if i + 1 < len(ordered) else None, rtt, zone_rtt)
                for i, g in enumerate(ordered)]
        return _water_fill(L, caps, [g.spec.layer_latency_s for g in ordered], legs)

    ordered = _order_pipeline(group, zone_rtt)
    layers = fill(ordered)
    while 0 in layers and len(ordered) > 1:
        # Dropping an idle stage changes which nodes hold the chain ends (and their head parts).
        fewer = [g for g, n in zip(ordered, layers, strict=True) if n > 0]
        if sum(_stage_caps(fewer, L)) < L:
            layers = _at_least_one_each(layers, _stage_caps(ordered, L))
            break
        ordered, layers = fewer, fill(fewer)
    dropped = [g for g in group if g not in ordered]
    ranges: dict[NodeId, LayerRange] = {}
    start = 0
    for g, n in zip(ordered, layers, strict=True):
        if n > 0:
            ranges[g.node_id] = LayerRange(start, start + n)
            start += n
    return ranges, dropped


# --- reinforcement: the weakest window -------------------------------------------------------------


def _windows(info: _Info, L: int) -> list[tuple[int, int]]:
    """Candidate ranges [s, e) the node can hold, the edge ones sized for the head parts."""
    if info.cap_both >= L:
        return [(0, L)]
    out: list[tuple[int, int]] = []
    if min(info.cap_first, L - 1) > 0:
        out.append((0, min(info.cap_first, L - 1)))
    if min(info.cap_last, L - 1) > 0:
        out.append((L - min(info.cap_last, L - 1), L))
    if info.cap > 0:
        out.extend((s, s + info.cap) for s in range(1, L - info.cap))
    return sorted(set(out))


def node_windows(
    model: ModelSpec,
    node: NodeSpec,
    *,
    sessions: float = 1,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> list[tuple[int, int]]:
    """Every range [start, end) of maximal length the node can hold (edge ones hold the head parts)."""

    def cap(first: bool, last: bool) -> int:
        return layer_capacity(model, node, sessions=sessions, context_tokens=context_tokens,
                              embedding=first, lm_head=last)

    info = _Info(node, cap(False, False), cap(True, False), cap(False, True), cap(True, True), 0, 0)
    return _windows(info, model.num_layers)


def _best_window(
    info: _Info, L: int, coverage: np.ndarray, zone_tp: np.ndarray, global_tp: np.ndarray,
    must_touch: tuple[int, int] | None = None,
) -> tuple[int, int] | None:
    """Window covering the most uncovered layers, then the weakest of the zone, then of the swarm."""
    windows = _windows(info, L)
    if must_touch is not None:
        g0, g1 = must_touch
        windows = [(s, e) for s, e in windows if s < g1 and e > g0]
    if not windows:
        return None
    uncovered = (coverage == 0).astype(float)
    cum_unc = np.concatenate([[0.0], np.cumsum(uncovered)])
    cum_zone = np.concatenate([[0.0], np.cumsum(zone_tp)])
    cum_glob = np.concatenate([[0.0], np.cumsum(global_tp)])
    best_key: tuple[float, ...] | None = None
    best: tuple[int, int] | None = None
    for s, e in windows:
        key = (
            -(cum_unc[e] - cum_unc[s]),
            float(zone_tp[s:e].min()),
            float(global_tp[s:e].min()),
            (cum_zone[e] - cum_zone[s]) / (e - s),
            (cum_glob[e] - cum_glob[s]) / (e - s),
            s,
        )
        if best_key is None or key < best_key:
            best_key, best = key, (s, e)
    return best


class _Coverage:
    """Per-layer replica count and throughput (global and per zone), updated as ranges are placed."""

    def __init__(self, model: ModelSpec, infos: Mapping[NodeId, _Info]) -> None:
        self.model = model
        self.L = model.num_layers
        self.infos = infos
        self.count = np.zeros(self.L)
        self.glob = np.zeros(self.L)
        self.zone: dict[int, np.ndarray] = {}

    def rate(self, node_id: NodeId, rng: LayerRange) -> float:
        return node_rate_tokens_per_s(self.model, self.infos[node_id].spec, len(rng))

    def add(self, node_id: NodeId, rng: LayerRange, sign: float = 1.0) -> None:
        rate = self.rate(node_id, rng) * sign
        self.count[rng.start:rng.end] += sign
        self.glob[rng.start:rng.end] += rate
        zone = self.zone.setdefault(self.infos[node_id].zone, np.zeros(self.L))
        zone[rng.start:rng.end] += rate

    def zone_tp(self, zone: int) -> np.ndarray:
        return self.zone.get(zone, np.zeros(self.L))

    def place(self, info: _Info, must_touch: tuple[int, int] | None = None) -> LayerRange | None:
        window = _best_window(info, self.L, self.count, self.zone_tp(info.zone), self.glob, must_touch)
        if window is None:
            return None
        rng = LayerRange(*window)
        self.add(info.node_id, rng)
        return rng


def _place_around(model: ModelSpec, infos: Mapping[NodeId, _Info], ranges: dict[NodeId, LayerRange],
                  rest: Iterable[_Info]) -> _Coverage:
    """The coverage of `ranges`, then each of `rest` (largest first) placed in its weakest window and added
    to `ranges` (a node that fits nowhere is left out)."""
    coverage = _Coverage(model, infos)
    for node_id, rng in ranges.items():
        coverage.add(node_id, rng)
    for info in sorted(rest, key=_largest_first):
        rng = coverage.place(info)
        if rng is not None:
            ranges[info.node_id] = rng
    return coverage


def _global_plan(
    model: ModelSpec, infos: Mapping[NodeId, _Info], rtt: RttFn, sessions: float, context_tokens: int,
    pipelines_out: list[list[NodeId]] | None = None,
) -> dict[NodeId, LayerRange]:
    """Steps 2-6 of the module docstring; `pipelines_out` receives each pipeline's nodes in chain order."""
    L = model.num_layers
    all_specs = [i.spec for i in infos.values()]
    regions, region_rtt = region_rtt_matrix(all_specs, rtt)
    zone_rtt = _zone_rtt(infos, regions, region_rtt)
    by_zone: dict[int, list[_Info]] = {}
    for info in infos.values():
        by_zone.setdefault(info.zone, []).append(info)

    pipelines: list[list[_Info]] = []
    local_leftovers: list[_Info] = []
    pooled: list[_Info] = []
    for zone in sorted(by_zone):
        made, rest = _build_pipelines(by_zone[zone], L, zone_rtt, rtt)
        pipelines.extend(made)
        (local_leftovers if made else pooled).extend(rest)
    made, rest = _build_pipelines(pooled, L, zone_rtt, rtt)
    pipelines.extend(made)
    leftovers = local_leftovers + rest

    ranges: dict[NodeId, LayerRange] = {}
    for group in pipelines:
        laid, dropped = _layout_pipeline(model, group, rtt, zone_rtt)
        ranges.update(laid)
        leftovers.extend(dropped)
        if pipelines_out is not None:
            pipelines_out.append(list(laid))

    # Safety net: a range that water-filling's rounding pushed past memory is cut back.
    for node_id in list(ranges):
        fitted = _fit(model, infos[node_id].spec, ranges[node_id], sessions, context_tokens)
        if fitted is None:
            del ranges[node_id]
            leftovers.append(infos[node_id])
        else:
            ranges[node_id] = fitted

    coverage = _place_around(model, infos, ranges, leftovers)
    _close_gaps(model, infos, ranges, coverage, sessions, context_tokens)
    if coverage.count.min() == 0:
        # Memory is tight: the pipelines left a gap. Lay one chain over every node it takes, if memory
        # allows one at all, and place everyone else around it.
        chain = _chain_cover(model, infos)
        if chain is not None:
            fallback = _place_around(model, infos, chain, [infos[n] for n in infos if n not in chain])
            _close_gaps(model, infos, chain, fallback, sessions, context_tokens)
            if (fallback.count == 0).sum() < (coverage.count == 0).sum():
                return chain
    return ranges


def _chain_cover(model: ModelSpec, infos: Mapping[NodeId, _Info]) -> dict[NodeId, LayerRange] | None:
    """One chain holding every layer, built as `_chain_coverable` proves it exists; None if none does.

    A node that holds everything alone (the fastest); else the pair of chain ends losing the least
    capacity to the head parts, with the largest other nodes in between.
    """
    L = model.num_layers
    items = sorted(infos.values(), key=_fastest_first)
    solo = [g for g in items if g.cap_both >= L]
    if solo:
        return {solo[0].node_id: LayerRange(0, L)}
    firsts = sorted((g for g in items if g.cap_first > 0), key=lambda g: g.cap - g.cap_first)[:2]
    lasts = sorted((g for g in items if g.cap_last > 0), key=lambda g: g.cap - g.cap_last)[:2]
    pairs = [(f, g) for f in firsts for g in lasts if f.node_id != g.node_id]
    if not pairs:
        return None
    first, last = min(pairs, key=lambda p: p[0].cap - p[0].cap_first + p[1].cap - p[1].cap_last)
    ranges = {first.node_id: LayerRange(0, min(first.cap_first, L - 1))}
    pos = ranges[first.node_id].end
    middle = sorted((g for g in items if g.node_id not in (first.node_id, last.node_id)), key=_largest_first)
    for g in middle:
        if L - pos <= last.cap_last:
            break
        take = min(g.cap, L - pos - 1)
        ranges[g.node_id] = LayerRange(pos, pos + take)
        pos += take
    if L - pos > last.cap_last:
        return None
    ranges[last.node_id] = LayerRange(pos, L)
    return ranges


def _zone_rtt(infos: Mapping[NodeId, _Info], regions: list[str], region_rtt: np.ndarray) -> np.ndarray:
    """Zone-to-zone RTT: the closest pair of their regions (own entry: the largest inside the zone)."""
    zone_of_region: dict[str, int] = {}
    for info in infos.values():
        zone_of_region[info.spec.region] = info.zone
    n = max(zone_of_region.values(), default=0) + 1
    out = np.full((n, n), np.inf)
    diag = np.zeros(n)
    for i, a in enumerate(regions):
        for j, b in enumerate(regions):
            za, zb = zone_of_region[a], zone_of_region[b]
            if za == zb:
                diag[za] = max(diag[za], region_rtt[i, j])
            else:
                out[za, zb] = min(out[za, zb], region_rtt[i, j])
    out[np.arange(n), np.arange(n)] = diag
    return out


# --- the KV reservation: latency against concurrency -----------------------------------------------



FIXED_POINT_ROUNDS = 6
WAIT_FACTOR = 4.0  # a session that finds no KV room waits for a slot: about two sessions, twice as slow


def _peak_sessions(expected_sessions: float) -> float:
    """Concurrent sessions to provision for: the mean plus two standard deviations (Poisson)."""
    return expected_sessions + 2.0 * math.sqrt(max(expected_sessions, 0.0))


def _share_candidates(model: ModelSpec, memory: _Memory, base: float, expected_sessions: int,
                      context_tokens: int) -> list[float]:
    """KV shares worth comparing: the even share, then doubling while coverable, up to the whole load.

    The whole load is taken at twice the expected sessions: under load a session decodes up to about
    twice slower (batches turn compute bound), so about twice as many are open at once.
    """
    if base < 1:
        return [base]
    heads = model.head_bytes > 0
    top = max(base, math.ceil(_peak_sessions(2 * expected_sessions)))
    out, share = [base], base
    while share < top:
        share = min(top, share * 2)
        caps = _capacities(model, memory, share, context_tokens, first=heads, last=heads)
        if int(caps.sum()) < model.num_layers:
            break
        out.append(share)
    return out


def _plan_cost(
    model: ModelSpec,
    infos: Mapping[NodeId, _Info],
    ranges: Mapping[NodeId, LayerRange],
    pipelines: Sequence[Sequence[NodeId]],
    rtt: RttFn,
    clients: Sequence[tuple[str, float]],
    expected_sessions: int,
    context_tokens: int,
) -> float:
    """Mean per-token time of the expected sessions (plus 2 sd) filled into the plan's pipelines, fastest first.

    This is what the router does with them: each session takes the pipeline (chain) of least per-token
    time for its client (client legs included) among those with KV room, where a pipeline's time grows
    once its batch turns compute bound. `expected_sessions` is taken as estimated at unloaded speed: the
    concurrency is scaled by how much slower the loaded plan decodes (a short fixed point). A session
    that finds no room waits for one: it costs WAIT_FACTOR x the slowest pipeline's time per token.
    Reinforcement nodes and mixed chains are left out: conservative.
    """
    L = model.num_layers
    kv_session = context_tokens * model.kv_bytes_per_token_per_layer
    lat, pre, layers, legs, room, ends = [], [], [], [], [], []
    for group in pipelines:
        chain = sorted((n for n in group if n in ranges), key=lambda n: ranges[n].start)
        pos = 0
        for n in chain:
            if ranges[n].start != pos:
                break
            pos = ranges[n].end
        if pos != L or not chain:
            continue  # cut by the safety net: no longer a chain of its own
        specs = [infos[n].spec for n in chain]
        n_layers = np.array([len(ranges[n]) for n in chain], dtype=float)
        free = np.array([kv_share_bytes(model, infos[n].spec.memory_bytes, ranges[n],
                                        layer_bytes=infos[n].spec.layer_bytes) for n in chain])
        room.append(max(0.0, float(np.floor(np.min(free / (n_layers * kv_session))))))
        lat.append(np.array([sp.layer_latency_s for sp in specs]))
        pre.append(np.array([sp.prefill_s_per_token_per_layer for sp in specs]))
        layers.append(n_layers)
        legs.append(sum(handover_s(model, rtt(a.node_id, b.node_id), a, b) for a, b in pairwise(specs)))
        ends.append((chain[0], chain[-1]))
    if not room or expected_sessions <= 0:
        return math.inf if expected_sessions > 0 else 0.0
    P = len(room)
    client_list = list(clients) or [("", 1.0)]
    weight = np.array([max(w, 0.0) for _, w in client_list], dtype=float)
    leg = np.array([[(rtt(c, a) + rtt(b, c)) / 2 if c else 0.0 for a, b in ends] for c, _ in client_list])
    limit = np.array([max(1.0, float(np.min(la / np.maximum(pr, 1e-15)))) for la, pr in zip(lat, pre, strict=True)])
    room_arr = np.array(room)

    def token_s(p: int, batch: float) -> float:
        return float(np.sum(layers[p] * np.maximum(lat[p], batch * pre[p]))) + legs[p]

    def fill(sessions: float) -> tuple[float, float]:
        """Mean per-token time of `sessions` filled in fastest first (client legs included), with sessions
        left without room waiting (WAIT_FACTOR x the slowest chain), and with them served by the slowest
        chain once a slot frees (what sets how long sessions hold KV)."""
        demand = sessions * weight / max(weight.sum(), 1e-12)
        filled = np.zeros(P)
        legs_total = 0.0
        now = np.array([token_s(p, 1.0) if room[p] >= 1 else math.inf for p in range(P)])  # the next session's
        for _ in range(64 * P + 64):  # chunks: a few per pipeline; bounded
            want = demand > 1e-9
            if not np.isfinite(now).any() or not want.any():
                break
            cost = np.where(want[:, None], now[None, :] + leg, math.inf)
            c, p = np.unravel_index(int(np.argmin(cost)), cost.shape)
            # Take sessions while this pipeline's time stays flat (memory bound), else a tenth of its batch.
            flat = limit[p] - filled[p] if filled[p] + 1 <= limit[p] else max(1.0, 0.1 * filled[p])
            chunk = min(demand[c], room_arr[p] - filled[p], max(1.0, flat))
            filled[p] += chunk
            demand[c] -= chunk
            legs_total += chunk * leg[c, p]
            now[p] = token_s(p, filled[p] + 1) if filled[p] + 1 <= room_arr[p] else math.inf
        placed = legs_total + sum(filled[p] * token_s(p, filled[p]) for p in range(P) if filled[p] > 0)
        # A session left without room waits for a slot: WAIT_FACTOR x the slowest chain's time per token.
        worst = max(token_s(p, max(filled[p], 1.0)) for p in range(P)) + float(leg.max())
        waiting = float(demand.sum())
        return (placed + waiting * WAIT_FACTOR * worst) / sessions, (placed + waiting * worst) / sessions

    # Little's law again: sessions hold KV longer when a loaded plan decodes slower, so more are open at once.
    alone = fill(1.0)[1]
    sessions = float(expected_sessions)
    for _ in range(FIXED_POINT_ROUNDS):
        sessions = expected_sessions * fill(_peak_sessions(sessions))[1] / alone
    return fill(_peak_sessions(sessions))[0]


def _choose_plan(
    model: ModelSpec,
    node_map: Mapping[NodeId, NodeSpec],
    rtt: RttFn,
    base: float,
    expected_sessions: int,
    context_tokens: int,
    seed: int,
    clients: Sequence[tuple[str, float]],
) -> tuple[dict[NodeId, LayerRange], float]:
    """Global plans for a few KV shares; the one whose pipelines serve the expected load fastest."""
    memory = _memory(model, node_map.values())
    shares = _share_candidates(model, memory, base, expected_sessions, context_tokens)
    zones = zones_of(node_map, rtt)
    best: tuple[float, dict[NodeId, LayerRange], float] | None = None
    seen: set[tuple[tuple[int, int, int, int], ...]] = set()
    for share in shares:
        infos = _infos(model, node_map, rtt, share, context_tokens, seed, zones)
        caps = tuple((i.cap, i.cap_first, i.cap_last, i.cap_both) for i in infos.values())
        if not infos or caps in seen:
            continue  # the same capacities make the same plan, and more KV only costs what it held
        seen.add(caps)
        pipelines: list[list[NodeId]] = []
        ranges = _global_plan(model, infos, rtt, share, context_tokens, pipelines)
        gaps = len(uncovered_layers(model, ranges))
        cost = _plan_cost(model, infos, ranges, pipelines, rtt, clients, expected_sessions, context_tokens)
        key = gaps * 1e9 + cost
        if best is None or key < best[0] * (1 - 1e-9):
            best = (key, ranges, share)
    if best is None:
        return {}, base
    return best[1], best[2]


# --- incremental plan ------------------------------------------------------------------------------


def _incremental_plan(
    model: ModelSpec,
    infos: Mapping[NodeId, _Info],
    previous: Assignment,
    floor_sessions: float,
    context_tokens: int,
) -> dict[NodeId, LayerRange]:
    L = model.num_layers
    ranges: dict[NodeId, LayerRange] = {}
    for node_id in sorted(previous.ranges):
        info, rng = infos.get(node_id), previous.ranges[node_id]
        if info is None or rng.end > L:
            continue
        # A survivor keeps its range while it fits with the minimum KV reservation (one session):
        # the share of sessions moves with the swarm's size, and re-laying everyone out whenever it
        # moves would be churn for little gain. New placements use the full share.
        fitted = _fit(model, info.spec, rng, floor_sessions, context_tokens)
        if fitted is not None:  # else it is placed from scratch below, like a joiner
            ranges[node_id] = fitted

    coverage = _place_around(model, infos, ranges, [infos[n] for n in infos if n not in ranges])
    _close_gaps(model, infos, ranges, coverage, floor_sessions, context_tokens)  # coverage before KV headroom
    return ranges


def _fit(model: ModelSpec, spec: NodeSpec, rng: LayerRange, sessions: float, context_tokens: int
         ) -> LayerRange | None:
    """`rng`, or its longest prefix the node can hold (keeping the layers it has loaded); None if none."""
    for end in range(rng.end, rng.start, -1):
        candidate = LayerRange(rng.start, end)
        if range_fits(model, spec, candidate, sessions=sessions, context_tokens=context_tokens):
            return candidate
    return None


def _gaps(count: np.ndarray) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    layer = 0
    while layer < len(count):
        if count[layer] == 0:
            end = layer
            while end < len(count) and count[end] == 0:
                end += 1
            out.append((layer, end))
            layer = end
        else:
            layer += 1
    return out


def _close_gaps(
    model: ModelSpec,
    infos: Mapping[NodeId, _Info],
    ranges: dict[NodeId, LayerRange],
    coverage: _Coverage,
    sessions: float,
    context_tokens: int,
) -> None:
    """Close uncovered runs with as few changes as possible: extend a neighbour, else move a spare."""

    def fits(node_id: NodeId, rng: LayerRange) -> bool:
        return range_fits(model, infos[node_id].spec, rng, sessions=sessions, context_tokens=context_tokens)

    for _ in range(4 * model.num_layers):  # each round closes or shrinks a gap; bounded anyway
        gaps = _gaps(coverage.count)
        if not gaps:
            return
        g0, g1 = gaps[0]
        # 1. A neighbour that can grow over the gap (it keeps every layer it has loaded).
        growths: list[tuple[int, str, NodeId, LayerRange]] = []
        for node_id, rng in ranges.items():
            if rng.end == g0:
                ends = [e for e in range(g1, g0, -1) if fits(node_id, LayerRange(rng.start, e))]
                if ends:
                    growths.append((ends[0] - g0, "a", node_id, LayerRange(rng.start, ends[0])))
            if rng.start == g1:
                starts = [s for s in range(g0, g1) if fits(node_id, LayerRange(s, rng.end))]
                if starts:
                    growths.append((g1 - starts[0], "b", node_id, LayerRange(starts[0], rng.end)))
        best = max(growths, key=lambda t: (t[0], t[1], t[2])) if growths else None
        if best is not None and best[0] == g1 - g0:
            _replace(coverage, ranges, best[2], best[3])
            continue
        # 2. A node whose every layer has another replica moves over the gap (else: grow partly).
        spare = _spare_for(infos, ranges, coverage, g0, g1)
        if spare is not None:
            _replace(coverage, ranges, spare[0], spare[1])
        elif best is not None:
            _replace(coverage, ranges, best[2], best[3])
        else:
            return


def _spare_for(
    infos: Mapping[NodeId, _Info], ranges: Mapping[NodeId, LayerRange], coverage: _Coverage, g0: int, g1: int
) -> tuple[NodeId, LayerRange] | None:
    """The redundant node (prefer: covers the whole gap, least missed) and its window over the gap."""
    # Shortlist cheaply (how much of the gap it could hold, what its layers keep without it), then
    # find the actual windows of the few best: a 1,000-node swarm must not try 1,000 windows sets.
    shortlist: list[tuple[float, float, int, NodeId]] = []
    for node_id, rng in ranges.items():
        if coverage.count[rng.start:rng.end].min() < 2:
            continue
        info = infos[node_id]
        left = float((coverage.glob[rng.start:rng.end] - coverage.rate(node_id, rng)).min())
        shortlist.append((-min(info.cap, g1 - g0), -left, info.tiebreak, node_id))
    best_key: tuple[float, ...] | None = None
    best: tuple[NodeId, LayerRange] | None = None
    for *_, node_id in sorted(shortlist)[:8]:
        rng = ranges[node_id]
        info = infos[node_id]
        rate = coverage.rate(node_id, rng)
        count = coverage.count.copy()
        count[rng.start:rng.end] -= 1
        glob = coverage.glob.copy()
        glob[rng.start:rng.end] -= rate
        zone = coverage.zone_tp(info.zone).copy()
        zone[rng.start:rng.end] -= rate
        window = _best_window(info, coverage.L, count, zone, glob, must_touch=(g0, g1))
        if window is None:
            continue
        closed = min(window[1], g1) - max(window[0], g0)
        remaining_min = float(glob[rng.start:rng.end].min())
        key = (-closed, -remaining_min, info.tiebreak)
        if best_key is None or key < best_key:
            best_key, best = key, (node_id, LayerRange(*window))
    return best


def _replace(coverage: _Coverage, ranges: dict[NodeId, LayerRange], node_id: NodeId, rng: LayerRange) -> None:
    if node_id in ranges:
        coverage.add(node_id, ranges[node_id], -1.0)
    ranges[node_id] = rng
    coverage.add(node_id, rng)


# --- entry point -----------------------------------------------------------------------------------


def allocate(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    rtt: RttFn,
    *,
    previous: Assignment | None = None,
    expected_sessions: int = DEFAULT_EXPECTED_SESSIONS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    seed: int = 0,
    replan_threshold: float = 0.25,
    clients: Sequence[tuple[str, float]] = (),
) -> Assignment:
    """Give every useful node a contiguous layer range (see the module docstring).

    Deterministic given its inputs and `seed` (which only breaks ties between identical nodes).
    With `previous`, changes as few ranges as possible; `replan_threshold=math.inf` never replans.
    Nodes that cannot hold a single layer are left out of the assignment.

    When one full session's KV cannot sit next to the weights on enough nodes, the KV reservation
    shrinks below one session (down to none) so that every layer the swarm's memory can hold is still
    covered (`kv_sessions_per_node`). When layers stay uncovered anyway, or nothing fits at all, the
    reason is logged as a warning of the "swarm.allocator" logger; `explain_allocation` returns it.
    """
    node_map = as_node_map(nodes)
    sessions = kv_sessions_per_node(
        model, node_map, expected_sessions=expected_sessions, context_tokens=context_tokens
    )
    infos = _infos(model, node_map, rtt, sessions, context_tokens, seed)
    if not infos:
        if node_map:
            _warn_uncovered(model, node_map, {}, expected_sessions, context_tokens)
        return Assignment({}, previous.epoch + 1 if previous else 0)
    if previous is None:
        ranges = _sorted(_choose_plan(model, node_map, rtt, sessions, expected_sessions, context_tokens, seed,
                                      clients)[0])
        if uncovered_layers(model, ranges):
            _warn_uncovered(model, node_map, ranges, expected_sessions, context_tokens)
        return Assignment(ranges, 0)

    kept = _incremental_plan(model, infos, previous, min(1, sessions), context_tokens)
    chosen = kept
    kept_gaps = len(uncovered_layers(model, kept))
    if kept_gaps or math.isfinite(replan_threshold):
        fresh = _choose_plan(model, node_map, rtt, sessions, expected_sessions, context_tokens, seed, clients)[0]
        fresh_gaps = len(uncovered_layers(model, fresh))
        if fresh_gaps < kept_gaps:
            chosen = fresh
        elif fresh_gaps == kept_gaps == 0 and math.isfinite(replan_threshold):
            specs = {i: infos[i].spec for i in infos}
            if swarm_throughput(model, specs, fresh) > (1 + replan_threshold) * swarm_throughput(
                model, specs, kept
            ):
                chosen = fresh
    changed = dict(previous.ranges) != chosen
    if uncovered_layers(model, chosen):
        _warn_uncovered(model, node_map, chosen, expected_sessions, context_tokens)
    return Assignment(_sorted(chosen), previous.epoch + 1 if changed else previous.epoch)


def _warn_uncovered(model: ModelSpec, node_map: Mapping[NodeId, NodeSpec], ranges: Mapping[NodeId, LayerRange],
                    expected_sessions: int, context_tokens: int) -> None:
    if _log.isEnabledFor(logging.WARNING):
        notes = explain_allocation(model, node_map, ranges, expected_sessions=expected_sessions,
                                   context_tokens=context_tokens)
        _log.warning("allocation leaves layers uncovered: %s", "; ".join(notes))


def _sorted(ranges: Mapping[NodeId, LayerRange]) -> dict[NodeId, LayerRange]:
    return {k: ranges[k] for k in sorted(ranges)}
