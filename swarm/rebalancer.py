"""Phase 3: when layers should move, and the fewest moves that get there.

Public API (stable):

    Move(node_id, old: LayerRange | None, new: LayerRange)
    RebalanceState(last_moved_s={}, last_check_s=-inf)
    plan_rebalance(model, nodes, assignment, rtt, *, load=None, state, now_s, expected_sessions=16,
                   context_tokens=2048, improvement_threshold=0.2, cooldown_s=300.0, check_interval_s=60.0,
                   seed=0, clients=()) -> tuple[list[Move], RebalanceState]
    apply_moves(assignment, moves, *, live=None) -> Assignment

Call `plan_rebalance` whenever something happens (a join, a leave) and periodically; apply the moves
it returns (e.g. with `apply_moves`) and pass the returned state to the next call. Departed nodes
simply vanish from the assignment (no Move); a joiner's first range is a Move with `old=None`.

Rules, in order:
  1. Urgent, every call, regardless of cooldowns: place joiners, close coverage gaps, shrink ranges
     that no longer fit in memory. This is the allocator's incremental plan (one or two ranges change
     per join or leave), never a global replan.
  2. Improvement, at most every `check_interval_s` and only on a call with nothing urgent: a move
     happens only if it raises the swarm's bottleneck (the min-layer throughput, queues counted when
     `load` is given) by more than `improvement_threshold` (hysteresis), and never moves a node that
     moved less than `cooldown_s` ago. The best single move is preferred; otherwise the global plan
     is applied to the nodes not cooling down, then every move that is not needed to clear the
     threshold is reverted (the fewest moves).
Why it settles: once churn stops, rule 1 has nothing left to do after one call, and every accepted
rule-2 plan multiplies the bottleneck throughput, which is bounded, by at least 1 + threshold; so only
finitely many plans are accepted, and then no call returns a move. With `load`, queues feed back
into the measure (moving replicas empties the queues that justified the move); the threshold and the
cooldowns damp that loop, but the bound above no longer strictly holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from swarm.allocator import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_EXPECTED_SESSIONS,
    allocate,
    as_node_map,
    kv_sessions_per_node,
    node_windows,
)
from swarm.costmodel import node_rate_tokens_per_s
from swarm.types import Assignment, LayerRange, ModelSpec, NodeId, NodeLoad, NodeSpec, RttFn

__all__ = ["Move", "RebalanceState", "apply_moves", "plan_rebalance"]


@dataclass(frozen=True)
class Move:
    """Node `node_id` should serve `new` instead of `old` (None: it serves nothing yet)."""

    node_id: NodeId
    old: LayerRange | None
    new: LayerRange


@dataclass(frozen=True)
class RebalanceState:
    """What the rebalancer remembers between calls (treat as opaque; start with RebalanceState())."""

    last_moved_s: Mapping[NodeId, float] = field(default_factory=dict)
    last_check_s: float = float("-inf")


def apply_moves(
    assignment: Assignment, moves: Sequence[Move], *, live: Iterable[NodeId] | None = None
) -> Assignment:
    """The assignment after `moves`, without departed nodes if `live` is given; the epoch advances."""
    ranges = dict(assignment.ranges)
    if live is not None:
        alive = set(live)
        ranges = {n: r for n, r in ranges.items() if n in alive}
    for move in moves:
        ranges[move.node_id] = move.new
    return Assignment({n: ranges[n] for n in sorted(ranges)}, assignment.epoch + 1)


def without_new_holes(moves: Sequence[Move], serving: Mapping[NodeId, LayerRange]) -> list[Move]:
    """The `moves` that leave no layer served now without a server: a node keeps a layer it serves until the
    nodes that take it over serve it themselves. Placing a node that does not serve yet (its `old` is None)
    always passes and covers nothing, so a joiner that never serves, or lies about its memory or speed to be
    planned wide, cannot pull the honest copies off their layers. `serving`: every serving node's range now."""
    ranges = dict(serving)
    kept: list[Move] = []
    for move in moves:
        if move.node_id in ranges:
            after = {**ranges, move.node_id: move.new}
            if _covered(ranges.values()) - _covered(after.values()):
                continue  # it waits: the next plan, once the takers serve, moves it
            ranges = after
        kept.append(move)
    return kept


def _covered(ranges: Iterable[LayerRange]) -> set[int]:
    return {layer for r in ranges for layer in range(r.start, r.end)}


def plan_rebalance(
    model: ModelSpec,
    nodes: Mapping[NodeId, NodeSpec] | Iterable[NodeSpec],
    assignment: Assignment,
    rtt: RttFn,
    *,
    load: Mapping[NodeId, NodeLoad] | None = None,
    state: RebalanceState,
    now_s: float,
    expected_sessions: int = DEFAULT_EXPECTED_SESSIONS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    improvement_threshold: float = 0.2,
    cooldown_s: float = 300.0,
    check_interval_s: float = 60.0,
    seed: int = 0,
    clients: Sequence[tuple[str, float]] = (),
) -> tuple[list[Move], RebalanceState]:
    """Moves to apply now and the state for the next call (see the module docstring)."""
    node_map = as_node_map(nodes)
    current = {n: r for n, r in assignment.ranges.items() if n in node_map and r.end <= model.num_layers}
    last_moved = {n: t for n, t in state.last_moved_s.items() if n in node_map and now_s - t < cooldown_s}

    # 1. Urgent: joiners, gaps, ranges that no longer fit.
    repaired = allocate(model, node_map, rtt, previous=Assignment(current, assignment.epoch),
                        expected_sessions=expected_sessions, context_tokens=context_tokens, seed=seed,
                        replan_threshold=math.inf).ranges
    moves = [Move(n, current.get(n), r) for n, r in sorted(repaired.items()) if current.get(n) != r]
    if moves:
        for move in moves:
            last_moved[move.node_id] = now_s
        return moves, RebalanceState(last_moved, state.last_check_s)
    if now_s - state.last_check_s < check_interval_s:
        return [], RebalanceState(last_moved, state.last_check_s)

    # 2. Improvement, with hysteresis and cooldowns.
    checked = RebalanceState(last_moved, now_s)
    movable = sorted(n for n in current if n not in last_moved)
    if not movable:
        return [], checked
    sessions = kv_sessions_per_node(model, node_map, expected_sessions=expected_sessions,
                                    context_tokens=context_tokens)
    board = _Board(model, node_map, current, load)
    target = board.bottleneck() * (1 + improvement_threshold)
    if board.bottleneck() <= 0:
        return [], checked  # an uncovered layer no move can fix (rule 1 already tried)

    single = _best_single_move(board, movable, sessions, context_tokens)
    if single is not None and single[0] > target:
        node_id, rng = single[1], single[2]
        moves = [Move(node_id, current[node_id], rng)]
    else:
        fresh = allocate(model, node_map, rtt, expected_sessions=expected_sessions,
                         context_tokens=context_tokens, seed=seed, clients=clients).ranges
        moves = _fewest_moves(board, current, fresh, movable, target)
    for move in moves:
        last_moved[move.node_id] = now_s
    return moves, RebalanceState(last_moved, now_s)


class _Board:
    """Per-layer throughput of a (mutable) set of ranges; the bottleneck is its minimum."""

    def __init__(self, model: ModelSpec, nodes: Mapping[NodeId, NodeSpec], ranges: Mapping[NodeId, LayerRange],
                 load: Mapping[NodeId, NodeLoad] | None) -> None:
        self.model = model
        self.nodes = nodes
        self.load = load or {}
        self.ranges = dict(ranges)
        self.tp = np.zeros(model.num_layers)
        for node_id, rng in self.ranges.items():
            self.tp[rng.start:rng.end] += self.rate(node_id, rng)

    def rate(self, node_id: NodeId, rng: LayerRange) -> float:
        """Tokens/s the node carries on `rng`; a queue means it is already saturated (load skew)."""
        node_load = self.load.get(node_id)
        queue = node_load.queue_len if node_load is not None else 0
        return node_rate_tokens_per_s(self.model, self.nodes[node_id], len(rng)) / (1 + queue)

    def bottleneck(self) -> float:
        return float(self.tp.min()) if len(self.tp) else 0.0

    def set(self, node_id: NodeId, rng: LayerRange | None) -> None:
        old = self.ranges.pop(node_id, None)
        if old is not None:
            self.tp[old.start:old.end] -= self.rate(node_id, old)
        if rng is not None:
            self.ranges[node_id] = rng
            self.tp[rng.start:rng.end] += self.rate(node_id, rng)


def _best_single_move(
    board: _Board, movable: Sequence[NodeId], sessions: int, context_tokens: int
) -> tuple[float, NodeId, LayerRange] | None:
    """The one relocation that maximises the bottleneck (ties: the smallest node id)."""
    best: tuple[float, NodeId, LayerRange] | None = None
    for node_id in movable:
        old = board.ranges[node_id]
        without = board.tp.copy()
        without[old.start:old.end] -= board.rate(node_id, old)
        if without[old.start:old.end].min() <= 1e-12:
            continue  # its layers have no other replica: moving it would open a gap
        # Bottleneck after moving to [s, e): min(outside the window, inside + the node's rate).
        prefix = np.minimum.accumulate(without)
        suffix = np.minimum.accumulate(without[::-1])[::-1]
        for s, e in node_windows(board.model, board.nodes[node_id], sessions=sessions,
                                 context_tokens=context_tokens):
            if (s, e) == (old.start, old.end):
                continue
            rng = LayerRange(s, e)
            inside = float((without[s:e] + board.rate(node_id, rng)).min())
            outside = min(prefix[s - 1] if s > 0 else math.inf, suffix[e] if e < len(without) else math.inf)
            value = min(inside, outside)
            if best is None or value > best[0]:
                best = (value, node_id, rng)
    return best


def _fewest_moves(
    board: _Board,
    current: Mapping[NodeId, LayerRange],
    fresh: Mapping[NodeId, LayerRange],
    movable: Sequence[NodeId],
    target: float,
) -> list[Move]:
    """Apply the global plan to the movable nodes, then undo every move the target does not need."""
    changed = [n for n in movable if n in fresh and fresh[n] != current[n]]
    for node_id in changed:
        board.set(node_id, fresh[node_id])
    if board.bottleneck() <= target:
        return []
    # Undo first the moves that matter least: the nodes carrying the smallest rate where they go.
    order = sorted(changed, key=lambda n: (board.rate(n, fresh[n]), n))
    kept: list[NodeId] = []
    for node_id in order:
        board.set(node_id, current[node_id])
        if board.bottleneck() <= target:
            board.set(node_id, fresh[node_id])
            kept.append(node_id)
    return [Move(n, current[n], fresh[n]) for n in sorted(kept)]
