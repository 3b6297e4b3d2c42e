"""Parallax, as its scheduler code behaves (anchors.md; GradientHQ/parallax, read not copied).

* Capacity c_i = floor((memory x 0.65 - embedding / LM head if it holds them) / layer bytes).
* Allocation: over nodes sorted by capacity, a DP picks the number of pipelines k maximising
  k^2 / (minimum total stages for k pipelines); each pipeline is then water-filled: find lambda with
  sum_i min(c_i, lambda F_i) = L, give min(c_i, lambda F_i) layers (largest-remainder rounding) in
  capacity order. F_i = datasheet TFLOPS, 50 TFLOPS for a GPU not in the table: nothing is measured.
  The network plays no part. Left-over nodes join dynamically.
* Dynamic join: a node starts at the layer with the least KV hosting memory and takes as many
  consecutive layers as its capacity allows.
* Routing (the default): round-robin over a few registered disjoint pipelines, skipping overloaded
  ones; pipelines are registered at bootstrap and re-registered from unregistered nodes on changes.
* A global rebalance (everyone reloads) fires only when no full pipeline remains. A dead stage ends
  the answers running through it (no KV or request migration). Push transport.

The DP's state space explodes on large swarms; past a state budget the Parallax greedy allocator
(its other shipped strategy) is used instead, which is what an operator would have to do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import cache

from swarm.router import RouteRequest
from swarm.sim.policies import Load, Policy, PolicyContext, has_free_kv
from swarm.types import Assignment, Hop, LayerRange, NodeSpec, Route

PARAM_FRACTION = 0.65
DEFAULT_TFLOPS = 50.0
DEFAULT_BANDWIDTH_GBPS = 600.0
WATER_FILLING_ITERATIONS = 40
DP_STATE_BUDGET = 200_000
MAX_DISCOVERED = 2_000


class _Budget(Exception):
    pass


class ParallaxPolicy(Policy):
    name = "parallax"
    transport = "push"
    mid_session_failover = False

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.pipelines: list[list[str]] = []
        self.rr = 0
        self.used_greedy = False
        self.global_rebalances = 0

    # --- node facts, as Parallax knows them ------------------------------------------------------
    def _tflops(self, nid: str) -> float:
        hw = self.ctx.hardware.get(nid)
        return hw.tflops if hw is not None and hw.tflops else DEFAULT_TFLOPS

    def _latency_estimate_s(self, nid: str) -> float:
        hw = self.ctx.hardware.get(nid)
        bw = hw.mem_bandwidth_gbps if hw is not None and hw.mem_bandwidth_gbps else DEFAULT_BANDWIDTH_GBPS
        m = self.model
        return max(m.layer_bytes / (bw * 1e9), m.flops_per_layer / (self._tflops(nid) * 1e12))

    def _cap(self, nid: str, embed: bool = False, head: bool = False) -> int:
        mem = self.nodes[nid].memory_bytes * PARAM_FRACTION
        mem -= (0.5 * self.model.head_bytes if embed else 0) + (0.5 * self.model.head_bytes if head else 0)
        return max(0, int(mem // self.model.layer_bytes))

    def _by_capacity(self, ids) -> list[str]:
        return sorted(ids, key=lambda n: (-self._cap(n), n))

    # --- phase 1: allocation -------------------------------------------------------------------
    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        self.nodes = {n.node_id: n for n in nodes}
        self._global_allocation()
        return self.assignment()

    def _global_allocation(self) -> None:
        self.ranges = {}
        order = self._by_capacity(self.nodes)
        try:
            pipelines = self._dp_pipelines(order)
        except (_Budget, RecursionError):
            # The DP's states explode past a few dozen nodes, and its recursion depth equals the node
            # count (Python's default limit is ~1,000): fall back to Parallax's greedy allocator.
            self.used_greedy = True
            pipelines = self._greedy_pipelines(order)
        for p in pipelines:
            self._water_fill(p)
        self.pipelines = [[x for x in self._by_capacity(p) if x in self.ranges] for p in pipelines]
        for nid in order:  # left-over nodes join dynamically
            if nid not in self.ranges:
                self._dynamic_join(nid)

    def _dp_pipelines(self, order: list[str]) -> list[list[str]]:
        L, n = self.model.num_layers, len(order)
        cap = [self._cap(x) for x in order]
        cap_head = [self._cap(x, head=True) for x in order]
        cap_embed = [self._cap(x, embed=True) for x in order]
        suffix = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            suffix[i] = suffix[i + 1] + cap[i]
        if suffix[0] < L:
            return []
        best: tuple[float, int, dict] = (-1.0, 0, {})
        self._dp_states = 0
        for k in range(1, min(n, suffix[0] // L) + 1):
            stages, path = self._min_stages(k, cap, cap_head, cap_embed, suffix)
            if stages < math.inf and k * k / stages > best[0]:
                best = (k * k / stages, k, path)
        if best[1] == 0:
            return []
        return self._backtrack(order, best[2], cap, cap_head, cap_embed)

    def _min_stages(self, k: int, cap, cap_head, cap_embed, suffix) -> tuple[float, dict]:
        """Minimum total stages realising k pipelines from nodes in capacity order (Parallax's DP)."""
        L, n = self.model.num_layers, len(cap)
        path: dict = {}

        @cache
        def dp(i: int, open_r: tuple[int, ...], done: int) -> float:
            self._dp_states += 1
            if self._dp_states > DP_STATE_BUDGET:
                raise _Budget
            if done == k and not open_r:
                path[(i, open_r, done)] = ("done",)
                return 0
            if i == n:
                return math.inf
            new_needed = k - done - len(open_r)
            if new_needed < 0 or suffix[i] < sum(open_r) + max(0, new_needed) * L or \
                    done + len(open_r) + (n - i) < k:
                return math.inf
            best_cost, action = dp(i + 1, open_r, done), ("skip",)
            for j, r in enumerate(open_r):
                after = r - cap[i]
                if after <= 0:
                    after = r - cap_head[i]  # closing the pipeline: this node also holds the LM head
                rest = list(open_r)
                if after <= 0:
                    rest.pop(j)
                    cost = 1 + dp(i + 1, tuple(rest), done + 1)
                else:
                    rest[j] = after
                    cost = 1 + dp(i + 1, tuple(sorted(rest)), done)
                if cost < best_cost:
                    best_cost, action = cost, ("assign", j)
            if new_needed > 0:
                r_new = L - cap_embed[i]
                if r_new <= 0:
                    cost = 1 + dp(i + 1, open_r, done + 1)
                else:
                    cost = 1 + dp(i + 1, tuple(sorted(open_r + (r_new,))), done)
                if cost < best_cost:
                    best_cost, action = cost, ("start",)
            path[(i, open_r, done)] = action
            return best_cost

        return dp(0, (), 0), path

    def _backtrack(self, order, path, cap, cap_head, cap_embed) -> list[list[str]]:
        L = self.model.num_layers
        pipelines: list[list[str]] = []
        open_list: list[tuple[int, list[str]]] = []
        done = 0
        for i, nid in enumerate(order):
            open_list.sort(key=lambda x: x[0])
            action = path.get((i, tuple(r for r, _ in open_list), done))
            if action is None or action[0] == "done":
                break
            if action[0] == "assign":
                r, seq = open_list[action[1]]
                after = r - cap[i] if r - cap[i] > 0 else r - cap_head[i]
                seq.append(nid)
                if after <= 0:
                    pipelines.append(seq)
                    open_list.pop(action[1])
                    done += 1
                else:
                    open_list[action[1]] = (after, seq)
            elif action[0] == "start":
                r_new = L - cap_embed[i]
                if r_new <= 0:
                    pipelines.append([nid])
                    done += 1
                else:
                    open_list.append((r_new, [nid]))
        return pipelines

    def _greedy_pipelines(self, order: list[str]) -> list[list[str]]:
        """Parallax's greedy allocator: fill pipelines largest-first, with its tail look-ahead."""
        L = self.model.num_layers
        avail = list(order)
        pipelines = []
        while avail and sum(self._cap(x) for x in avail) >= L:
            remaining, total, pipe = L, sum(self._cap(x) for x in avail), []
            while remaining > 0 and avail:
                is_start = not pipe
                pick = 0
                if is_start and total - remaining >= L + 1:
                    for i, x in enumerate(avail):
                        c = self._cap(x, head=True)
                        if c >= remaining and total - c >= L:
                            pick = i  # the smallest node that could close it, keeping a next pipeline
                x = avail.pop(pick)
                pipe.append(x)
                c = self._cap(x, embed=is_start)
                if remaining - c <= 0:
                    c = self._cap(x, embed=is_start, head=True)
                remaining -= c
                total -= c
            if remaining > 0:
                break
            pipelines.append(pipe)
        return pipelines

    def _water_fill(self, pipe: list[str]) -> None:
        nodes = self._by_capacity(pipe)
        n, L = len(nodes), self.model.num_layers
        caps = [self._cap(x, embed=(i == 0), head=(i == n - 1)) for i, x in enumerate(nodes)]
        power = [self._tflops(x) for x in nodes]
        lo, hi = 0.0, max(c / f for c, f in zip(caps, power, strict=True))
        for _ in range(WATER_FILLING_ITERATIONS):
            mid = (lo + hi) / 2
            if sum(min(c, mid * f) for c, f in zip(caps, power, strict=True)) >= L:
                hi = mid
            else:
                lo = mid
        target = [min(c, hi * f) for c, f in zip(caps, power, strict=True)]
        counts = [min(c, int(math.floor(t))) for c, t in zip(caps, target, strict=True)]
        remaining = L - sum(counts)
        for _, i in sorted(((target[i] - counts[i], -i) for i in range(n)), reverse=True):
            if remaining <= 0:
                break
            if counts[-i] < caps[-i]:
                counts[-i] += 1
                remaining -= 1
        start = 0
        for x, c in zip(nodes, counts, strict=True):
            if c > 0:
                self.ranges[x] = LayerRange(start, start + c)
                start += c

    def _dynamic_join(self, nid: str) -> None:
        L = self.model.num_layers
        kv = [0.0] * L
        for x, r in self.ranges.items():
            per_layer = (self.nodes[x].memory_bytes - len(r) * self.model.layer_bytes) / len(r)
            for layer in range(r.start, r.end):
                kv[layer] += per_layer
        start = min(range(L), key=lambda layer: (kv[layer], layer))
        end = min(start + self._cap(nid, embed=start == 0), L)
        if end == L:
            end = min(start + self._cap(nid, embed=start == 0, head=True), L)
        if end > start:
            self.ranges[nid] = LayerRange(start, end)

    def _has_full_pipeline(self) -> bool:
        by_start: dict[int, list[int]] = {}
        for r in self.ranges.values():
            by_start.setdefault(r.start, []).append(r.end)
        reach, frontier = {0}, [0]
        while frontier:
            b = frontier.pop()
            for e in by_start.get(b, []):
                if e not in reach:
                    reach.add(e)
                    frontier.append(e)
        return self.model.num_layers in reach

    def _register_more(self) -> None:
        """Register disjoint complete pipelines found among unregistered nodes (lowest latency first)."""
        taken = {x for p in self.pipelines for x in p}
        by_start: dict[int, list[str]] = {}
        for x, r in sorted(self.ranges.items(), key=lambda kv: (kv[1].end, kv[0])):
            if x not in taken:
                by_start.setdefault(r.start, []).append(x)
        found: list[list[str]] = []

        def dfs(pos: int, path: list[str]) -> None:
            if len(found) >= MAX_DISCOVERED:
                return
            if pos == self.model.num_layers:
                found.append(list(path))
                return
            for x in by_start.get(pos, []):
                path.append(x)
                dfs(self.ranges[x].end, path)
                path.pop()

        dfs(0, [])
        found.sort(key=self._pipeline_latency)
        for p in found:
            if not taken.intersection(p):
                self.pipelines.append(p)
                taken.update(p)

    def _pipeline_latency(self, p: list[str]) -> float:
        # Parallax's estimate: per-node cost is the *per-layer* latency, not times its layers (as coded).
        t = sum(self._latency_estimate_s(x) for x in p)
        return t + sum(self.ctx.rtt(a, b) for a, b in itertools.pairwise(p))

    def on_join(self, node: NodeSpec) -> Assignment:
        self.nodes[node.node_id] = node
        self._dynamic_join(node.node_id)
        self._register_more()
        return self.assignment()

    def on_leave(self, node_id: str) -> Assignment:
        self.nodes.pop(node_id, None)
        self.ranges.pop(node_id, None)
        self.pipelines = [p for p in self.pipelines if node_id not in p]
        if not self._has_full_pipeline() and self.nodes:
            self.global_rebalances += 1
            self._global_allocation()
        elif not self.pipelines:
            self._register_more()
        return self.assignment()

    # --- phase 2: routing ------------------------------------------------------------------------
    def route(self, request: RouteRequest, load: Load) -> Route | None:
        if request.span(self.model.num_layers) != (0, self.model.num_layers):
            return None  # Parallax routes whole requests only
        if not self.pipelines:
            self._register_more()
        tokens = self.ctx.session_tokens
        for k in range(len(self.pipelines)):
            p = self.pipelines[(self.rr + k) % len(self.pipelines)]
            if any(x in request.exclude or not has_free_kv(load, x, tokens) for x in p):
                continue  # overloaded or not serving: skip
            self.rr = (self.rr + k + 1) % len(self.pipelines)
            hops = tuple(Hop(x, self.ranges[x].start, self.ranges[x].end) for x in p)
            return Route(hops, self._pipeline_latency(p))
        return None
