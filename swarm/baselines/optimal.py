"""An exact reference for small swarms: a MILP (scipy.optimize.milp / HiGHS) over placements.

What is optimised, under the simulator's cost model (per-layer decode latency, push legs):
  1. the number of disjoint complete pipelines (each adds KV room and compute: throughput), then
  2. their total per-token latency: sum of layers x decode latency, one leg per stage, and a
     cross-region penalty for every extra region a pipeline touches.
Variables: u[p,j] node j serves in pipeline p; l[p,j] its layer count; z[p] pipeline p is used;
w[p,r] pipeline p touches region r. Every node keeps >= KV_RESERVE of its memory for KV cache.
After solving, each pipeline's stage order is the cheapest order of its nodes (exhaustive for small
pipelines), and each request takes the pipeline with the lowest current per-token time that has
free KV (else it waits). A lost stage is re-routed over the other pipelines' nodes.

This is the optimum of that static objective, not of every simulated metric (which depend on the
random arrivals); the instance size is capped at MAX_NODES, beyond which it refuses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from swarm.router import RouteRequest
from swarm.sim.policies import Load, Policy, PolicyContext, boundary_shortest_path, has_free_kv
from swarm.types import Assignment, Hop, LayerRange, NodeSpec, Route

MAX_NODES = 12
TIME_LIMIT_S = 60.0


class OptimalTooLarge(ValueError):
    pass


class OptimalPolicy(Policy):
    name = "optimal"
    transport = "push"
    mid_session_failover = True

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.pipelines: list[list[str]] = []

    def _cap(self, node: NodeSpec, sessions: int) -> int:
        """Layers the node can hold while keeping KV for `sessions` full sessions on each of them."""
        m = self.model
        per_layer = m.layer_bytes + sessions * self.ctx.session_tokens * m.kv_bytes_per_token_per_layer
        return max(0, min(m.num_layers, int((node.memory_bytes - m.head_bytes) // per_layer)))

    def _concurrent_sessions(self) -> int:
        """Little's law on the workload, with a per-token time estimated from the median node."""
        if not self.nodes:
            return 1
        lat = sorted(n.layer_latency_s for n in self.nodes.values())[len(self.nodes) // 2]
        token_s = self.model.num_layers * lat + 0.1
        return max(1, math.ceil(self.ctx.expected_rate_per_s * self.ctx.output_tokens * token_s))

    def _leg_s(self, a: str, b: str) -> float:
        return self.ctx.rtt(a, b) / 2 + self.model.hidden_bytes_per_token * 8 / self.nodes[a].uplink_bps

    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        if len(nodes) > MAX_NODES:
            raise OptimalTooLarge(
                f"{len(nodes)} nodes is too large for the exact MILP (at most {MAX_NODES}); use a smaller scenario"
            )
        self.nodes = {n.node_id: n for n in nodes}
        self._solve()
        return self.assignment()

    def _solve(self) -> None:
        """Try every pipeline count; keep the plan of least expected per-token latency."""
        self.ranges, self.pipelines = {}, []
        need = self._concurrent_sessions()
        best: tuple[float, list[list[tuple[str, int]]]] | None = None
        for k in range(1, len(self.nodes) + 1):
            found = self._solve_k(k, need)
            if found is None:
                if best is not None:
                    break  # more pipelines only get slower once they stop fitting
                continue
            if best is None or found[0] < best[0] * (1 - 1e-9):
                best = found
            else:
                if found[0] <= best[0] * (1 + 1e-9):
                    best = found  # equal latency with one more pipeline, which carries overflow load
                break  # one more pipeline no longer lowers latency: stop searching
        if best is None:
            found = self._solve_k(1, 1)  # the load's KV cannot fit at all: carry what fits
            if found is None:
                return
            best = found
        for members in best[1]:
            if not members:
                continue
            order = self._best_order([m for m, _ in members])
            counts = dict(members)
            start = 0
            for nid in order:
                self.ranges[nid] = LayerRange(start, start + counts[nid])
                start += counts[nid]
            self.pipelines.append(order)

    def _solve_k(self, P: int, sessions: int) -> tuple[float, list[list[tuple[str, int]]]] | None:
        """Exactly P disjoint pipelines, least client-weighted latency; `sessions` concurrent in total.

        Pipeline p has a home region (where its first and last stages sit, so a client's legs cost
        RTT(client, home)); each extra region it touches costs a round trip from home; each client
        region uses one pipeline, which must keep KV for that region's share of the sessions. Products
        of binaries (and binary x layers) are linearised; the client's pipeline latency uses big-M.
        """
        ids = sorted(self.nodes)
        n, L = len(ids), self.model.num_layers
        caps = [self._cap(self.nodes[x], 0) for x in ids]
        if sum(caps) < P * L:
            return None
        m = self.model
        kv_per_layer_session = self.ctx.session_tokens * m.kv_bytes_per_token_per_layer
        regions = sorted({self.nodes[x].region for x in ids})
        rep = {r: next(x for x in ids if self.nodes[x].region == r) for r in regions}
        region_of = [regions.index(self.nodes[x].region) for x in ids]
        R = len(regions)
        clients = list(self.ctx.clients) or [(ids[0], 1.0)]
        C = len(clients)
        total_w = sum(w for _, w in clients)
        stage = [self._in_region_leg(x) for x in ids]
        rr = [[self.ctx.rtt(rep[a], rep[b]) for b in regions] for a in regions]
        big_m = L * max(self.nodes[x].layer_latency_s for x in ids) + sum(stage) + R * max(map(max, rr))

        layout = {}
        for name, count in (("u", P * n), ("l", P * n), ("w", P * R), ("h", P * R), ("v", P * R * R),
                            ("a", C * P), ("q", C * P * R), ("t", C * P), ("m", C * P * n)):
            layout[name] = (sum(c for _, c in layout.values()), count)
        size = sum(c for _, c in layout.values())

        def var(name: str, *idx: int) -> int:
            dims = {"u": (P, n), "l": (P, n), "w": (P, R), "h": (P, R), "v": (P, R, R), "a": (C, P),
                    "q": (C, P, R), "t": (C, P), "m": (C, P, n)}[name]
            flat = 0
            for i, d in zip(idx, dims, strict=True):
                flat = flat * d + i
            return layout[name][0] + flat

        c = np.zeros(size)
        for ci, (cl, w) in enumerate(clients):
            for p in range(P):
                c[var("t", ci, p)] = w / total_w
                for r in range(R):
                    c[var("q", ci, p, r)] = w / total_w * self.ctx.rtt(cl, rep[regions[r]])
        rows, lo, hi = [], [], []

        def add(coeffs: dict[int, float], lb: float, ub: float) -> None:
            row = np.zeros(size)
            for k, v in coeffs.items():
                row[k] += v
            rows.append(row)
            lo.append(lb)
            hi.append(ub)

        for j in range(n):
            add({var("u", p, j): 1 for p in range(P)}, 0, 1)
        for p in range(P):
            # Symmetry breaking: pipeline p's lowest-numbered node is node p or later, and pipelines
            # are ordered by their lowest-numbered node (sum over j <= i of u[p, j] >= u[p+1, ...]).
            for j in range(min(p, n)):
                add({var("u", p, j): 1}, 0, 0)
            if p + 1 < P:
                for i in range(n):
                    add({**{var("u", p, j): 1 for j in range(i + 1)},
                         **{var("u", p + 1, j): -1 for j in range(i + 1)}}, 0, np.inf)
            add({var("l", p, j): 1 for j in range(n)}, L, L)
            add({var("h", p, r): 1 for r in range(R)}, 1, 1)
            for j, x in enumerate(ids):
                add({var("l", p, j): 1, var("u", p, j): -caps[j]}, -np.inf, 0)
                # Memory: weights + KV for the sessions of the clients this pipeline serves, where
                # m[c,p,j] = a[c,p] * l[p,j] (linearised below).
                mem = {var("l", p, j): m.layer_bytes}
                for ci, (_, w) in enumerate(clients):
                    mem[var("m", ci, p, j)] = kv_per_layer_session * sessions * w / total_w
                add(mem, -np.inf, self.nodes[x].memory_bytes - m.head_bytes)
                for ci in range(C):
                    add({var("m", ci, p, j): 1, var("a", ci, p): -caps[j]}, -np.inf, 0)
                    add({var("m", ci, p, j): 1, var("l", p, j): -1}, -np.inf, 0)
                    add({var("m", ci, p, j): 1, var("l", p, j): -1, var("a", ci, p): -caps[j]},
                        -caps[j], np.inf)
                add({var("l", p, j): 1, var("u", p, j): -1}, 0, np.inf)
                add({var("w", p, region_of[j]): 1, var("u", p, j): -1}, 0, np.inf)
            for r in range(R):
                add({var("h", p, r): 1, var("w", p, r): -1}, -np.inf, 0)
                for r2 in range(R):
                    if r2 != r:  # v >= h[r] + w[r2] - 1: an extra region visited from home r
                        add({var("v", p, r, r2): 1, var("h", p, r): -1, var("w", p, r2): -1}, -1, np.inf)
        for ci in range(C):
            add({var("a", ci, p): 1 for p in range(P)}, 1, 1)
            for p in range(P):
                for r in range(R):  # q >= a + h - 1: client ci's legs to pipeline p's home
                    add({var("q", ci, p, r): 1, var("a", ci, p): -1, var("h", p, r): -1}, -1, np.inf)
                # t >= T_p - M (1 - a): the latency of the pipeline the client uses
                coeffs = {var("t", ci, p): 1.0, var("a", ci, p): -big_m}
                for j, x in enumerate(ids):
                    coeffs[var("l", p, j)] = -self.nodes[x].layer_latency_s
                    coeffs[var("u", p, j)] = -stage[j]
                for r in range(R):
                    for r2 in range(R):
                        if r2 != r:
                            coeffs[var("v", p, r, r2)] = -rr[r][r2]
                add(coeffs, -big_m, np.inf)
        integral = np.ones(size)
        upper = np.ones(size)
        for p in range(P):
            for j in range(n):
                upper[var("l", p, j)] = caps[j]
                for ci in range(C):
                    upper[var("m", ci, p, j)] = caps[j]
        for ci in range(C):
            for p in range(P):
                integral[var("t", ci, p)] = 0
                upper[var("t", ci, p)] = np.inf
        res = milp(
            c,
            constraints=LinearConstraint(np.array(rows), lo, hi),
            integrality=integral,
            bounds=Bounds(np.zeros(size), upper),
            options={"time_limit": TIME_LIMIT_S},
        )
        if res.x is None:
            return None
        x = np.round(res.x).astype(int)
        pipes = [[(ids[j], int(x[var("l", p, j)])) for j in range(n) if x[var("u", p, j)]] for p in range(P)]
        return float(res.fun), pipes

    def _in_region_leg(self, nid: str) -> float:
        region = self.nodes[nid].region
        peers = [x for x in self.nodes if x != nid and self.nodes[x].region == region]
        rtt = self.ctx.rtt(nid, peers[0]) if peers else min(
            (self.ctx.rtt(nid, x) for x in self.nodes if x != nid), default=0.0
        )
        return rtt / 2 + self.model.hidden_bytes_per_token * 8 / self.nodes[nid].uplink_bps

    def _order_cost(self, order: Sequence[str]) -> float:
        legs = sum(self._leg_s(a, b) for a, b in itertools.pairwise(order))
        ends = sum(w * (self.ctx.rtt(cl, order[0]) + self.ctx.rtt(order[-1], cl)) / 2
                   for cl, w in self.ctx.clients) / max(1e-9, sum(w for _, w in self.ctx.clients))
        return legs + ends

    def _best_order(self, members: list[str]) -> list[str]:
        if len(members) <= 7:
            return list(min(itertools.permutations(sorted(members)), key=self._order_cost))
        order, rest = [], sorted(members, key=lambda m: self.nodes[m].region)  # group by region
        return order + rest

    def on_join(self, node: NodeSpec) -> Assignment:
        self.nodes[node.node_id] = node
        if len(self.nodes) <= MAX_NODES:
            self._solve()
        return self.assignment()

    def on_leave(self, node_id: str) -> Assignment:
        self.nodes.pop(node_id, None)
        self._solve()
        return self.assignment()

    def _token_s(self, pipe: list[str], client: str, load: Load) -> float:
        t = self.ctx.rtt(client, pipe[0]) / 2 + self.ctx.rtt(pipe[-1], client) / 2
        t += sum(self._leg_s(a, b) for a, b in itertools.pairwise(pipe))
        for x in pipe:
            node, nl = self.nodes[x], load.get(x)
            batch = (nl.active_sessions if nl is not None else 0) + 1
            step = max(node.layer_latency_s, batch * node.prefill_s_per_token_per_layer)
            t += len(self.ranges[x]) * step
        return t

    def route(self, request: RouteRequest, load: Load) -> Route | None:
        start, end = request.span(self.model.num_layers)
        client, exclude, tokens = request.client, request.exclude, self.ctx.session_tokens
        if start == 0 and end == self.model.num_layers:
            best: tuple[float, list[str]] | None = None
            for pipe in self.pipelines:
                if any(x in exclude or not has_free_kv(load, x, tokens) for x in pipe):
                    continue
                t = self._token_s(pipe, client, load)
                if best is None or t < best[0]:
                    best = (t, pipe)
            if best is None:
                return None
            hops = tuple(Hop(x, self.ranges[x].start, self.ranges[x].end) for x in best[1])
            return Route(hops, best[0])
        cands = [
            (x, r.start, r.end, self.ctx.rtt(client, x) / 2, self.nodes[x].layer_latency_s)
            for x, r in self.ranges.items()
            if x not in exclude and has_free_kv(load, x, tokens)
        ]
        found = boundary_shortest_path(cands, start, end)
        return None if found is None else Route(tuple(found[0]), found[1])
