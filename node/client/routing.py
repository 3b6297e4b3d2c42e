"""Live routing: the scheduler's DP router (`swarm.router`) fed with DHT records and measured RTTs.

Nodes announce their measured per-layer decode latency, memory and load; the client
measures its own RTT to each peer (libp2p pings through `node.net.probe`). Node-to-node
RTTs are not known to the client yet, so it assumes the mean of its RTTs to the two
ends, a neutral guess that keeps chains compact without inventing topology.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from swarm.records import UNKNOWN_LAYER_LATENCY_S, ServerRecord, node_spec
from swarm.router import RouteRequest, build_route_index, route
from swarm.types import Assignment, Hop, LayerRange, ModelSpec, NodeLoad

CLIENT_ID = "client:self"
UNKNOWN_RTT_S = 0.05


def believed(record: ServerRecord, measured_s: float | None) -> ServerRecord:
    """A record with the per-layer latency the client believes: the node's claim, but never faster than what the
    client measured of it (`SwarmClient` probes each node it may route to), and for a node it could not measure,
    never faster than the neutral guess. A record claiming absurd speed so no longer takes every chain."""
    claimed = record.layer_latency_s or UNKNOWN_LAYER_LATENCY_S
    floor = measured_s if measured_s is not None else UNKNOWN_LAYER_LATENCY_S
    return replace(record, layer_latency_s=max(claimed, floor))


def plan_chains(
    model: ModelSpec,
    records: Sequence[ServerRecord],
    client_rtt_s: Mapping[str, float],
    *,
    exclude: frozenset[str] = frozenset(),
    session_tokens: int = 0,
    relay: bool = False,
    alternates: int = 3,
) -> list[list[Hop]]:
    """The best chain over online servers, then alternates; [] when the layers are not covered."""
    online = [r for r in records if r.state == "online" and r.peer_id not in exclude]
    nodes = {r.peer_id: node_spec(r) for r in online}
    assignment = Assignment({r.peer_id: LayerRange(r.start, r.end) for r in online}, epoch=max(
        (r.epoch for r in online), default=0))
    load = {r.peer_id: NodeLoad(r.queue_len, r.sessions, r.free_kv_tokens) for r in online}

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        if CLIENT_ID in (a, b):
            peer = b if a == CLIENT_ID else a
            return client_rtt_s.get(peer, UNKNOWN_RTT_S)
        return (client_rtt_s.get(a, UNKNOWN_RTT_S) + client_rtt_s.get(b, UNKNOWN_RTT_S)) / 2

    # Records and RTTs are read afresh for every choice, so the index is built for this one.
    request = RouteRequest(CLIENT_ID, transport="relay" if relay else "push", alternates=alternates,
                           session_tokens=session_tokens)
    routes = route(build_route_index(model, nodes, assignment, rtt), request, load)
    return [list(r.hops) for r in routes]
