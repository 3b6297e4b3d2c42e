"""exo: one ring over every node, layers split in proportion to memory (anchors.md).

Nodes are ordered by memory (largest first, then id), each gets the layers between the rounded
cumulative memory fractions; compute speed and network play no part. Any join or leave recomputes
the whole ring (nodes reload), and a dead stage ends the answers running through it. Hidden states
go stage to stage around the ring (push). Nodes whose share rounds to zero layers are left out of
the ring; a node given more layers than its memory holds has no room for KV and stalls the ring,
as an over-assigned exo node runs out of memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from swarm.router import RouteRequest
from swarm.sim.policies import Load, Policy
from swarm.types import Assignment, Hop, LayerRange, NodeSpec, Route


class ExoPolicy(Policy):
    name = "exo"
    transport = "push"
    mid_session_failover = False

    def _partition(self) -> Assignment:
        ring = sorted(self.nodes.values(), key=lambda n: (-n.memory_bytes, n.node_id))
        total = sum(n.memory_bytes for n in ring)
        L = self.model.num_layers
        self.ranges = {}
        self.ring = []
        if total <= 0:
            return self.assignment()
        acc = 0.0
        start = 0
        for n in ring:
            acc += n.memory_bytes
            end = min(L, round(acc / total * L))
            if end > start:
                self.ranges[n.node_id] = LayerRange(start, end)
            start = max(start, end)
        self.ring = [n.node_id for n in ring if n.node_id in self.ranges]
        return self.assignment()

    def allocate(self, nodes: Sequence[NodeSpec]) -> Assignment:
        self.nodes = {n.node_id: n for n in nodes}
        return self._partition()

    def on_join(self, node: NodeSpec) -> Assignment:
        self.nodes[node.node_id] = node
        return self._partition()

    def on_leave(self, node_id: str) -> Assignment:
        self.nodes.pop(node_id, None)
        return self._partition()

    def route(self, request: RouteRequest, load: Load) -> Route | None:
        start, end = request.span(self.model.num_layers)
        hops = []
        for nid in self.ring:
            r = self.ranges[nid]
            if r.end <= start or r.start >= end:
                continue
            if nid in request.exclude:
                return None  # the ring is the only chain
            hops.append(Hop(nid, max(r.start, start), min(r.end, end)))
        if not hops:
            return None
        return Route(tuple(hops), 0.0)
