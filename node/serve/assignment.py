"""The swarm-wide layer assignment as a pure function of the DHT records (see docs/allocation.md).

There is no leader: every node reads the same signed records, drops the same bad ones, and runs the same
deterministic planner over them (`plan`), so every node computes the same ranges without talking to the
others. Joining nodes take their range from the plan; online nodes move when the plan moves them.

Inputs are normalised so that the plan depends on nothing local: records are sorted by peer id, measured
latencies are rounded to powers of two (measurement noise must not make nodes disagree or flap), and
sizes are those of the reference dtype (`REFERENCE_DTYPE`), whatever dtype a node computes in: a node
announces its memory scaled to that dtype (`reference_memory`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from node.model.checkpoint import ModelSource, layer_bytes
from node.model.stage import kv_bytes_per_token
from node.net.credit import CheckedCredit
from swarm.allocator import DEFAULT_CONTEXT_TOKENS, allocate
from swarm.costmodel import kv_share_bytes
from swarm.rebalancer import RebalanceState, apply_moves, plan_rebalance, without_new_holes
from swarm.records import MAX_EPOCH, QUANTIZATIONS, RecordError, ServerRecord, node_spec
from swarm.types import Assignment, LayerRange, ModelSpec, NodeSpec

logger = logging.getLogger(__name__)

REFERENCE_DTYPE = torch.bfloat16  # the plan sizes layers and KV at this dtype on every node
PLANNED_STATES = ("joining", "online")  # draining and offline nodes are leaving: they get no range
SAME_REGION_RTT_S = 0.005
OTHER_REGION_RTT_S = 0.1  # nodes do not share pairwise RTTs yet: regions are all every node knows alike
_LOG_EVERY_S = 60.0


def model_spec(source: ModelSource) -> ModelSpec:
    """The model as the planner sees it, identical on every node (reference dtype, not the local one).

    `head_bytes` is the embedding plus the LM head, one vocab x hidden matrix each, of which the planner
    charges half to each end of a chain: the last stage does hold its LM head (node.model.stage), while the first
    reads embedding rows from the mapped file (node.model.checkpoint.EmbeddingRows), so its half is slack.
    `quant_layer_bytes`: a layer held int8 or int4 (its norms at the reference dtype), which the planner
    charges a node whose record announces that quantization."""
    itemsize = torch.empty((), dtype=REFERENCE_DTYPE).element_size()
    return ModelSpec(source.name, source.num_layers, source.hidden_size,
                     layer_bytes=float(layer_bytes(source, REFERENCE_DTYPE)),
                     kv_bytes_per_token_per_layer=float(kv_bytes_per_token(source.config, REFERENCE_DTYPE)),
                     head_bytes=float(2 * source.config.vocab_size * source.hidden_size * itemsize),
                     quant_layer_bytes=tuple((quant, float(layer_bytes(source, REFERENCE_DTYPE, quant)))
                                             for quant in QUANTIZATIONS if quant != "none"))


def reference_memory(memory_bytes: float, local_dtype: torch.dtype, source: ModelSource | None = None,
                     quant: str = "none") -> float:
    """Memory to announce, in the planner's units: what `memory_bytes` of `local_dtype` tensors would be at the
    reference dtype. Quantized weights do not scale with the dtype while the KV cache does, so a quantized
    node scales by the ratio of one layer plus one session's KV (DEFAULT_CONTEXT_TOKENS) as the planner
    charges them to what they take here: exact at that KV share, near it at others."""
    if quant == "none" or source is None:
        local = torch.empty((), dtype=local_dtype).element_size()
        return memory_bytes * torch.empty((), dtype=REFERENCE_DTYPE).element_size() / local

    def per_layer(dtype: torch.dtype) -> int:
        return layer_bytes(source, dtype, quant) + DEFAULT_CONTEXT_TOKENS * kv_bytes_per_token(source.config, dtype)

    return memory_bytes * per_layer(REFERENCE_DTYPE) / per_layer(local_dtype)


def planned_kv_budget(model: ModelSpec, memory_bytes: float, layers: LayerRange, local_dtype: torch.dtype,
                      *, layer_bytes: float = 0.0) -> int:
    """The KV budget a node's server enforces: the KV share the plan gives a node announcing `memory_bytes`
    (at the reference dtype) that serves `layers` (`swarm.costmodel.kv_share_bytes`; `layer_bytes`: its
    quantized layers' planned bytes, 0 for the model's), in `local_dtype` bytes."""
    share = kv_share_bytes(model, memory_bytes, layers, layer_bytes=layer_bytes)
    return int(share * local_dtype.itemsize / REFERENCE_DTYPE.itemsize)


class EpochTracker:
    """The newest epoch seen from each peer: an older record of a peer is stale (a replay, or a DHT replica
    that missed an update) and is not followed. Remembers at most `max_peers` peers (the least recently seen
    are forgotten first), so fresh peer ids cannot grow it without bound."""

    def __init__(self, max_peers: int = 4096) -> None:
        self.newest: dict[str, int] = {}
        self.max_peers = max_peers

    def admit(self, record: ServerRecord) -> bool:
        newest = self.newest.pop(record.peer_id, -1)
        if record.epoch < newest:
            self.newest[record.peer_id] = newest
            return False
        self.newest[record.peer_id] = record.epoch  # re-inserted: the dict's order is the order last seen
        if len(self.newest) > self.max_peers:
            del self.newest[next(iter(self.newest))]
        return True


def check_records(model: ModelSpec, records: Iterable[ServerRecord], tracker: EpochTracker | None = None
                  ) -> list[ServerRecord]:
    """The records the plan may use, sorted by peer id; each one dropped is logged with the reason."""
    kept: dict[str, ServerRecord] = {}
    for record in records:
        reason = _problem(model, record, tracker)
        if reason is not None:
            _log_ignored(record, reason)
            continue
        other = kept.get(record.peer_id)
        if other is None or record.epoch > other.epoch:
            kept[record.peer_id] = record
    return [kept[p] for p in sorted(kept)]


def _problem(model: ModelSpec, record: ServerRecord, tracker: EpochTracker | None) -> str | None:
    if record.model != model.name:
        return f"a record of model {record.model!r}, not {model.name!r}"
    try:
        record.validate(model.num_layers)  # range inside the model, states, plausible numbers
    except RecordError as e:
        return str(e)
    if record.state == "online" and record.memory_bytes > 0:
        needed = (record.end - record.start) * model.layer_bytes_at(record.quant)
        if needed > record.memory_bytes * 1.01:  # the 1% covers rounding in the dtype scaling
            return (f"memory_bytes: claims {record.memory_bytes:.3g} bytes but serves layers "
                    f"{record.start}:{record.end}, whose weights alone need {needed:.3g}")
    if tracker is not None and not tracker.admit(record):
        return f"epoch: stale, {record.epoch} is older than the {tracker.newest[record.peer_id]} seen from it"
    return None


_last_logged: dict[tuple[str, str], float] = {}


def _log_ignored(record: ServerRecord, reason: str) -> None:
    key, now = (record.peer_id, reason), time.monotonic()
    if now - _last_logged.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:  # a hostile peer must not flood the log
        if len(_last_logged) > 1024:
            _last_logged.clear()
        _last_logged[key] = now
        logger.warning("ignoring the record of %s for planning: %s", record.peer_id[:16], reason)


def _round_pow2(value: float) -> float:
    return 2.0 ** round(math.log2(value)) if value > 0 else value


def planning_spec(record: ServerRecord, model: ModelSpec | None = None) -> NodeSpec:
    """The record's capabilities (its layers sized at its quantization, given the `model`), with latencies and
    the measured uplink rounded to a power of two so that noise (a node re-measures its links now and then)
    does not move layers."""
    spec = node_spec(record, model)
    return replace(spec, layer_latency_s=_round_pow2(spec.layer_latency_s),
                   prefill_s_per_token_per_layer=_round_pow2(spec.prefill_s_per_token_per_layer),
                   uplink_bps=_round_pow2(spec.uplink_bps))


@dataclass(frozen=True)
class Plan:
    assignment: Assignment  # the range of every node that gets one, and the plan's epoch
    current: Mapping[str, LayerRange]  # what online nodes serve now

    @property
    def epoch(self) -> int:
        return self.assignment.epoch

    def range_of(self, peer_id: str) -> LayerRange | None:
        return self.assignment.ranges.get(peer_id)


def plan(model: ModelSpec, records: Iterable[ServerRecord], *, improvement_threshold: float = 0.2) -> Plan:
    """Every planned node's range. A pure function of the set of `records` (pass them through
    `check_records` first): the same records in any order give the same plan on every node.

    With no node online yet, the allocator's global plan over all joiners. Otherwise the rebalancer
    over the online ranges, from a fresh state: urgent repairs first (place joiners, close gaps left by
    departures, as the allocator's incremental plan), else at most one improvement that raises the
    bottleneck throughput by more than `improvement_threshold` (the hysteresis that makes it settle).
    Node-local state such as cooldown clocks would make nodes disagree, so none is used.
    """
    planned = sorted((r for r in records if r.state in PLANNED_STATES), key=lambda r: r.peer_id)
    nodes = {r.peer_id: planning_spec(r, model) for r in planned}
    current = {r.peer_id: LayerRange(r.start, r.end) for r in planned if r.state == "online"}
    newest = max((r.epoch for r in planned), default=0)
    regions = {peer: spec.region for peer, spec in nodes.items()}

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        return SAME_REGION_RTT_S if regions.get(a, a) == regions.get(b, b) else OTHER_REGION_RTT_S

    if not nodes:
        return Plan(Assignment({}, newest), {})
    if not current:
        fresh = allocate(model, nodes, rtt)
        return Plan(_bounded_epoch(Assignment(dict(sorted(fresh.ranges.items())), newest + 1)), {})
    previous = Assignment(dict(sorted(current.items())), newest)
    moves, _ = plan_rebalance(model, nodes, previous, rtt, state=RebalanceState(), now_s=0.0, cooldown_s=0.0,
                              check_interval_s=0.0, improvement_threshold=improvement_threshold)
    moves = without_new_holes(moves, current)  # a joiner proves itself by serving before others leave to it
    if not moves:
        return Plan(previous, current)
    return Plan(_bounded_epoch(apply_moves(previous, moves, live=nodes)), current)


def _bounded_epoch(assignment: Assignment) -> Assignment:
    """Epochs stop at MAX_EPOCH (records beyond it are refused): a peer that announced the largest epoch
    can make the swarm's count stand still, not break the records that follow it."""
    return replace(assignment, epoch=min(assignment.epoch, MAX_EPOCH))


# --- the swarm's status (`layerhive status`, the desktop's swarm map) -----------------------------------


@dataclass(frozen=True)
class PeerStatus:
    """One node as its record shows it, and the range the plan gives it."""

    record: ServerRecord
    planned: LayerRange | None  # None: the plan gives it no range (draining, offline, or not needed)

    @property
    def serving(self) -> LayerRange | None:
        """The layers it serves now; None while it joins (a joining record's range is not loaded yet)."""
        return None if self.record.state == "joining" else LayerRange(self.record.start, self.record.end)


@dataclass(frozen=True)
class SwarmStatus:
    """The swarm as its records show it: nodes, online replicas of each layer, the newest epoch, the plan.
    Numbers only: the CLI and the swarm map format them."""

    model: str
    num_layers: int
    epoch: int
    nodes: tuple[PeerStatus, ...]
    replicas_per_layer: tuple[int, ...]  # online nodes serving each layer
    # Tokens each node served that clients' checks vouch for (node.net.credit), by peer id; and the nodes left out
    # of everything above because a published proof shows they lied (node.net.evidence).
    credit: Mapping[str, CheckedCredit] = field(default_factory=dict)
    proven_liars: frozenset[str] = frozenset()

    @property
    def min_replicas(self) -> int:
        return min(self.replicas_per_layer, default=0)

    @property
    def max_replicas(self) -> int:
        return max(self.replicas_per_layer, default=0)

    @property
    def uncovered_layers(self) -> list[int]:
        return [layer for layer, n in enumerate(self.replicas_per_layer) if n == 0]


def swarm_status(model: ModelSpec, records: Iterable[ServerRecord], *,
                 credit: Mapping[str, CheckedCredit] | None = None, liars: frozenset[str] = frozenset()
                 ) -> SwarmStatus:
    """The swarm as its (checked) records show it, with the range the plan gives each node; proven `liars` are
    left out (as every planner leaves them out), and each node's checked `credit` rides along."""
    records = [r for r in check_records(model, records) if r.peer_id not in liars]
    online = [r for r in records if r.state == "online"]
    replicas = tuple(sum(r.start <= layer < r.end for r in online) for layer in range(model.num_layers))
    planned = plan(model, records)
    return SwarmStatus(model=model.name, num_layers=model.num_layers,
                       epoch=max((r.epoch for r in records), default=0),
                       nodes=tuple(PeerStatus(r, planned.range_of(r.peer_id)) for r in records),
                       replicas_per_layer=replicas, credit=dict(credit or {}), proven_liars=frozenset(liars))
