"""Allocator: coverage, memory, determinism, network awareness, incremental changes."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.allocator import (
    allocate,
    kv_sessions_per_node,
    layer_capacity,
    layer_throughput,
    swarm_throughput,
    uncovered_layers,
    zones_of,
)
from swarm.costmodel import range_fits
from swarm.types import Assignment, LayerRange, ModelSpec, NodeSpec

GB = 1e9
MODEL = ModelSpec("m", num_layers=12, hidden_size=2048, layer_bytes=1 * GB, kv_bytes_per_token_per_layer=4096)
HEADED = ModelSpec("m-head", num_layers=12, hidden_size=2048, layer_bytes=1 * GB,
                   kv_bytes_per_token_per_layer=4096, head_bytes=1.2 * GB)
REGION_MS = {("us", "us"): 5, ("eu", "eu"): 5, ("asia", "asia"): 5, ("us", "eu"): 90, ("us", "asia"): 150,
             ("eu", "asia"): 160}


def make_rtt(nodes):
    region = {n.node_id: n.region for n in nodes}

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        ra, rb = region.get(a, a.split(":")[-1]), region.get(b, b.split(":")[-1])
        return REGION_MS.get((ra, rb), REGION_MS.get((rb, ra), 120)) / 1000

    return rtt


def node(i: int, memory_gb: float, latency_ms: float = 2.0, region: str = "us", **kw) -> NodeSpec:
    return NodeSpec(f"n{i:03d}", region, memory_gb * GB, latency_ms / 1000, latency_ms / 1000 / 200, **kw)


@st.composite
def swarms(draw, max_nodes: int = 14):
    model = draw(st.sampled_from([MODEL, HEADED]))
    count = draw(st.integers(1, max_nodes))
    nodes = [
        node(i, draw(st.sampled_from([0.5, 1.3, 2.5, 4.2, 6.5, 13.5, 30.0])),
             draw(st.floats(0.5, 10.0)), draw(st.sampled_from(["us", "eu", "asia"])),
             uplink_bps=draw(st.sampled_from([20e6, 100e6, 1e9])), relayed=draw(st.booleans()))
        for i in range(count)
    ]
    return model, nodes, draw(st.integers(1, 64))


def surely_coverable(model: ModelSpec, nodes, context_tokens: int = 2048) -> bool:
    """Sufficient: even if every node had to hold both head parts, their layers add up to the model."""
    return sum(layer_capacity(model, n, sessions=1, context_tokens=context_tokens, embedding=True, lm_head=True)
               for n in nodes) >= model.num_layers


def assert_memory_respected(model, nodes, assignment, sessions=1, context_tokens=2048):
    by_id = {n.node_id: n for n in nodes}
    for node_id, rng in assignment.ranges.items():
        assert range_fits(model, by_id[node_id], rng, sessions=sessions, context_tokens=context_tokens), (
            node_id, rng)


@settings(max_examples=200, deadline=None)
@given(swarms())
def test_covers_when_memory_allows_respects_memory_and_is_deterministic(case):
    model, nodes, sessions = case
    rtt = make_rtt(nodes)
    a = allocate(model, nodes, rtt, expected_sessions=sessions)
    share = kv_sessions_per_node(model, nodes, expected_sessions=sessions)
    assert_memory_respected(model, nodes, a, sessions=share)
    if surely_coverable(model, nodes):
        assert uncovered_layers(model, a) == []
    # Deterministic, whatever the order the nodes come in.
    shuffled = list(nodes)
    random.Random(7).shuffle(shuffled)
    assert allocate(model, shuffled, rtt, expected_sessions=sessions) == a
    useful = {n.node_id for n in nodes if layer_capacity(model, n, sessions=share) > 0}
    assert set(a.ranges) <= useful


def test_zero_capacity_nodes_are_left_out_and_one_node_takes_what_it_can():
    tiny = node(0, 0.2)
    assert allocate(MODEL, [tiny], make_rtt([tiny])).ranges == {}
    solo = node(1, 5.0)
    a = allocate(MODEL, [solo, tiny], make_rtt([solo, tiny]))
    assert list(a.ranges) == ["n001"] and len(a.ranges["n001"]) == layer_capacity(MODEL, solo, sessions=16)


def test_a_node_bigger_than_the_model_serves_it_whole():
    big = node(0, 80.0)
    a = allocate(HEADED, [big], make_rtt([big]))
    assert a.ranges == {"n000": LayerRange(0, 12)}


def test_water_filling_gives_faster_nodes_more_layers():
    # Each holds 10 of the 12 layers, so they must pipeline; the 3x faster one should take the lion's
    # share, capped by its memory.
    fast, slow = node(0, 10.5, latency_ms=1.0), node(1, 10.5, latency_ms=3.0)
    a = allocate(MODEL, [fast, slow], make_rtt([fast, slow]))
    assert len(a.ranges["n000"]) == 9 and len(a.ranges["n001"]) == 3


def test_pipelines_stay_inside_a_zone():
    nodes = [node(i, 6.5, region=("us" if i < 4 else "asia")) for i in range(8)]
    rtt = make_rtt(nodes)
    a = allocate(MODEL, nodes, rtt)
    zones = zones_of(nodes, rtt)
    for zone in set(zones.values()):
        members = {n: r for n, r in a.ranges.items() if zones[n] == zone}
        assert uncovered_layers(MODEL, members) == [], "each zone holds a whole chain by itself"


def test_relayed_and_slow_uplink_nodes_get_fewer_layers():
    plain = node(0, 10.5, latency_ms=2.0, region="us")
    relayed = node(1, 10.5, latency_ms=2.0, region="us", relayed=True, uplink_bps=10e6)
    a = allocate(MODEL, [plain, relayed], make_rtt([plain, relayed]))
    assert len(a.ranges["n000"]) > len(a.ranges["n001"])


def test_kv_budget_shrinks_before_coverage_is_lost():
    # Four nodes that hold 3 layers each only if they reserve little KV cache.
    kv_heavy = ModelSpec("kv", num_layers=12, hidden_size=2048, layer_bytes=1 * GB,
                         kv_bytes_per_token_per_layer=1e5)
    nodes = [node(i, 3.0 + 3 * 1e5 * 2048 * 1.5 / GB) for i in range(4)]
    a = allocate(kv_heavy, nodes, make_rtt(nodes), expected_sessions=64)
    assert uncovered_layers(kv_heavy, a) == []
    assert kv_sessions_per_node(kv_heavy, nodes, expected_sessions=64) >= 1


def _random_swarm(seed: int, count: int):
    rng = random.Random(seed)
    return [node(i, rng.choice([2.5, 4.2, 6.5, 13.5]), rng.uniform(0.7, 4.0), rng.choice(["us", "eu"]),
                 uplink_bps=rng.choice([50e6, 1e9])) for i in range(count)]


def _changed(before: Assignment, after: Assignment, survivors) -> int:
    return sum(1 for n in survivors if before.ranges.get(n) != after.ranges.get(n))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30))
def test_a_join_changes_no_existing_range_of_a_covered_swarm(seed, count):
    nodes = _random_swarm(seed, count + 1)
    rtt = make_rtt(nodes)
    before = allocate(MODEL, nodes[:-1], rtt)
    after = allocate(MODEL, nodes, rtt, previous=before, replan_threshold=float("inf"))
    assert nodes[-1].node_id in after.ranges
    assert len(uncovered_layers(MODEL, after)) <= len(uncovered_layers(MODEL, before))
    if not uncovered_layers(MODEL, before):  # else closing the gap may take a replan
        assert _changed(before, after, [n.node_id for n in nodes[:-1]]) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30))
def test_a_leave_changes_few_ranges_and_keeps_coverage(seed, count):
    nodes = _random_swarm(seed, count)
    rtt = make_rtt(nodes)
    before = allocate(MODEL, nodes, rtt)
    gone = random.Random(seed).choice(sorted(before.ranges))
    rest = [n for n in nodes if n.node_id != gone]
    after = allocate(MODEL, rest, rtt, previous=before, replan_threshold=float("inf"))
    assert gone not in after.ranges
    assert_memory_respected(MODEL, rest, after)
    if surely_coverable(MODEL, rest):
        assert uncovered_layers(MODEL, after) == []
    # With some redundancy, one move (or growing the hole's neighbours) suffices; a swarm that can barely
    # hold the model may have to be laid out afresh.
    if sum(layer_capacity(MODEL, n, sessions=1) for n in rest) >= 2 * MODEL.num_layers:
        assert _changed(before, after, [n.node_id for n in rest]) <= 3


def test_incremental_with_nothing_new_changes_nothing():
    nodes = _random_swarm(3, 20)
    rtt = make_rtt(nodes)
    a = allocate(MODEL, nodes, rtt)
    again = allocate(MODEL, nodes, rtt, previous=a)
    assert again.ranges == a.ranges and again.epoch == a.epoch


def test_global_replan_only_when_much_better():
    nodes = _random_swarm(5, 16)
    rtt = make_rtt(nodes)
    # A poor previous plan: everyone piled on the first layers except one chain.
    fresh = allocate(MODEL, nodes, rtt)
    poor = {n.node_id: LayerRange(0, 1) for n in nodes}
    poor[nodes[0].node_id] = LayerRange(0, 12) if range_fits(MODEL, nodes[0], LayerRange(0, 12), sessions=1,
                                                               context_tokens=2048) else poor[nodes[0].node_id]
    replanned = allocate(MODEL, nodes, rtt, previous=Assignment(poor, 3))
    assert swarm_throughput(MODEL, nodes, replanned) >= swarm_throughput(MODEL, nodes, fresh) / 1.25
    assert replanned.epoch == 4


def test_layer_throughput_sums_the_replicas():
    a, b = node(0, 40.0, latency_ms=1.0), node(1, 40.0, latency_ms=1.0)
    tp = layer_throughput(MODEL, [a, b], {"n000": LayerRange(0, 12), "n001": LayerRange(0, 6)})
    assert tp[0] > tp[11] > 0
    assert swarm_throughput(MODEL, [a, b], {"n000": LayerRange(0, 6)}) == 0.0
