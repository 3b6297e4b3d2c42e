"""Live routing picks chains from DHT records and measured RTTs with the scheduler's DP router."""

from __future__ import annotations

from node.client.routing import plan_chains
from swarm.records import ServerRecord
from swarm.types import ModelSpec

MODEL = ModelSpec("m", 30, 576, layer_bytes=0.0, kv_bytes_per_token_per_layer=0.0, wire_bytes_per_element=4)


def record(peer: str, start: int, end: int, **fields) -> ServerRecord:
    fields = {"layer_latency_s": 0.001, "free_kv_tokens": 10_000, **fields}
    return ServerRecord(peer_id=peer, model="m", start=start, end=end, **fields)


def test_prefers_the_faster_replica_and_the_nearer_peer():
    records = [record("a", 0, 15), record("b-slow", 15, 30, layer_latency_s=0.02), record("b-fast", 15, 30),
               record("c-far", 0, 15)]
    rtt = {"a": 0.002, "b-slow": 0.002, "b-fast": 0.002, "c-far": 0.3}
    best = plan_chains(MODEL, records, rtt)[0]
    assert [(h.node_id, h.start, h.end) for h in best] == [("a", 0, 15), ("b-fast", 15, 30)]


def test_load_and_exclusions_steer_the_chain():
    records = [record("a", 0, 30, queue_len=40), record("x", 0, 10), record("y", 10, 30)]
    rtt = dict.fromkeys(("a", "x", "y"), 0.001)
    assert [h.node_id for h in plan_chains(MODEL, records, rtt)[0]] == ["x", "y"]
    without_y = plan_chains(MODEL, records, rtt, exclude=frozenset({"y"}))[0]
    assert [(h.node_id, h.start, h.end) for h in without_y] == [("x", 0, 10), ("a", 10, 30)]


def test_a_node_may_serve_a_sub_range_and_gaps_give_no_chain():
    records = [record("wide", 0, 20), record("tail", 10, 30, layer_latency_s=0.0002)]
    chain = plan_chains(MODEL, records, dict.fromkeys(("wide", "tail"), 0.001))[0]
    assert [(h.node_id, h.start, h.end) for h in chain] == [("wide", 0, 10), ("tail", 10, 30)]
    assert plan_chains(MODEL, [record("a", 0, 10), record("b", 12, 30)], {}) == []
    offline = [record("a", 0, 30, state="draining")]
    assert plan_chains(MODEL, offline, {}) == []
