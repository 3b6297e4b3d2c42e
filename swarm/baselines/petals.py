"""Petals, as its code behaves (anchors.md; bigscience-workshop/petals, read not copied).

* Each server picks `num_blocks` from its memory with a fixed attention-cache reservation, then
  joins one at a time (random order, as the 0-10 s random sleep makes it) and takes the window of
  blocks whose sorted per-block swarm throughput is lexicographically smallest.
* Announced throughput = min(forward_rps / ((num_blocks + 1) / 2), network_rps x (0.2 if relayed)).
* Every 60-120 s (random per server) a server simulates moving itself and re-placing everyone until
  stable, and moves if the minimum block throughput would improve by more than 1/0.75.
* The client routes by shortest path: per hop RTT/2 + 0.018 s, + 1/inference_rps per block,
  + 10 s if the server has no free cache; it relays every hop (client-centric transport).
* A full server fails the request at once; a dead server's span is re-routed and replayed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from swarm.router import RouteRequest
from swarm.sim.policies import Load, NodeArrays, Policy, PolicyContext, RouteMemo, client_centric_route
from swarm.types import Assignment, LayerRange, NodeSpec, Route

GIB = 1024**3
BALANCE_QUALITY = 0.75
EPS = 1e-3
RELAY_PENALTY = 0.2
HOP_OVERHEAD_S = 0.018
NO_CACHE_PENALTY_S = 10.0
UNKNOWN_RTT_S = 0.15
CHECK_MIN_S, CHECK_MAX_S = 60.0, 120.0


_WINDOW_INDEX: dict[tuple[int, int], np.ndarray] = {}


def choose_best_start(throughputs: np.ndarray, num_blocks: int) -> int:
    """The window start whose sorted throughputs are lexicographically smallest (ties: lowest start)."""
    key = (len(throughputs), num_blocks)
    idx = _WINDOW_INDEX.get(key)
    if idx is None:
        idx = np.arange(num_blocks)[None, :] + np.arange(len(throughputs) - num_blocks + 1)[:, None]
        _WINDOW_INDEX[key] = idx
    windows = np.sort(throughputs[idx], axis=1)
    # np.lexsort sorts by the last key first, so pass columns in reverse (the start index is
    # implicit: lexsort is stable, so equal windows keep the lowest start first).
    return int(np.lexsort(windows.T[::-1])[0])


class PetalsPolicy(Policy):
    name = "petals"
    transport = "relay"
    fails_when_full = True
    mid_session_failover = True  # the design replays; the measured replay bug (#587) is not modelled
    rebalance_period_s = 15.0  # the engine ticks; each server checks on its own 60-120 s timer

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.memo = RouteMemo(penalty_depends_on_load=False)
        self.np_rng = np.random.default_rng(ctx.seed)
        self.throughput: dict[str, float] = {}
        self.num_blocks: dict[str, int] = {}
        self.next_check: dict[str, float] = {}
        self.now = 0.0

    # --- server-side -------------------------------------------------------------------------
    def _attn_cache_tokens(self) -> int:
        m = self.model
        # Grouped-query/multi-query models get a larger cache (fewer KV bytes per token).
        multiquery = m.kv_bytes_per_token_per_layer < 2 * m.hidden_size * 2
        return 16384 if multiquery else 4096

    def _choose_num_blocks(self, node: NodeSpec) -> int:
        m = self.model
        autograd = 2 * GIB * m.hidden_size / 14336
        per_block = m.layer_bytes + self._attn_cache_tokens() * m.kv_bytes_per_token_per_layer
        return max(0, min(int((node.memory_bytes - autograd) // per_block), m.num_layers))

    def _announced_throughput(self, node: NodeSpec, num_blocks: int) -> float:
        forward_rps = 1.0 / node.prefill_s_per_token_per_layer  # 1024-token forward, compute bound
        network_rps = node.uplink_bps / (self.model.hidden_size * 16)
        if node.relayed:
            network_rps *= RELAY_PENALTY
        return min(forward_rps / ((num_blocks + 1) / 2), network_rps)

    def kv_capacity_bytes(self, node: NodeSpec, rng: LayerRange) -> float | None:
        return len(rng) * self._attn_cache_tokens() * self.model.kv_bytes_per_token_per_layer

    def _block_throughputs(self, skip: str | None = None) -> np.ndarray:
        t = np.zeros(self.model.num_layers)
        for nid in sorted(self.ranges):
            if nid != skip:
                r = self.ranges[nid]
                t[r.start:r.end] += self.throughput[nid]
        return t

    def _join_one(self, node: NodeSpec) -> None:
        self.nodes[node.node_id] = node
        nb = self._choose_num_blocks(node)
        if nb == 0:
            return  # cannot hold even one block
        self.num_blocks[node.node_id] = nb
        self.throughput[node.node_id] = self._announced_throughput(node, nb)
        start = choose_best_start(self._block_throughputs(), nb)
        self.ranges[node.node_id] = LayerRange(start, start + nb)
        self.next_check[node.node_id] = self.now + self.rng.uniform(CHECK_MIN_S, CHECK_MAX_S)

    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        order = sorted(nodes, key=lambda n: n.node_id)
        self.rng.shuffle(order)  # servers sleep a random 0-10 s, so they join in random order
        for node in order:
            self._join_one(node)
        return self.assignment()

    def on_join(self, node: NodeSpec) -> Assignment:
        self._join_one(node)
        return self.assignment()

    def on_leave(self, node_id: str) -> Assignment:
        for d in (self.throughput, self.num_blocks, self.next_check):
            d.pop(node_id, None)
        return super().on_leave(node_id)

    def _should_choose_other_blocks(self, nid: str) -> bool:
        spans = {k: [r.start, r.end - r.start] for k, r in sorted(self.ranges.items())}
        tp = self._block_throughputs()
        initial = tp.min()
        start, length = spans[nid]
        tp[start:start + length] -= self.throughput[nid] * (1 + EPS)
        if initial > EPS and tp.min() <= 0:
            return False  # moving would disconnect the swarm
        new_start = choose_best_start(tp, length)
        if new_start == start:
            return False
        # Shortcut that never changes the answer: no placement can lift the minimum above the mean
        # per-block throughput, so if even that would not beat the quality bar, stop here.
        ceiling = sum(self.throughput[k] * ln for k, (_, ln) in spans.items()) / self.model.num_layers
        if ceiling <= 0 or initial / ceiling >= BALANCE_QUALITY - EPS:
            return False
        tp[start:start + length] += self.throughput[nid] * EPS
        spans[nid][0] = new_start
        tp[new_start:new_start + length] += self.throughput[nid]
        moved = True
        while moved:  # everyone re-places themselves until stable
            order = list(spans)
            self.np_rng.shuffle(order)
            moved = False
            for k in order:
                s, ln = spans[k]
                tp[s:s + ln] -= self.throughput[k] * (1 + EPS)
                ns = choose_best_start(tp, ln)
                tp[s:s + ln] += self.throughput[k] * EPS
                if ns != s:
                    spans[k][0] = ns
                    moved = True
                tp[spans[k][0]:spans[k][0] + ln] += self.throughput[k]
        new = tp.min()
        if new < initial or new < EPS:
            return False
        return initial / new < BALANCE_QUALITY - EPS

    def rebalance(self, now: float, load: Load) -> Assignment | None:
        self.now = now
        changed = False
        for nid in sorted(self.ranges):
            if self.next_check.get(nid, float("inf")) > now:
                continue
            self.next_check[nid] = now + self.rng.uniform(CHECK_MIN_S, CHECK_MAX_S)
            if self._should_choose_other_blocks(nid):
                # Shut down and rejoin: choose blocks with this server's own span gone from the DHT.
                nb = self.num_blocks[nid]
                start = choose_best_start(self._block_throughputs(skip=nid), nb)
                if start != self.ranges[nid].start:
                    self.ranges[nid] = LayerRange(start, start + nb)
                    changed = True
        return self.assignment() if changed else None

    # --- client-side ------------------------------------------------------------------------
    def route(self, request: RouteRequest, load: Load) -> Route | None:
        return client_centric_route(self, self.memo, request, load, self._hop_costs)

    @staticmethod
    def _hop_costs(request: RouteRequest, load: Load, arr: NodeArrays, sel: np.ndarray, free: np.ndarray
                   ) -> np.ndarray:
        """Per hop RTT/2 (unknown: UNKNOWN_RTT_S) + HOP_OVERHEAD_S, + NO_CACHE_PENALTY_S on a full server."""
        rtt = arr.rtt_from(request.client)[sel]
        fixed = np.where(rtt == rtt, rtt, UNKNOWN_RTT_S * 2) / 2 + HOP_OVERHEAD_S
        return fixed + np.where(free[sel], 0.0, NO_CACHE_PENALTY_S)  # 1 / inference_rps per block below
