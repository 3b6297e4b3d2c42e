"""Router: valid chains, optimal against brute-force enumeration, alternates, failover spans, speed."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.allocator import allocate
from swarm.costmodel import chain_token_s
from swarm.router import RouteRequest, build_route_index, route
from swarm.types import Assignment, Hop, LayerRange, ModelSpec, NodeLoad, NodeSpec

SMALL = ModelSpec("small", num_layers=8, hidden_size=1024, layer_bytes=1e8, kv_bytes_per_token_per_layer=1e4)
WITH_HEAD = ModelSpec("small-head", num_layers=8, hidden_size=1024, layer_bytes=1e8,
                      kv_bytes_per_token_per_layer=1e4, head_bytes=3e8)


def route_over(model, nodes, assignment, rtt, load=None, **request):
    """One request over a freshly built index."""
    return route(build_route_index(model, nodes, assignment, rtt), RouteRequest(**request), load)


def metric_rtt(points: dict[str, tuple[float, float]], region_of: dict[str, str], base_s: float = 0.004,
               last_mile: dict[str, float] | None = None):
    """RTT = base + distance between regions + each end's last mile: a metric."""
    last_mile = last_mile or {}

    def rtt(a: str, b: str) -> float:
        if a == b:
            return 0.0
        (xa, ya), (xb, yb) = points[region_of[a]], points[region_of[b]]
        return base_s + math.hypot(xa - xb, ya - yb) + last_mile.get(a, 0.0) + last_mile.get(b, 0.0)

    return rtt


def assert_valid_chain(route_hops, assignment: Assignment, start: int, end: int, exclude=frozenset()) -> None:
    assert route_hops, "a route has at least one hop"
    assert route_hops[0].start == start and route_hops[-1].end == end
    for hop, nxt in zip(route_hops, route_hops[1:], strict=False):
        assert hop.end == nxt.start, "hops are contiguous and in order"
    for hop in route_hops:
        held = assignment.ranges[hop.node_id]
        assert held.start <= hop.start < hop.end <= held.end, "a hop stays within its node's range"
        assert hop.node_id not in exclude


def brute_force_best(model, nodes, assignment, rtt, *, client, load, transport, start, end, exclude,
                     session_tokens):
    """Enumerate every chain over every integer boundary; return the least cost."""
    best = math.inf
    usable = [n for n in sorted(assignment.ranges) if n not in exclude]

    def extend(b: int, prev: str | None, hops: list[Hop]) -> None:
        nonlocal best
        if b == end:
            cost = chain_token_s(model, hops, nodes, rtt, client=client, transport=transport, load=load,
                                 session_tokens=session_tokens)
            best = min(best, cost)
            return
        for node_id in usable:
            held = assignment.ranges[node_id]
            if node_id == prev or not held.start <= b < held.end:
                continue
            for b2 in range(b + 1, min(held.end, end) + 1):
                extend(b2, node_id, [*hops, Hop(node_id, b, b2)])

    extend(start, None, [])
    return best


@st.composite
def small_swarm(draw):
    model = draw(st.sampled_from([SMALL, WITH_HEAD]))
    L = model.num_layers
    n_regions = draw(st.integers(1, 3))
    points = {f"r{i}": (draw(st.floats(0, 0.1)), draw(st.floats(0, 0.1))) for i in range(n_regions)}
    n_nodes = draw(st.integers(1, 5))
    nodes, ranges = {}, {}
    for i in range(n_nodes):
        s = draw(st.integers(0, L - 1))
        e = draw(st.integers(s + 1, L))
        node_id = f"n{i}"
        nodes[node_id] = NodeSpec(
            node_id, draw(st.sampled_from(sorted(points))), memory_bytes=1e12,
            layer_latency_s=draw(st.floats(0.001, 0.03)), prefill_s_per_token_per_layer=1e-5,
            uplink_bps=draw(st.sampled_from([10e6, 100e6, 1e9])), relayed=draw(st.booleans()),
        )
        ranges[node_id] = LayerRange(s, e)
    client_region = draw(st.sampled_from(sorted(points)))
    region_of = {n: spec.region for n, spec in nodes.items()} | {"client": client_region}
    last_mile = {n: draw(st.sampled_from([0.0, 0.003, 0.02])) for n in region_of} if draw(st.booleans()) else {}
    load = None
    if draw(st.booleans()):
        load = {n: NodeLoad(queue_len=draw(st.integers(0, 2)), active_sessions=draw(st.integers(0, 4)),
                            free_kv_tokens=draw(st.sampled_from([0, 10_000]))) for n in nodes}
    start = draw(st.integers(0, L - 1))
    end = draw(st.integers(start + 1, L))
    exclude = frozenset(n for n in nodes if draw(st.integers(0, 4)) == 0)
    transport = draw(st.sampled_from(["push", "relay"]))
    rtt = metric_rtt(points, region_of, last_mile=last_mile)
    return model, nodes, Assignment(ranges), rtt, load, start, end, exclude, transport


@settings(max_examples=300, deadline=None)
@given(small_swarm())
def test_route_is_optimal_and_valid_against_brute_force(case):
    model, nodes, assignment, rtt, load, start, end, exclude, transport = case
    routes = route_over(model, nodes, assignment, rtt, load, client="client", transport=transport, exclude=exclude,
                        start_layer=start, end_layer=end, session_tokens=100, alternates=2)
    expected = brute_force_best(model, nodes, assignment, rtt, client="client", load=load, transport=transport,
                                start=start, end=end, exclude=exclude, session_tokens=100)
    if math.isinf(expected):
        assert routes == []
        return
    assert routes, "a chain exists, so the router must find one"
    assert routes[0].expected_token_s == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for r in routes:
        assert_valid_chain(r.hops, assignment, start, end, exclude)
        cost = chain_token_s(model, r.hops, nodes, rtt, client="client", transport=transport, load=load,
                             session_tokens=100)
        assert r.expected_token_s == pytest.approx(cost)
    assert [r.expected_token_s for r in routes] == sorted(r.expected_token_s for r in routes)
    assert len({r.hops for r in routes}) == len(routes), "alternates differ from each other"


def test_alternates_are_node_disjoint_when_possible():
    # Three full replicas: the best uses one, the alternates the two others.
    rng = random.Random(1)
    nodes, ranges = {}, {}
    for rep in range(3):
        for k, (s, e) in enumerate([(0, 3), (3, 8)]):
            node_id = f"p{rep}-{k}"
            nodes[node_id] = NodeSpec(node_id, "r0", 1e12, rng.uniform(0.005, 0.01), 1e-5)
            ranges[node_id] = LayerRange(s, e)
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in nodes} | {"c": "r0"})
    routes = route_over(SMALL, nodes, Assignment(ranges), rtt, client="c", alternates=2)
    assert len(routes) == 3
    used = [set(h.node_id for h in r.hops) for r in routes]
    assert not (used[0] & used[1]) and not (used[0] & used[2]) and not (used[1] & used[2])


def test_alternates_differ_in_a_hop_when_disjoint_is_impossible():
    nodes = {n: NodeSpec(n, "r0", 1e12, 0.01, 1e-5) for n in ["a", "b", "c"]}
    ranges = {"a": LayerRange(0, 8), "b": LayerRange(0, 4), "c": LayerRange(4, 8)}
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in nodes} | {"x": "r0"})
    routes = route_over(SMALL, nodes, Assignment(ranges), rtt, client="x", alternates=3)
    assert len(routes) >= 2
    assert len({r.hops for r in routes}) == len(routes)


def test_failover_reroutes_only_the_missing_layers_between_stages():
    nodes = {n: NodeSpec(n, "r0", 1e12, 0.01, 1e-5) for n in ["a", "b", "b2", "c"]}
    ranges = {"a": LayerRange(0, 3), "b": LayerRange(3, 6), "b2": LayerRange(2, 7), "c": LayerRange(6, 8)}
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in [*nodes, "x"]})
    routes = route_over(SMALL, nodes, Assignment(ranges), rtt, client="a", sink="c", start_layer=3, end_layer=6,
                        exclude=frozenset({"b"}))
    assert [(h.node_id, h.start, h.end) for h in routes[0].hops] == [("b2", 3, 6)]


def test_no_route_when_a_layer_is_uncovered_or_everyone_is_excluded():
    nodes = {n: NodeSpec(n, "r0", 1e12, 0.01, 1e-5) for n in ["a", "b"]}
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in [*nodes, "x"]})
    gap = Assignment({"a": LayerRange(0, 3), "b": LayerRange(4, 8)})
    assert route_over(SMALL, nodes, gap, rtt, client="x") == []
    full = Assignment({"a": LayerRange(0, 8), "b": LayerRange(0, 8)})
    assert route_over(SMALL, nodes, full, rtt, client="x", exclude=frozenset({"a", "b"})) == []
    assert route_over(SMALL, nodes, Assignment({}), rtt, client="x") == []


def test_full_nodes_are_avoided_and_queues_count():
    nodes = {n: NodeSpec(n, "r0", 1e12, 0.01, 1e-5) for n in ["fast", "slow"]}
    nodes["fast"] = NodeSpec("fast", "r0", 1e12, 0.005, 1e-5)
    assignment = Assignment({"fast": LayerRange(0, 8), "slow": LayerRange(0, 8)})
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in [*nodes, "x"]})
    assert route_over(SMALL, nodes, assignment, rtt, client="x")[0].hops[0].node_id == "fast"
    full = {"fast": NodeLoad(free_kv_tokens=0)}
    assert route_over(SMALL, nodes, assignment, rtt, full, client="x", session_tokens=10)[0].hops[0].node_id == "slow"
    queued = {"fast": NodeLoad(queue_len=3)}
    assert route_over(SMALL, nodes, assignment, rtt, queued, client="x")[0].hops[0].node_id == "slow"


def test_route_on_a_thousand_nodes_is_fast():
    from benchmarks.scheduler_speed import LLAMA_2_70B, build_swarm

    nodes, rtt = build_swarm(1000, seed=3)
    node_map = {n.node_id: n for n in nodes}
    assignment = allocate(LLAMA_2_70B, nodes, rtt)
    index = build_route_index(LLAMA_2_70B, node_map, assignment, rtt)
    load = {n: NodeLoad(queue_len=i % 3, active_sessions=i % 5) for i, n in enumerate(node_map)}
    route(index, RouteRequest("client:virginia"))  # warm client RTTs
    times = []
    for _ in range(15):
        t0 = time.process_time()  # CPU time: other jobs may share this machine's cores
        routes = route(index, RouteRequest("client:virginia", alternates=0), load)
        times.append(time.process_time() - t0)
    assert_valid_chain(routes[0].hops, assignment, 0, 80)
    assert sorted(times)[len(times) // 2] < 0.010  # the 5 ms target, with slack for a loaded CI machine


@pytest.mark.parametrize("seed", range(4))
def test_region_aggregation_is_exact_with_last_mile_rtts(seed):
    # Oracle: the same swarm with one region per node, where the region matrix *is* the node RTT.
    import dataclasses

    model = ModelSpec("m", num_layers=24, hidden_size=4096, layer_bytes=1e9, kv_bytes_per_token_per_layer=4096)
    rng = random.Random(seed)
    points = {f"r{i}": (rng.uniform(0, 0.1), rng.uniform(0, 0.1)) for i in range(rng.choice([1, 2, 4]))}
    nodes = [NodeSpec(f"n{i}", rng.choice(sorted(points)), rng.choice([3, 5, 9, 13]) * 1e9,
                      rng.uniform(0.001, 0.004), 1e-5) for i in range(40)]
    region_of = {n.node_id: n.region for n in nodes} | {"c": "r0"}
    rtt = metric_rtt(points, region_of, last_mile={n: rng.uniform(0.005, 0.015) for n in region_of})
    assignment = allocate(model, nodes, rtt)
    got = route_over(model, nodes, assignment, rtt, client="c", alternates=0)[0]
    per_node = [dataclasses.replace(n, region=n.node_id) for n in nodes]
    exact = route_over(model, per_node, assignment, rtt, client="c", alternates=0)[0]
    assert got.expected_token_s == pytest.approx(exact.expected_token_s, rel=1e-9)


def all_chains(assignment, start, end, exclude):
    """Every chain over integer boundaries (consecutive hops on different nodes)."""
    usable = [n for n in sorted(assignment.ranges) if n not in exclude]
    out = []

    def extend(b, prev, hops):
        if b == end:
            out.append(tuple(hops))
            return
        for node_id in usable:
            held = assignment.ranges[node_id]
            if node_id == prev or not held.start <= b < held.end:
                continue
            for b2 in range(b + 1, min(held.end, end) + 1):
                extend(b2, node_id, [*hops, Hop(node_id, b, b2)])

    extend(start, None, [])
    return out


@settings(max_examples=200, deadline=None)
@given(small_swarm(), st.sampled_from([16, 512]), st.sampled_from([8, 128]), st.sampled_from([1.0, 4.0]))
def test_prefill_aware_route_minimises_the_whole_answer_against_brute_force(case, prompt, output, weight):
    """With a prompt, the best chain minimises decode + weight x prefill / output over every chain."""
    from swarm.costmodel import chain_prefill_s

    model, nodes, assignment, rtt, load, start, end, exclude, transport = case
    kw = dict(client="client", transport=transport, client_uplink_bps=100e6)
    routes = route_over(model, nodes, assignment, rtt, load, exclude=exclude, start_layer=start, end_layer=end,
                        session_tokens=100, alternates=1, prompt_tokens=prompt, output_tokens=output,
                        ttft_weight=weight, **kw)

    def objective(hops):
        return (chain_token_s(model, hops, nodes, rtt, load=load, session_tokens=100, **kw)
                + weight * chain_prefill_s(model, hops, nodes, rtt, prompt_tokens=prompt, **kw) / output)

    chains = all_chains(assignment, start, end, exclude)
    if not chains:
        assert routes == []
        return
    best = min(objective(h) for h in chains)
    assert routes[0].details["objective_s"] == pytest.approx(best, rel=1e-9, abs=1e-12)
    for r in routes:
        assert_valid_chain(r.hops, assignment, start, end, exclude)
        assert r.expected_token_s == pytest.approx(chain_token_s(model, r.hops, nodes, rtt, load=load,
                                                                 session_tokens=100, **kw))


@settings(max_examples=100, deadline=None)
@given(small_swarm())
def test_a_load_table_routes_exactly_like_the_same_loads_in_a_dict(case):
    from swarm.router import LoadTable

    model, nodes, assignment, rtt, load, start, end, exclude, transport = case
    table = LoadTable([*nodes, "someone-else"])
    for node_id, node_load in (load or {}).items():
        table.set(node_id, queue_len=node_load.queue_len, active_sessions=node_load.active_sessions,
                  free_kv_tokens=node_load.free_kv_tokens)
    assert dict(table) == dict(load or {})
    kw = dict(client="client", exclude=exclude, transport=transport, start_layer=start, end_layer=end,
              session_tokens=100, alternates=2)
    got = route_over(model, nodes, assignment, rtt, table, **kw)
    want = route_over(model, nodes, assignment, rtt, load, **kw)
    assert [r.expected_token_s for r in got] == pytest.approx([r.expected_token_s for r in want])
    if got:
        assert got[0].expected_token_s == pytest.approx(want[0].expected_token_s)


def test_remembered_unloaded_chains_never_hide_a_better_loaded_one():
    # The fastest node fills up between two requests: the second must not reuse the remembered chain.
    nodes = {n: NodeSpec(n, "r0", 1e12, lat, 1e-5) for n, lat in [("fast", 0.005), ("slow", 0.01)]}
    assignment = Assignment({"fast": LayerRange(0, 8), "slow": LayerRange(0, 8)})
    rtt = metric_rtt({"r0": (0, 0)}, {n: "r0" for n in [*nodes, "x"]})
    index = build_route_index(SMALL, nodes, assignment, rtt)  # one index: it remembers the unloaded best
    assert route(index, RouteRequest("x"))[0].hops[0].node_id == "fast"
    full = {"fast": NodeLoad(free_kv_tokens=0)}
    assert route(index, RouteRequest("x", session_tokens=10), full)[0].hops[0].node_id == "slow"
    assert route(index, RouteRequest("x", session_tokens=10), {})[0].hops[0].node_id == "fast"


def test_a_route_request_is_one_checked_value():
    nodes = {"a": NodeSpec("a", "r0", 1e12, 0.01, 1e-5)}
    index = build_route_index(SMALL, nodes, Assignment({"a": LayerRange(0, 8)}), lambda x, y: 0.0 if x == y else 0.01)
    with pytest.raises(ValueError, match="unknown transport 'pigeon'"):
        RouteRequest("x", transport="pigeon")
    with pytest.raises(ValueError, match=r"invalid layer span \[5, 3\)"):
        route(index, RouteRequest("x", start_layer=5, end_layer=3))
    whole = RouteRequest("x")
    assert whole.span(SMALL.num_layers) == (0, 8) and whole.destination == "x"
    assert {whole: 1}[RouteRequest("x")] == 1  # frozen and hashable: policies memoise routes on it
    assert route(index, whole)[0].hops == (Hop("a", 0, 8),)
