"""Sustainable capacity: targets, the rate search, and what it reports."""

from __future__ import annotations

import math

import pytest

from swarm.sim.capacity import (
    UNLOADED_RATE_PER_S,
    Slo,
    common_slo,
    own_slo,
    search_capacity,
    static_swarm,
    unloaded_run,
)
from swarm.sim.scenario import parse_scenario


def toy(rate: float = 2.0) -> dict:
    gpu = {"memory_gb": 12, "layer_latency_ms": 1.0, "uplink_mbps": 1000}
    return {
        "name": "toy", "seed": 3,
        "model": {"name": "toy", "num_layers": 8, "hidden_size": 2048, "layer_bytes": 1e9,
                  "kv_bytes_per_token_per_layer": 2e5, "flops_per_token_per_layer": 1e9},
        "regions_rtt_ms": {"eu": {"eu": 10}},
        "nodes": [{"id": f"g{i}", "region": "eu", **gpu, **({"leave_s": 20} if i == 0 else {})} for i in range(4)]
        + [{"id": "late", "region": "eu", "join_s": 10, **gpu}],
        "clients": [{"region": "eu"}],
        "workload": {"arrival_rate_per_s": rate, "prompt_tokens": 64, "output_tokens": 32, "duration_s": 30},
    }


def metrics(p95_token: float, p95_ttft: float, failed: int = 0, arrivals: int = 100) -> dict:
    return {"arrivals": arrivals, "failed": failed, "pending": 0, "completed": arrivals - failed,
            "per_token_latency_ms": {"p50": p95_token / 2, "p95": p95_token},
            "ttft_ms": {"p50": p95_ttft / 2, "p95": p95_ttft}}


def test_a_target_names_what_a_run_misses():
    slo = Slo(token_p95_ms=100.0, ttft_p95_ms=1000.0)
    assert slo.why_not(metrics(90, 900)) == ""
    assert slo.why_not(metrics(90, 900, failed=1, arrivals=100)) == ""  # 1% is tolerated, not more
    assert "failed+pending 2/100" in slo.why_not(metrics(90, 900, failed=2))
    assert "p95 per-token" in slo.why_not(metrics(120, 900))
    assert "p95 TTFT" in slo.why_not(metrics(90, 1200))
    assert "p95 per-token" in slo.why_not(metrics(math.nan, 900))  # no token at all never meets it


def test_own_and_common_targets():
    a, b = metrics(100, 1000), metrics(60, 3000)
    assert own_slo(a) == Slo(200.0, 2000.0)
    # The best unloaded p50 token latency and p95 TTFT of any policy, doubled.
    assert common_slo({"a": a, "b": b}) == Slo(2 * 30.0, 2 * 1000.0)


def test_capacity_is_measured_on_the_static_swarm():
    sc = parse_scenario(toy())
    static = static_swarm(sc, 5.0, 40.0)
    assert {n.node_id for n in static.nodes} == {"g0", "g1", "g2", "g3"}  # the joiner is dropped...
    assert all(n.leave_s is None for n in static.nodes)  # ...and nobody leaves
    assert static.workload.arrival_rate_per_s == 5.0 and static.workload.duration_s == 40.0


@pytest.mark.parametrize("policy", ["layerhive", "petals"])
def test_the_search_brackets_the_highest_sustained_rate(policy):
    sc = parse_scenario(toy())
    unloaded = unloaded_run(sc, policy)
    slo = own_slo(unloaded)
    runs: dict[float, dict] = {}
    cap = search_capacity(sc, policy, slo, unloaded, min_sessions=60, steps=2, runs=runs)
    met = [r for r, why in cap.probes if not why]
    missed = [r for r, why in cap.probes if why]
    assert cap.rate_per_s >= UNLOADED_RATE_PER_S
    assert cap.rate_per_s == max([UNLOADED_RATE_PER_S, *met])
    assert missed and min(missed) > cap.rate_per_s  # bracketed from above
    assert min(missed) / cap.rate_per_s <= 2 ** (1 / 2**2) + 1e-9  # resolution of 2 bisection steps
    assert slo.why_not(runs[cap.rate_per_s]) == ""
    # A second search reuses the probes it shares with the first.
    again = search_capacity(sc, policy, slo, unloaded, min_sessions=60, steps=2, runs=runs)
    assert again.rate_per_s == cap.rate_per_s


def test_a_target_missed_unloaded_means_zero_capacity():
    sc = parse_scenario(toy())
    unloaded = unloaded_run(sc, "layerhive")
    cap = search_capacity(sc, "layerhive", Slo(1e-3, 1e-3), unloaded)
    assert cap.rate_per_s == 0 and cap.at_capacity is None
    assert len(cap.probes) == 1 and cap.probes[0][1].startswith("unloaded:")
