"""Phase 2: the chain of least expected per-token latency for one request.

Public API (stable):

    build_route_index(model, nodes, assignment, rtt) -> RouteIndex
    route(index, request, load=None) -> list[Route]
    RouteRequest(client, *, start_layer=0, end_layer=None, sink=None, exclude=frozenset(), transport="push",
                 alternates=3, session_tokens=0, client_uplink_bps=100e6, prompt_tokens=0, output_tokens=0,
                 ttft_weight=1.0)   # one frozen value per routing question
    LoadTable(node_ids)   # a Mapping[NodeId, NodeLoad] kept as arrays; `route` reads it vectorised

The RouteIndex holds everything static about (model, nodes, assignment, rtt), and remembers the best
unloaded chains it has found: a caller routing many requests over one assignment builds it once and
passes it to every `route` (the simulator's policy, until its assignment changes); this module keeps no
state of its own.

`route` returns the best chain first, then up to `request.alternates` others for failover (node-disjoint
from every earlier one while the swarm allows, otherwise differing in at least one hop), each
costed exactly by `costmodel.chain_token_s`; [] when no chain covers [start_layer, end_layer).
A chain is free-form: any node whose range covers the next layers may serve any sub-range of it.
`client` feeds the chain and `sink` (default: the client) receives its output; with `start_layer`,
`end_layer`, `exclude` and node ids as client/sink, failover re-routes just the layers a dead
stage held. `session_tokens` is the KV the session needs: nodes announcing fewer free KV tokens
cost `NO_KV_PENALTY_S` more (a last resort, not a hard refusal).

How (a DP over layer boundaries, state = the last node of the chain):
  * M[v] = min over boundaries b where v may take over of (cost of the best chain reaching b, plus
    the leg into v) - b * c_v, with c_v v's loaded per-layer time. Then v handing over at b' costs
    M[v] + b' * c_v: a prefix minimum, so every sub-range of v's range is considered in O(1).
  * Hand-overs happen only at boundaries where some range starts or ends. This is exact when RTTs
    obey the triangle inequality: in any chain, shift a hand-over that is not at such a boundary
    towards the cheaper neighbour (cost is linear in it) until it reaches one, or until a hop
    empties, and dropping an empty hop never costs more.
  * Node-to-node legs are costed as a region-to-region RTT (one probe per region pair) plus a
    per-node last-mile term (one probe per node), which makes the predecessor search a per-region
    minimum: exact whenever RTT = regional core + per-node last mile (cloud regions, home links);
    otherwise approximate, and the chosen chains are re-costed with the real RTTs. Client legs
    always use the real RTT of every node.
  * Loads are read lazily: unloaded costs are lower bounds, so a chain whose own loads leave its
    cost unchanged is optimal without reading the other nodes' records (see `_Request`). The best
    *unloaded* chain of each (client, sink, span, exclusions) is remembered in the index, so a request
    whose best unloaded chain is still unloaded costs no DP at all. A `LoadTable` is read whole in a
    few numpy operations (no per-node lookups), and then one DP is exact.
  * numpy over the nodes active at each boundary, with everything static cached in a RouteIndex
    (built once per assignment, see `build_route_index`): under 1 ms per DP on 1,000 nodes x 80
    layers; alternates cost one DP each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from swarm.costmodel import (
    DEFAULT_CLIENT_UPLINK_BPS,
    RELAY_EXTRA_LEG_S,
    TOKEN_ID_BYTES,
    chain_prefill_s,
    chain_token_s,
    kv_penalty_s,
    kv_shortage_s,
    loaded_layer_s,
    loaded_step_s,
    region_rtt_matrix,
    transfer_s,
)
from swarm.types import Assignment, Hop, ModelSpec, NodeId, NodeLoad, NodeSpec, Route, RttFn

__all__ = ["LoadTable", "RouteIndex", "RouteRequest", "build_route_index", "route"]

TRANSPORTS = ("push", "relay")

_INF = float("inf")
_REVEAL_ROUNDS = 3  # DP runs on partially read loads before reading them all
_LOAD_SAMPLE = 16  # loads read up front to judge whether load is widespread
_UNLOADED_CACHE_SIZE = 4096  # remembered best unloaded chains per index
_MISSING = object()


@dataclass(frozen=True)
class RouteRequest:
    """One routing question, as one value (hashable: policies memoise routes on it).

    client, sink        who feeds the chain and who receives its output (sink None: the client); node ids
                        when failover re-routes the layers of a dead stage between its neighbours
    start_layer, end_layer  the span [start_layer, end_layer) to carry (end_layer None: the model's last layer)
    exclude             nodes the chain may not use
    transport           "push" (stage to stage) or "relay" (the client relays every hop)
    alternates          how many other chains to return after the best, for failover
    session_tokens      KV tokens the session needs on every node it uses
    client_uplink_bps   the client's uplink, for the legs it sends
    prompt_tokens, output_tokens, ttft_weight  the prompt-aware objective (see `route`; off without them)
    """

    client: str
    start_layer: int = 0
    end_layer: int | None = None
    sink: str | None = None
    exclude: frozenset[NodeId] = frozenset()
    transport: str = "push"
    alternates: int = 3
    session_tokens: int = 0
    client_uplink_bps: float = DEFAULT_CLIENT_UPLINK_BPS
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r} (expected 'push' or 'relay')")

    def span(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers to carry, in a model of `num_layers` layers."""
        return self.start_layer, num_layers if self.end_layer is None else self.end_layer

    @property
    def destination(self) -> str:
        """Who receives the chain's output: the sink, else the client."""
        return self.client if self.sink is None else self.sink


class LoadTable(Mapping):
    """Node loads kept as arrays: a `Mapping[NodeId, NodeLoad]` that `route` reads vectorised.

    For callers that track loads themselves (the simulator; a client caching DHT records): create it
    over every node id that may ever carry a load, then `set` or `clear` rows as records change. Rows
    never set read as absent (no record: unloaded). Any other code may use it as a plain Mapping.
    """

    def __init__(self, node_ids: Iterable[NodeId]) -> None:
        self.position: dict[NodeId, int] = {}
        for node_id in node_ids:
            self.position.setdefault(node_id, len(self.position))
        self.ids = list(self.position)
        n = len(self.ids)
        self.queue_len = np.zeros(n, dtype=np.int64)
        self.active_sessions = np.zeros(n, dtype=np.int64)
        self.free_kv_tokens = np.full(n, 1 << 30, dtype=np.int64)
        self.present = np.zeros(n, dtype=bool)
        self._count = 0

    def set(self, node_id: NodeId, *, queue_len: int = 0, active_sessions: int = 0,
            free_kv_tokens: int = 1 << 30) -> None:
        i = self.position[node_id]
        if not self.present[i]:
            self.present[i] = True
            self._count += 1
        self.queue_len[i] = queue_len
        self.active_sessions[i] = active_sessions
        self.free_kv_tokens[i] = free_kv_tokens

    def clear(self, node_id: NodeId) -> None:
        i = self.position[node_id]
        if self.present[i]:
            self.present[i] = False
            self._count -= 1

    def get(self, node_id: object, default: NodeLoad | None = None) -> NodeLoad | None:
        i = self.position.get(node_id)  # type: ignore[arg-type]
        if i is None or not self.present[i]:
            return default
        return NodeLoad(int(self.queue_len[i]), int(self.active_sessions[i]), int(self.free_kv_tokens[i]))

    def __getitem__(self, node_id: NodeId) -> NodeLoad:
        value = self.get(node_id)
        if value is None:
            raise KeyError(node_id)
        return value

    def __contains__(self, node_id: object) -> bool:
        i = self.position.get(node_id)  # type: ignore[arg-type]
        return i is not None and bool(self.present[i])

    def __iter__(self):
        return (n for n, i in self.position.items() if self.present[i])

    def __len__(self) -> int:
        return self._count


@dataclass
class RouteIndex:
    """Everything about (model, nodes, assignment, rtt) that does not change between requests."""

    model: ModelSpec
    nodes: dict[NodeId, NodeSpec]
    ids: list[NodeId]  # assigned nodes, sorted by (region, id): regions are contiguous runs
    position: dict[NodeId, int]
    region: np.ndarray  # region index of each node
    rtt_half: np.ndarray  # region x region RTT / 2
    start: np.ndarray
    end: np.ndarray
    latency: np.ndarray
    prefill: np.ndarray
    hidden_out: np.ndarray  # serialisation of one hidden state on the node's uplink
    relay_extra: np.ndarray  # RELAY_EXTRA_LEG_S for relayed nodes
    offset_half: np.ndarray  # half the node's RTT excess over its region's first node (last mile)
    uplink_bps: np.ndarray
    covering: list[np.ndarray]  # covering[l]: nodes holding layer l (sorted like ids)
    group_offsets: list[np.ndarray]  # per layer: where each region's run starts in covering[l]
    group_region: list[np.ndarray]  # per layer: the region of each run
    events: np.ndarray  # boundaries where some range starts or ends
    rtt: RttFn
    # The DP's per-boundary gathers, precomputed for every event boundary e > 0 and concatenated so that
    # a request gathers its costs in a few numpy calls instead of a few per boundary.
    leave_all: np.ndarray  # covering[e - 1] for each event e, concatenated
    leave_at: np.ndarray  # the boundary e of each element of leave_all
    leave_slices: list[slice]
    enter_all: np.ndarray  # covering[e] (empty for e = L), concatenated
    enter_at: np.ndarray
    enter_slices: list[slice]
    enter_region: np.ndarray  # region of each element of enter_all
    via_rows: list[np.ndarray]  # rtt_half rows of the region runs of covering[e - 1]
    region_range: np.ndarray  # arange(number of regions)
    _client_rtt: dict[str, np.ndarray] = field(default_factory=dict)
    # Best chain under no load per (client, sink, transport, span, client uplink, exclusions).
    unloaded_best: dict[tuple, tuple[Hop, ...] | None] = field(default_factory=dict)
    _table_positions: tuple[object, np.ndarray] | None = None

    def table_positions(self, table: LoadTable) -> np.ndarray:
        """Row of each indexed node in `table` (-1: not in it), cached per table."""
        cached = self._table_positions
        if cached is None or cached[0] is not table.position:
            rows = np.array([table.position.get(n, -1) for n in self.ids], dtype=np.int64)
            self._table_positions = cached = (table.position, rows)
        return cached[1]

    def rtt_to(self, endpoint: str) -> np.ndarray:
        """Real RTT from `endpoint` to every node, cached (RTTs are taken as fixed per index)."""
        cached = self._client_rtt.get(endpoint)
        if cached is None:
            cached = np.array([self.rtt(endpoint, n) for n in self.ids], dtype=float)
            if len(self._client_rtt) > 256:
                self._client_rtt.clear()
            self._client_rtt[endpoint] = cached
        return cached


def build_route_index(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    assignment: Assignment,
    rtt: RttFn,
) -> RouteIndex:
    """Precompute the static part of routing: O(nodes x layers) numpy, O(regions^2) RTT probes."""
    node_map = dict(nodes) if isinstance(nodes, Mapping) else {n.node_id: n for n in nodes}
    L = model.num_layers
    live = [n for n, r in assignment.ranges.items() if n in node_map and r.end <= L]
    regions, matrix = region_rtt_matrix([node_map[n] for n in live], rtt)
    region_index = {r: i for i, r in enumerate(regions)}
    ids = sorted(live, key=lambda n: (region_index[node_map[n].region], n))
    specs = [node_map[n] for n in ids]
    ranges = [assignment.ranges[n] for n in ids]
    region = np.array([region_index[s.region] for s in specs], dtype=np.int64)
    start = np.array([r.start for r in ranges], dtype=np.int64)
    end = np.array([r.end for r in ranges], dtype=np.int64)
    uplink = np.array([s.uplink_bps for s in specs], dtype=float)
    rtt_half = matrix / 2 if len(regions) else np.zeros((1, 1))
    offset = _rtt_offsets(ids, region, rtt)
    for r in range(len(regions)):  # the diagonal was probed between the first two nodes of the region
        members = np.flatnonzero(region == r)
        if len(members) > 1:
            rtt_half[r, r] -= offset[members[1]] / 2
    covering, offsets, group_region = [], [], []
    for layer in range(L):
        members = np.flatnonzero((start <= layer) & (layer < end))
        covering.append(members)
        if len(members):
            regs = region[members]
            run_starts = np.flatnonzero(np.concatenate([[True], regs[1:] != regs[:-1]]))
            offsets.append(run_starts)
            group_region.append(regs[run_starts])
        else:
            offsets.append(np.zeros(0, dtype=np.int64))
            group_region.append(np.zeros(0, dtype=np.int64))
    events = np.unique(np.concatenate([start, end, [0, L]])) if ids else np.array([0, L])
    return RouteIndex(
        model=model,
        nodes=node_map,
        ids=ids,
        position={n: i for i, n in enumerate(ids)},
        region=region,
        rtt_half=rtt_half,
        start=start,
        end=end,
        latency=np.array([s.layer_latency_s for s in specs], dtype=float),
        prefill=np.array([s.prefill_s_per_token_per_layer for s in specs], dtype=float),
        hidden_out=transfer_s(model.hidden_bytes_per_token, uplink),
        relay_extra=np.array([RELAY_EXTRA_LEG_S if s.relayed else 0.0 for s in specs]),
        offset_half=offset / 2,
        uplink_bps=uplink,
        covering=covering,
        group_offsets=offsets,
        group_region=group_region,
        events=events,
        rtt=rtt,
        region_range=np.arange(rtt_half.shape[0]),
        **_event_gathers(events[1:].tolist(), covering, group_region, region, rtt_half, L),
    )


def _rtt_offsets(ids: list[NodeId], region: np.ndarray, rtt: RttFn) -> np.ndarray:
    """Each node's RTT excess over the first node of its region, probed against one reference node.

    If rtt(u, v) = core(region u, region v) + a_u + a_v (a per-node last mile), then with
    d_u = a_u - a_first(region u): rtt(u, v) = rtt(first_u, first_v) + d_u + d_v, so node-to-node legs
    stay a region matrix plus per-node terms, which the DP absorbs exactly. Costs one probe per node.
    """
    offset = np.zeros(len(ids))
    regions = sorted(set(region.tolist()))
    firsts = {r: int(np.flatnonzero(region == r)[0]) for r in regions}
    for r in regions:
        members = np.flatnonzero(region == r).tolist()
        first = members[0]
        others = [firsts[s] for s in regions if s != r]
        if others:  # a reference outside the region: every member can be compared through it
            ref = others[0]
            base = rtt(ids[first], ids[ref])
            for u in members[1:]:
                offset[u] = rtt(ids[u], ids[ref]) - base
        elif len(members) >= 3:  # one region only: references inside it
            ref, alt = members[1], members[2]
            base = rtt(ids[first], ids[ref])
            for u in members[2:]:
                offset[u] = rtt(ids[u], ids[ref]) - base
            offset[ref] = rtt(ids[ref], ids[alt]) - rtt(ids[first], ids[alt])
    return offset


def _event_gathers(events: list[int], covering: list[np.ndarray], group_region: list[np.ndarray],
                   region: np.ndarray, rtt_half: np.ndarray, L: int) -> dict:
    empty = np.zeros(0, dtype=np.int64)
    leaving = [covering[e - 1] for e in events]
    entering = [covering[e] if e < L else empty for e in events]

    def slices(parts: list[np.ndarray]) -> list[slice]:
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist()
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]

    enter_all = np.concatenate(entering) if entering else empty
    return {
        "leave_all": np.concatenate(leaving) if leaving else empty,
        "leave_at": np.repeat(np.array(events, dtype=float), [len(p) for p in leaving]),
        "leave_slices": slices(leaving),
        "enter_all": enter_all,
        "enter_at": np.repeat(np.array(events, dtype=float), [len(p) for p in entering]),
        "enter_slices": slices(entering),
        "enter_region": region[enter_all],
        "via_rows": [rtt_half[group_region[e - 1]] for e in events],
    }


class _Request:
    """Per-request costs over the index's nodes, reading node loads only where they matter.

    A node's load can only make it slower (a bigger batch, a queue, a KV penalty), so its unloaded
    figures are a lower bound. The DP first runs on lower bounds for every node whose load has not
    been read; if the best chain's own loads leave its cost unchanged, it is optimal (every other
    chain costs at least its lower bound). Otherwise those loads are read and the DP runs again.
    This keeps a request from reading 1,000 load records when a handful decide it.
    """

    def __init__(self, index: RouteIndex, load: Mapping[NodeId, NodeLoad] | None, session_tokens: int,
                 enter_first: np.ndarray, enter_next: np.ndarray, leave_next: np.ndarray,
                 leave_last: np.ndarray, push: bool, prefill_layer: np.ndarray | None = None,
                 rtt_scale: float = 1.0) -> None:
        self.index = index
        self.load = load
        self.session_tokens = session_tokens
        self.per_layer = index.latency.copy()  # loaded per-layer time (a lower bound until read)
        self.penalty = np.zeros(len(index.ids))  # KV penalty of entering the node
        self.known = np.zeros(len(index.ids), dtype=bool) if load else np.ones(len(index.ids), dtype=bool)
        self.enter_first = enter_first  # cost of entering a node at start_layer from the client
        self.enter_next = enter_next  # node-specific part of entering a node after another one
        self.leave_next = leave_next  # node-specific part of handing over to another node
        self.leave_last = leave_last  # cost of delivering end_layer's output to the sink
        self.prefill_layer = prefill_layer  # amortised prefill per layer (static), or None
        self.rtt_scale = rtt_scale  # node-to-node RTT halves count this often (1 + prefill weight)
        self.push = push

    def reveal(self, positions: Iterable[int]) -> int:
        """Read the loads of these nodes; how many of them it made costlier."""
        changed = 0
        for i in positions:
            if self.known[i]:
                continue
            self.known[i] = True
            node_id = self.index.ids[i]
            node_load = self.load.get(node_id) if self.load is not None else None
            if node_load is None:
                continue
            per_layer = loaded_layer_s(self.index.nodes[node_id], node_load)
            penalty = kv_penalty_s(node_load, self.session_tokens)
            if per_layer != self.per_layer[i] or penalty:
                self.per_layer[i], self.penalty[i] = per_layer, penalty
                changed += 1
        return changed

    def read_table(self, table: LoadTable) -> None:
        """Read every load of a LoadTable at once."""
        rows = self.index.table_positions(table)
        at = np.flatnonzero(rows >= 0)
        at = at[table.present[rows[at]]]
        self.known[:] = True
        if not len(at):
            return
        r = rows[at]
        self._set_loads(at, table.active_sessions[r], table.queue_len[r], table.free_kv_tokens[r])

    def at_lower_bound(self, positions: list[int]) -> bool:
        """Read these nodes' loads; True if none of them costs more than unloaded."""
        self.reveal(positions)
        return all(self.per_layer[i] == self.index.latency[i] and not self.penalty[i] for i in positions)

    def reveal_all(self) -> None:
        """Read every remaining load at once."""
        unread = np.flatnonzero(~self.known)
        self.known[unread] = True
        if self.load is None or not len(unread):
            return
        ids = self.index.ids
        loads = [(i, self.load.get(ids[i])) for i in unread.tolist()]
        loads = [(i, x) for i, x in loads if x is not None]
        if not loads:
            return
        self._set_loads(np.array([i for i, _ in loads]), np.array([x.active_sessions for _, x in loads], dtype=float),
                        np.array([x.queue_len for _, x in loads], dtype=float),
                        np.array([x.free_kv_tokens for _, x in loads], dtype=float))

    def _set_loads(self, at: np.ndarray, active: np.ndarray, queue: np.ndarray, free_kv: np.ndarray) -> None:
        """The loaded costs of the nodes at positions `at` (costmodel's formulas, on arrays)."""
        self.per_layer[at] = loaded_step_s(self.index.latency[at], self.index.prefill[at], active, queue)
        self.penalty[at] = kv_shortage_s(free_kv, self.session_tokens)


def _endpoint_props(index: RouteIndex, endpoint: str, client_uplink_bps: float) -> tuple[float, float]:
    node = index.nodes.get(endpoint)
    if node is None:
        return client_uplink_bps, 0.0
    return node.uplink_bps, RELAY_EXTRA_LEG_S if node.relayed else 0.0


def _request(index: RouteIndex, request: RouteRequest, load: Mapping[NodeId, NodeLoad] | None,
             end_layer: int) -> _Request:
    """Per-node cost terms of one request; with a prompt, its prefill is amortised over the output.

    The objective is per-token decode time + w x prefill time with w = ttft_weight / output_tokens (0
    without a prompt): every leg's RTT / 2 and relay detours count 1 + w times, the prompt's serialisation w times,
    and every layer adds w x max(decode latency, prompt x prefill time per token), as in costmodel.
    """
    model = index.model
    hidden = model.hidden_bytes_per_token
    prompt_tokens, output_tokens = request.prompt_tokens, request.output_tokens
    w = request.ttft_weight / output_tokens if prompt_tokens > 0 and output_tokens > 0 else 0.0
    f = 1.0 + w
    in_bytes = TOKEN_ID_BYTES if request.start_layer == 0 and model.head_bytes > 0 else hidden
    out_bytes = TOKEN_ID_BYTES if end_layer == model.num_layers and model.head_bytes > 0 else hidden
    last_prefill = out_bytes * (1 if end_layer == model.num_layers else prompt_tokens)
    client, sink = request.client, request.destination
    client_up, client_relay = _endpoint_props(index, client, request.client_uplink_bps)
    _, sink_relay = _endpoint_props(index, sink, request.client_uplink_bps)
    rtt_in = index.rtt_to(client)
    rtt_out = rtt_in if sink == client else index.rtt_to(sink)
    into = f * (rtt_in / 2 + client_relay + index.relay_extra)
    out_of = f * (rtt_out / 2 + index.relay_extra + sink_relay)
    front = into + transfer_s(in_bytes + w * prompt_tokens * in_bytes, client_up)
    front_hidden = into + transfer_s(hidden + w * prompt_tokens * hidden, client_up)
    back_last = out_of + transfer_s(out_bytes + w * last_prefill, index.uplink_bps)
    back_hidden = out_of + index.hidden_out * (1 + w * prompt_tokens)
    prefill_layer = None
    if w:
        prefill_layer = w * np.maximum(index.latency, prompt_tokens * index.prefill)
    session_tokens = request.session_tokens
    if request.transport == "push":
        between = f * (index.relay_extra + index.offset_half)
        return _Request(index, load, session_tokens, front, between,
                        index.hidden_out * (1 + w * prompt_tokens) + between, back_last, True, prefill_layer, f)
    return _Request(index, load, session_tokens, front, front_hidden, back_hidden, back_last, False,
                    prefill_layer, f)


def _best_chain(
    index: RouteIndex, req: _Request, banned: list[int], start_layer: int, end_layer: int
) -> tuple[Hop, ...] | None:
    """The DP of the module docstring; None if no chain covers [start_layer, end_layer)."""
    c = req.per_layer if req.prefill_layer is None else req.per_layer + req.prefill_layer
    enter_first = req.enter_first + req.penalty
    enter_next = req.enter_next + req.penalty
    if banned:  # cannot be entered (an infinite per-layer time would give inf * 0 = nan)
        enter_first[banned] = _INF
        enter_next[banned] = _INF
    taken = np.full(len(index.ids), _INF)  # M[v]
    record = np.full(len(index.ids), -1, dtype=np.int64)  # how v was entered: -1 = from the client
    first = index.covering[start_layer]
    if not len(first):
        return None
    taken[first] = enter_first[first] - start_layer * c[first]
    # Hand-over boundaries: the events inside (start_layer, end_layer), then end_layer itself.
    events = index.events[1:]
    k0 = int(np.searchsorted(events, start_layer, side="right"))
    k1 = int(np.searchsorted(events, end_layer, side="left"))
    # Every event's gathers at once: handing over at e costs taken[u] + e * c_u + leave_next[u];
    # entering v at e costs what arrives + enter_next[v] - e * c_v.
    leave_add = req.leave_next[index.leave_all] + index.leave_at * c[index.leave_all]
    enter_add = enter_next[index.enter_all] - index.enter_at * c[index.enter_all]
    base = len(index.ids) + index.rtt_half.shape[0]  # record code = step * base + choice
    history: list[tuple] = []  # per boundary: (b, leaving, offered, their records, region runs or None)
    leave_all, enter_all, leave_slices, enter_slices = (index.leave_all, index.enter_all, index.leave_slices,
                                                        index.enter_slices)
    push, scale = req.push, req.rtt_scale
    for k in range(k0, k1):
        b = int(events[k])
        ls, es = leave_slices[k], enter_slices[k]
        leaving = leave_all[ls]
        entering = enter_all[es]
        if not len(leaving) or not len(entering):
            return None  # layer b - 1 or b is uncovered
        offered = taken[leaving] + leave_add[ls]
        step = len(history)
        if push:
            # The leg u -> v depends on u only through its region: keep the best u of each region.
            offsets = index.group_offsets[b - 1]
            rows = index.via_rows[k] if scale == 1.0 else index.via_rows[k] * scale
            via = np.minimum.reduceat(offered, offsets)[:, None] + rows
            arg = via.argmin(axis=0)
            target = index.enter_region[es]
            candidate = via[arg, index.region_range][target] + enter_add[es]
        else:
            # Relayed legs go through the client: the predecessor does not matter, only its cost.
            offsets = None
            best = int(np.argmin(offered))
            candidate = offered[best] + enter_add[es]
        history.append((b, leaving, offered, record[leaving], offsets))
        better = candidate < taken[entering]
        if better.any():
            winners = entering[better]
            taken[winners] = candidate[better]
            # The predecessor run each target region arrives from (push), or the best overall (relay).
            record[winners] = step * base + (arg[target[better]] if push else best)
    leaving = index.covering[end_layer - 1]
    total = taken[leaving] + end_layer * c[leaving] + req.leave_last[leaving]
    if not len(total):
        return None
    k = int(np.argmin(total))
    if not np.isfinite(total[k]):
        return None
    return _unwind(index, history, start_layer, int(leaving[k]), int(record[leaving[k]]), end_layer, base)


def _unwind(
    index: RouteIndex,
    history: list[tuple],
    start_layer: int,
    last: int,
    last_record: int,
    end_layer: int,
    base: int,
) -> tuple[Hop, ...]:
    """Follow the entry records back from the last hop to the client."""
    hops: list[Hop] = []
    node, code, hop_end = last, last_record, end_layer
    while code >= 0:
        step, choice = divmod(code, base)
        boundary, leaving, offered, records, offsets = history[step]
        hops.append(Hop(index.ids[node], boundary, hop_end))
        if offsets is None:
            k = choice
        else:
            lo = int(offsets[choice])
            hi = int(offsets[choice + 1]) if choice + 1 < len(offsets) else len(leaving)
            k = lo + int(np.argmin(offered[lo:hi]))
        node, code, hop_end = int(leaving[k]), int(records[k]), boundary
    hops.append(Hop(index.ids[node], start_layer, hop_end))
    merged: list[Hop] = []
    for hop in reversed(hops):  # RTTs off the model could make a node hand over to itself: join them
        if merged and merged[-1].node_id == hop.node_id:
            hop = Hop(hop.node_id, merged.pop().start, hop.end)
        merged.append(hop)
    return tuple(merged)


def route(index: RouteIndex, request: RouteRequest, load: Mapping[NodeId, NodeLoad] | None = None) -> list[Route]:
    """Best chain first, then up to `request.alternates` differing ones; [] when no chain exists.

    `index` is `build_route_index` of the swarm to route over. With `prompt_tokens` and `output_tokens`,
    chains are ranked by the time of the whole answer per output token: decode per token + ttft_weight x
    prefill / output_tokens (so a chain whose slow uplink would take seconds to carry the prompt is avoided;
    ttft_weight > 1 counts a second of waiting for the first token as worse than a second of decoding);
    `Route.expected_token_s` stays the per-token decode time and `details["prefill_s"]` holds the prefill time.
    """
    model = index.model
    start_layer, end_layer = request.span(model.num_layers)
    if not 0 <= start_layer < end_layer <= model.num_layers:
        raise ValueError(f"invalid layer span [{start_layer}, {end_layer}) for {model.num_layers} layers")
    if not index.ids:
        return []

    req = _request(index, request, load, end_layer)
    if isinstance(load, LoadTable):
        req.read_table(load)
    elif load:
        # A small, evenly spread sample tells whether load is everywhere (then read it all at once)
        # or concentrated on a few busy nodes (then read lazily, see _Request).
        sample = np.unique(np.linspace(0, len(index.ids) - 1, min(_LOAD_SAMPLE, len(index.ids))).astype(int))
        if 3 * req.reveal(sample.tolist()) >= len(sample):
            req.reveal_all()
    unloaded_req: list[_Request] = []

    def unloaded_best(excluded: frozenset[NodeId], banned: list[int]) -> tuple[Hop, ...] | None:
        """The best chain with every node unloaded: a lower bound on every chain, remembered per index."""
        key = (request.client, request.destination, request.transport, start_layer, end_layer,
               request.client_uplink_bps, request.prompt_tokens, request.output_tokens, request.ttft_weight, excluded)
        chain = index.unloaded_best.get(key, _MISSING)
        if chain is _MISSING:
            if not unloaded_req:
                unloaded_req.append(_request(index, request, None, end_layer))
            chain = _best_chain(index, unloaded_req[0], banned, start_layer, end_layer)
            if len(index.unloaded_best) >= _UNLOADED_CACHE_SIZE:
                index.unloaded_best.clear()
            index.unloaded_best[key] = chain
        return chain  # type: ignore[return-value]

    def solve(excluded: frozenset[NodeId]) -> tuple[Hop, ...] | None:
        banned = [index.position[n] for n in excluded if n in index.position]
        chain = unloaded_best(excluded, banned)
        if chain is None:
            return None  # not even the lower bounds make a chain
        if not load or req.at_lower_bound([index.position[h.node_id] for h in chain]):
            return chain  # it costs its lower bound, which no other chain beats
        for _ in range(_REVEAL_ROUNDS):
            chain = _best_chain(index, req, banned, start_layer, end_layer)
            if chain is None:
                return None
            changed = req.reveal(index.position[h.node_id] for h in chain)
            if not changed:
                return chain  # its real cost is its lower bound, which no other chain beats
        req.reveal_all()  # heavily loaded: read everything once and solve exactly
        return _best_chain(index, req, banned, start_layer, end_layer)

    exclude = frozenset(request.exclude)
    best = solve(exclude)
    if best is None:
        return []
    chains = [best]
    used = {h.node_id for h in best}
    # Node-disjoint alternates while the swarm has them...
    while len(chains) <= request.alternates:
        alt = solve(exclude | used)
        if alt is None:
            break
        chains.append(alt)
        used |= {h.node_id for h in alt}
    # ...then chains that avoid one node of the best chain (its longest stages first).
    for hop in sorted(best, key=lambda h: (h.start - h.end, h.start)):
        if len(chains) > request.alternates:
            break
        alt = solve(exclude | {hop.node_id})
        if alt is not None and alt not in chains:
            chains.append(alt)

    routes = [_costed(index, hops, request, load) for hops in chains]
    # Stable: the DP's best stays first on ties; real per-node RTTs may reorder the rest.
    return sorted(routes, key=lambda r: r.details["objective_s"])


def _costed(index: RouteIndex, hops: tuple[Hop, ...], request: RouteRequest,
            load: Mapping[NodeId, NodeLoad] | None) -> Route:
    endpoints = dict(client=request.client, sink=request.destination, transport=request.transport,
                     client_uplink_bps=request.client_uplink_bps)
    total = chain_token_s(index.model, hops, index.nodes, index.rtt, load=load,
                          session_tokens=request.session_tokens, **endpoints)
    prefill = 0.0
    if request.prompt_tokens > 0 and request.output_tokens > 0:
        prefill = chain_prefill_s(index.model, hops, index.nodes, index.rtt, prompt_tokens=request.prompt_tokens,
                                  **endpoints)
    load = load or {}
    compute = sum((h.end - h.start) * loaded_layer_s(index.nodes[h.node_id], load.get(h.node_id)) for h in hops)
    penalty = sum(kv_penalty_s(load.get(h.node_id), request.session_tokens) for h in hops)
    objective = total + (request.ttft_weight * prefill / request.output_tokens if prefill else 0.0)
    return Route(hops=hops, expected_token_s=total,
                 details={"compute_s": compute, "network_s": total - compute - penalty, "kv_penalty_s": penalty,
                          "hops": float(len(hops)), "prefill_s": prefill, "objective_s": objective})
