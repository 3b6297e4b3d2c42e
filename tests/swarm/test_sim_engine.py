"""The discrete-event simulator: determinism, conservation, churn, KV admission, end-to-end runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.sim.engine import simulate
from swarm.sim.policies import POLICY_NAMES
from swarm.sim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[2]
LAB6 = ROOT / "benchmarks" / "scenarios" / "lab-6.json"


def small_model(layers: int = 8) -> dict:
    return {"name": "toy", "num_layers": layers, "hidden_size": 4096, "layer_bytes": 1e9,
            "kv_bytes_per_token_per_layer": 1e5, "flops_per_token_per_layer": 1e9}


def toy_scenario(nodes: list[dict], *, rate: float = 2.0, duration: float = 60, output: int = 32,
                 prompt: int = 64, seed: int = 1, layers: int = 8) -> dict:
    return {
        "name": "toy", "seed": seed, "model": small_model(layers),
        "regions_rtt_ms": {"eu": {"eu": 10, "us": 80}, "us": {"us": 10}},
        "nodes": nodes,
        "clients": [{"region": "eu", "weight": 1}, {"region": "us", "weight": 1}],
        "workload": {"arrival_rate_per_s": rate, "prompt_tokens": prompt, "output_tokens": output,
                     "duration_s": duration},
    }


def gpu(nid: str, region: str = "eu", memory: float = 24, **extra) -> dict:
    return {"id": nid, "region": region, "memory_gb": memory, "layer_latency_ms": 1.0, "uplink_mbps": 1000,
            **extra}


def lab6(duration: float = 60.0):
    sc = parse_scenario(json.loads(LAB6.read_text()))
    return dataclasses.replace(sc, workload=dataclasses.replace(sc.workload, duration_s=duration))


def strip_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "scheduler_ms"}


def check_metrics(m: dict) -> None:
    for key in ("throughput_tokens_per_s", "per_token_latency_ms", "ttft_ms", "completed", "failed",
                "uncovered_s", "layers_moved", "scheduler_ms"):
        assert key in m
    assert set(m["per_token_latency_ms"]) == {"p50", "p95"} and set(m["ttft_ms"]) == {"p50", "p95"}
    assert set(m["scheduler_ms"]) == {"allocate", "route_p50"}
    # Conservation: every arrival ends completed, failed, or still pending when the run stops.
    assert m["completed"] + m["failed"] + m["pending"] == m["arrivals"]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_runs_the_six_node_lab(policy):
    m = simulate(lab6(), policy)
    check_metrics(m)
    assert m["completed"] > 0
    assert m["throughput_tokens_per_s"] > 0
    assert 0 < m["per_token_latency_ms"]["p50"] <= m["per_token_latency_ms"]["p95"]
    assert m["ttft_ms"]["p50"] > m["per_token_latency_ms"]["p50"]
    assert m["uncovered_s"] == 0


@pytest.mark.parametrize("policy", ["layerhive", "petals", "parallax"])
def test_same_seed_same_result(policy):
    a, b = simulate(lab6(40), policy), simulate(lab6(40), policy)
    assert strip_timing(a) == strip_timing(b)


def test_seed_changes_arrivals():
    sc = lab6(40)
    other = dataclasses.replace(sc, seed=sc.seed + 1)
    assert simulate(sc, "parallax")["arrivals"] != simulate(other, "parallax")["arrivals"]


def two_replicas(leave_s: float) -> dict:
    # Two full replicas of the 8-layer model; one node of the first leaves mid-run.
    nodes = [gpu("a1", leave_s=leave_s), gpu("a2"), gpu("b1"), gpu("b2")]
    return toy_scenario(nodes, rate=1.0, duration=60, output=256)


@pytest.mark.parametrize("policy", ["layerhive", "petals", "bprr"])
def test_leave_fails_over_when_a_chain_remains(policy):
    m = simulate(parse_scenario(two_replicas(leave_s=20.0)), policy)
    check_metrics(m)
    assert m["failovers"] > 0
    assert m["failed"] == 0  # a replacement chain existed: sessions replay there
    assert m["uncovered_s"] == 0


@pytest.mark.parametrize("policy", ["parallax", "exo"])
def test_leave_ends_answers_without_failover(policy):
    m = simulate(parse_scenario(two_replicas(leave_s=20.0)), policy)
    check_metrics(m)
    assert m["failed"] > 0


def test_no_chain_means_failures_and_uncovered_time():
    # Each node holds half the model: a single replica, so losing a1 breaks coverage for good.
    nodes = [gpu("a1", memory=7, leave_s=30.0), gpu("a2", memory=7)]
    sc = parse_scenario(toy_scenario(nodes, rate=1.0, duration=60, output=16))
    m = simulate(sc, "petals")
    check_metrics(m)
    assert m["uncovered_s"] == pytest.approx(30.0, abs=0.5)
    assert m["failed"] > 10  # arrivals after t=30 find no chain


def test_petals_fails_at_once_when_cache_is_full_but_layerhive_waits():
    # A KV budget for few sessions, many long requests: Petals refuses, ours queues.
    model_nodes = [gpu("a1", memory=12), gpu("a2", memory=12)]
    obj = toy_scenario(model_nodes, rate=5.0, duration=30, output=512, prompt=512)
    obj["model"]["kv_bytes_per_token_per_layer"] = 2e5
    sc = parse_scenario(obj)
    petals, ours = simulate(sc, "petals"), simulate(sc, "layerhive")
    check_metrics(petals)
    check_metrics(ours)
    assert petals["failed"] > 0
    assert ours["failed"] == 0
    assert ours["ttft_ms"]["p95"] > ours["ttft_ms"]["p50"]  # later requests waited for memory


def test_join_gets_layers_and_exo_reloads_everyone():
    nodes = [gpu("a1"), gpu("a2"), gpu("c1", join_s=20.0)]
    sc = parse_scenario(toy_scenario(nodes, rate=0.5, duration=60, output=16))
    m = simulate(sc, "exo")
    check_metrics(m)
    assert m["layers_moved"] > 0  # exo re-splits the ring on every join
    assert simulate(sc, "layerhive")["completed"] > 0


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_swarm_that_starts_empty(policy):
    nodes = [gpu("a1", join_s=5.0), gpu("a2", join_s=6.0)]
    m = simulate(parse_scenario(toy_scenario(nodes, rate=1.0, duration=40, output=16)), policy)
    check_metrics(m)
    assert m["uncovered_s"] >= 5.0  # nothing served before the first node loaded its layers
    assert m["completed"] > 0


def test_cli_json_and_bad_scenario(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "node.cli_simulate", "simulate", str(LAB6), "--policy", "parallax",
         "--policy", "exo", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert set(out) == {"parallax", "exo"}
    check_metrics(out["exo"])
    bad = tmp_path / "bad.json"
    obj = json.loads(LAB6.read_text())
    obj["nodes"][3]["memory_gb"] = "24GB"
    bad.write_text(json.dumps(obj))
    res = subprocess.run([sys.executable, "-m", "node.cli_simulate", "simulate", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'layerhive simulate: nodes[3].memory_gb: expected a positive number, got "24GB"'
    ]
