"""Phase 1: which contiguous layer range each node serves.

Public API (stable):

    allocate(model, nodes, rtt, *, previous=None, expected_sessions=16, context_tokens=2048, seed=0,
             replan_threshold=0.25) -> Assignment
    layer_capacity(model, node, *, sessions=1, context_tokens=2048, embedding=False, lm_head=False) -> int
    kv_sessions_per_node(model, nodes, *, expected_sessions=16, context_tokens=2048) -> int
    layer_throughput(model, nodes, assignment, *, batch=1) -> numpy.ndarray   # tokens/s per layer
    swarm_throughput(model, nodes, assignment, *, batch=1) -> float           # min over layers
    uncovered_layers(model, assignment) -> list[int]
    zones_of(nodes, rtt, *, threshold_s=ZONE_RTT_S) -> dict[NodeId, int]
    node_windows(model, node, *, sessions=1, context_tokens=2048) -> list[tuple[int, int]]
    as_node_map(nodes) -> dict[NodeId, NodeSpec]

`nodes` may be a sequence of NodeSpec or a mapping id -> NodeSpec everywhere.

Global plan (no `previous`):
  1. KV budget. Each node reserves KV cache for its share of the expected concurrent sessions
     (sessions / number of replicas the swarm can carry), at `context_tokens` each. If that budget
     would leave some layer uncovered, the share shrinks (to one session at least): coverage first.
  2. Zones. Regions closer than ZONE_RTT_S (e.g. London-Frankfurt) form a zone, so that a pipeline
     never zigzags across continents.
  3. Pipelines. Inside each zone, as many disjoint node groups as possible that can each hold all
     layers (greedy bin covering: largest nodes first, closed by the smallest node that completes
     the group, which wastes the least memory). Nodes of zones that cannot make one pipeline alone
     are pooled into cross-zone pipelines, ordered zone by zone (one long leg, not many).
  4. Water-filling inside each pipeline: find the stage time lambda by bisection with
     sum_i min(cap_i, (lambda - leg_i) / latency_i) = L, then largest-remainder rounding. Unlike
     Parallax the stage time includes the node's outgoing network leg (RTT/2 + hidden state /
     uplink, relays penalised) and uses the node's measured per-layer latency. Nodes are ordered
     zone by zone and region by region, slow uplinks last (a last stage holding the LM head sends
     only token ids).
  5. Reinforcement. Nodes left over take the window of their capacity that covers uncovered layers
     first, then the weakest layers of their own zone, then of the swarm (Petals' rule, zone aware).

Incremental plan (`previous` given): survivors keep their ranges (shrunk only if they no longer fit
with one session of KV), joiners take the weakest window as in step 5, and a gap left by a departure
is closed by extending a neighbour or moving one redundant node, so a join or a leave changes one or
two ranges. The global plan replaces it only if it raises the swarm's min-layer throughput by more than
`replan_threshold`, or if it covers layers the incremental one cannot.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from swarm.costmodel import (
    RELAY_EXTRA_LEG_S,
    layer_capacity,
    node_rate_tokens_per_s,
    range_fits,
    region_rtt_matrix,
    transfer_s,
)
from swarm.types import Assignment, LayerRange, ModelSpec, NodeId, NodeSpec, RttFn

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "DEFAULT_EXPECTED_SESSIONS",
    "ZONE_RTT_S",
    "allocate",
    "as_node_map",
    "kv_sessions_per_node",
    "layer_capacity",
    "layer_throughput",
    "node_windows",
    "swarm_throughput",
    "uncovered_layers",
    "zones_of",
]

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


def kv_sessions_per_node(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    *,
    expected_sessions: int = DEFAULT_EXPECTED_SESSIONS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> int:
    """Sessions each node reserves KV cache for: its share of the expected concurrent sessions.

    The share is sessions / replicas (the number of full copies the swarm's memory holds), rounded
    up; it is lowered (down to 1) if reserving it would leave some layer uncovered.
    """
    specs = list(as_node_map(nodes).values())
    L = model.num_layers

    def total(sessions: int) -> int:
        """Layers the swarm can hold, as if every node held both head parts: conservative, so that
        a share this allows is sure to leave the allocator room to cover every layer."""
        heads = model.head_bytes > 0
        return sum(layer_capacity(model, n, sessions=sessions, context_tokens=context_tokens, embedding=heads,
                                  lm_head=heads) for n in specs)

    replicas = max(1, total(1) // max(L, 1))
    share = max(1, math.ceil(expected_sessions / replicas))
    if total(share) >= L or total(1) < L:
        return share
    lo, hi = 1, share  # total(lo) >= L > total(hi): largest share that still covers
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) >= L else (lo, mid)
    return lo


def _infos(
    model: ModelSpec, node_map: Mapping[NodeId, NodeSpec], rtt: RttFn, sessions: int, context_tokens: int,
    seed: int,
) -> dict[NodeId, _Info]:
    zones = zones_of(node_map, rtt)
    out: dict[NodeId, _Info] = {}
    for nid in sorted(node_map):
        spec = node_map[nid]

        def cap(first: bool, last: bool, spec: NodeSpec = spec) -> int:
            return layer_capacity(
                model, spec, sessions=sessions, context_tokens=context_tokens, embedding=first, lm_head=last
            )

        info = _Info(
            spec=spec,
            cap=cap(False, False),
            cap_first=cap(True, False),
            cap_last=cap(False, True),
            cap_both=cap(True, True),
            zone=zones[nid],
            tiebreak=zlib.crc32(f"{seed}:{nid}".encode()),
        )
        if info.cap > 0 or info.cap_both > 0:
            out[nid] = info
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
    cands: Sequence[_Info], L: int, zone_rtt: np.ndarray
) -> tuple[list[list[_Info]], list[_Info]]:
    """Greedy bin covering: as many groups as possible whose ordered capacities sum to >= L."""
    pool = sorted(cands, key=lambda g: (-g.cap, g.spec.layer_latency_s, g.tiebreak))
    neg_caps = [-g.cap for g in pool]
    pipelines: list[list[_Info]] = []
    while pool and sum(min(g.cap_both if len(pool) == 1 else g.cap, L) for g in pool) >= L:
        group: list[_Info] = []
        taken: list[int] = []  # indices into pool, removed when the group completes
        remaining = set(range(len(pool)))
        done = False
        while remaining and not done:
            have = sum(_stage_caps(_order_pipeline(group, zone_rtt), L)) if group else 0
            need = L - have
            # Smallest node that completes the group: scan upwards from the first one big enough.
            idx = bisect.bisect_right(neg_caps, -need) - 1
            for j in range(idx, -1, -1):
                if j in remaining and _covers(group + [pool[j]], L, zone_rtt):
                    group.append(pool[j])
                    taken.append(j)
                    done = True
                    break
                if idx - j > 8:
                    break
            if not done:
                largest = min(remaining)
                group.append(pool[largest])
                taken.append(largest)
                remaining.discard(largest)
                if _covers(group, L, zone_rtt):
                    done = True
        if not done:
            break
        keep = sorted(set(range(len(pool))) - set(taken))
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

    lo, hi = 0.0, float(np.max(leg + cap * lat)) + 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if layers_at(mid).sum() < L else (lo, mid)
    exact = layers_at(hi)
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
    rtt_s = rtt(a.node_id, b.node_id) if b is not None else float(zone_rtt[a.zone, a.zone])
    relay = RELAY_EXTRA_LEG_S * (int(a.spec.relayed) + int(b is not None and b.spec.relayed))
    return rtt_s / 2 + transfer_s(model.hidden_bytes_per_token, a.spec.uplink_bps) + relay


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
    sessions: int = 1,
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


def _global_plan(
    model: ModelSpec, infos: Mapping[NodeId, _Info], rtt: RttFn, sessions: int, context_tokens: int
) -> dict[NodeId, LayerRange]:
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
        made, rest = _build_pipelines(by_zone[zone], L, zone_rtt)
        pipelines.extend(made)
        (local_leftovers if made else pooled).extend(rest)
    made, rest = _build_pipelines(pooled, L, zone_rtt)
    pipelines.extend(made)
    leftovers = local_leftovers + rest

    ranges: dict[NodeId, LayerRange] = {}
    for group in pipelines:
        laid, dropped = _layout_pipeline(model, group, rtt, zone_rtt)
        ranges.update(laid)
        leftovers.extend(dropped)

    # Safety net: a range that water-filling's rounding pushed past memory is cut back.
    for node_id in list(ranges):
        fitted = _fit(model, infos[node_id].spec, ranges[node_id], sessions, context_tokens)
        if fitted is None:
            del ranges[node_id]
            leftovers.append(infos[node_id])
        else:
            ranges[node_id] = fitted

    coverage = _Coverage(model, infos)
    for node_id, rng in ranges.items():
        coverage.add(node_id, rng)
    for info in sorted(leftovers, key=lambda g: (-g.cap, g.spec.layer_latency_s, g.tiebreak)):
        rng = coverage.place(info)
        if rng is not None:
            ranges[info.node_id] = rng
    _close_gaps(model, infos, ranges, coverage, sessions, context_tokens)
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


# --- incremental plan ------------------------------------------------------------------------------


def _incremental_plan(
    model: ModelSpec,
    infos: Mapping[NodeId, _Info],
    previous: Assignment,
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
        fitted = _fit(model, info.spec, rng, 1, context_tokens)
        if fitted is not None:  # else it is placed from scratch below, like a joiner
            ranges[node_id] = fitted

    coverage = _Coverage(model, infos)
    for node_id, rng in ranges.items():
        coverage.add(node_id, rng)
    joiners = [infos[n] for n in infos if n not in ranges]
    for info in sorted(joiners, key=lambda g: (-g.cap, g.spec.layer_latency_s, g.tiebreak)):
        rng = coverage.place(info)
        if rng is not None:
            ranges[info.node_id] = rng
    _close_gaps(model, infos, ranges, coverage, 1, context_tokens)  # coverage before KV headroom
    return ranges


def _fit(model: ModelSpec, spec: NodeSpec, rng: LayerRange, sessions: int, context_tokens: int
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
    sessions: int,
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
) -> Assignment:
    """Give every useful node a contiguous layer range (see the module docstring).

    Deterministic given its inputs and `seed` (which only breaks ties between identical nodes).
    With `previous`, changes as few ranges as possible; `replan_threshold=math.inf` never replans.
    Nodes that cannot hold a single layer are left out of the assignment.
    """
    node_map = as_node_map(nodes)
    sessions = kv_sessions_per_node(
        model, node_map, expected_sessions=expected_sessions, context_tokens=context_tokens
    )
    infos = _infos(model, node_map, rtt, sessions, context_tokens, seed)
    if not infos:
        return Assignment({}, previous.epoch + 1 if previous else 0)
    if previous is None:
        return Assignment(_sorted(_global_plan(model, infos, rtt, sessions, context_tokens)), 0)

    kept = _incremental_plan(model, infos, previous, context_tokens)
    chosen = kept
    kept_gaps = len(uncovered_layers(model, kept))
    if kept_gaps or math.isfinite(replan_threshold):
        fresh = _global_plan(model, infos, rtt, sessions, context_tokens)
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
    return Assignment(_sorted(chosen), previous.epoch + 1 if changed else previous.epoch)


def _sorted(ranges: Mapping[NodeId, LayerRange]) -> dict[NodeId, LayerRange]:
    return {k: ranges[k] for k in sorted(ranges)}
