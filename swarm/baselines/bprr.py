"""BPRR: block placement and request routing of Sun, He, Ji (IFIP Performance 2025; arXiv 2512.21884).

* Conservative cache reservation: server j holds m_j = min(floor(M_j / (s_m + s_c R)), L) blocks,
  leaving attention cache for all R concurrent sessions on every block it holds.
* Greedy placement: servers in order of fastest amortised per-block time, (RTT_j + tau_j m_j) / m_j,
  each on the contiguous range covering the most under-served blocks.
* Routing: shortest path with per-hop cost RTT(client, j) + tau_j x blocks processed at j; online,
  a hop through a server without a free cache slot adds the expected wait for one.
* Client-centric transport (the client relays every hop), like Petals.

Interpretations (the paper leaves them to the implementer): R is the workload's expected number of
concurrent sessions (Little's law over an estimated session time), halved until the swarm can cover
every block; "under-served" blocks are those with the fewest servers; ties go to the lower start.
A newcomer is placed by the same greedy rule; there is no periodic re-placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from swarm.router import RouteRequest
from swarm.sim.policies import Load, NodeArrays, Policy, PolicyContext, RouteMemo, client_centric_route
from swarm.types import Assignment, LayerRange, NodeSpec, Route


class BprrPolicy(Policy):
    name = "bprr"
    transport = "relay"
    mid_session_failover = True

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.memo = RouteMemo(penalty_depends_on_load=True)
        self.m: dict[str, int] = {}
        self.reserve_sessions = 1
        self.session_time_s = 1.0

    def _blocks(self, node: NodeSpec, sessions: int) -> int:
        m = self.model
        s_c = self.ctx.session_tokens * m.kv_bytes_per_token_per_layer
        return min(int(node.memory_bytes // (m.layer_bytes + s_c * sessions)), m.num_layers)

    def _place(self, node: NodeSpec, coverage: np.ndarray) -> None:
        mj = self.m.get(node.node_id, 0)
        if mj <= 0:
            return
        under = (coverage == coverage.min()).astype(float)
        windows = np.lib.stride_tricks.sliding_window_view(under, mj).sum(axis=1)
        load = np.lib.stride_tricks.sliding_window_view(coverage, mj).sum(axis=1)
        # Most under-served blocks first, then the least-covered window, then the lowest start.
        start = int(np.lexsort((np.arange(len(windows)), load, -windows))[0])
        self.ranges[node.node_id] = LayerRange(start, start + mj)
        coverage[start:start + mj] += 1

    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        self.nodes = {n.node_id: n for n in nodes}
        self.ranges = {}
        if not nodes:
            return self.assignment()
        L = self.model.num_layers
        taus = sorted(n.layer_latency_s for n in nodes)
        tau = taus[len(taus) // 2]
        rtt = float(np.median([self.ctx.mean_client_rtt(n.node_id) for n in nodes]))
        # Estimated session time: every token crosses all L blocks plus ~L/m_typ client round trips.
        m_typ = max(1, int(np.median([self._blocks(n, 1) for n in nodes])))
        self.session_time_s = self.ctx.output_tokens * (L * tau + math.ceil(L / m_typ) * rtt)
        r = max(1, math.ceil(self.ctx.expected_rate_per_s * self.session_time_s))
        while True:
            self.m = {n.node_id: self._blocks(n, r) for n in nodes}
            if sum(self.m.values()) >= L or r == 1:
                break
            r = max(1, r // 2)
        self.reserve_sessions = r
        self.ranges = {}
        coverage = np.zeros(L)
        for node in sorted(nodes, key=self._amortised):
            self._place(node, coverage)
        return self.assignment()

    def _amortised(self, node: NodeSpec) -> tuple[float, str]:
        mj = self.m.get(node.node_id, 0)
        if mj <= 0:
            return (math.inf, node.node_id)
        return ((self.ctx.mean_client_rtt(node.node_id) + node.layer_latency_s * mj) / mj, node.node_id)

    def on_join(self, node: NodeSpec) -> Assignment:
        self.nodes[node.node_id] = node
        self.m[node.node_id] = self._blocks(node, self.reserve_sessions)
        coverage = np.zeros(self.model.num_layers)
        for r in self.ranges.values():
            coverage[r.start:r.end] += 1
        self._place(node, coverage)
        return self.assignment()

    def route(self, request: RouteRequest, load: Load) -> Route | None:
        return client_centric_route(self, self.memo, request, load, self._hop_costs)

    def _hop_costs(self, request: RouteRequest, load: Load, arr: NodeArrays, sel: np.ndarray, free: np.ndarray
                   ) -> np.ndarray:
        """Per hop RTT(client, j); through a server without a free cache slot, plus the expected wait for one."""
        fixed = arr.rtt_from(request.client)[sel]
        if (~free[sel]).any():
            # Waiting penalty: expected time until one of its sessions ends and frees a slot.
            active = np.maximum(1, arr.active_sessions(load)[sel])
            fixed = fixed + np.where(free[sel], 0.0, self.session_time_s / active)
        return fixed
