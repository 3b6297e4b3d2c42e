"""The discrete-event simulator: determinism, conservation, churn, KV admission, end-to-end runs."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.sim.engine import POLICY_NAMES, simulate
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
        [sys.executable, "-m", "node.app.cli_simulate", "simulate", str(LAB6), "--policy", "parallax",
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
    res = subprocess.run([sys.executable, "-m", "node.app.cli_simulate", "simulate", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'layerhive simulate: nodes[3].memory_gb: expected a positive number, got "24GB"'
    ]


def test_measured_interval_limits_the_latency_percentiles_only():
    sc = parse_scenario(toy_scenario([gpu("a1"), gpu("a2")], rate=2.0, duration=40, output=32))
    everything = simulate(sc, "layerhive")
    assert strip_timing(simulate(sc, "layerhive", measure_from_s=0.0, measure_until_s=1e9)) == strip_timing(everything)
    none = simulate(sc, "layerhive", measure_from_s=1e9)
    for key in ("throughput_tokens_per_s", "completed", "failed", "arrivals"):
        assert none[key] == everything[key]  # counts and throughput cover every session...
    assert math.isnan(none["per_token_latency_ms"]["p50"]) and math.isnan(none["ttft_ms"]["p95"])  # ...latency not


def test_chain_ends_carry_token_ids_when_the_swarm_holds_the_head():
    # Push transport: with head_bytes > 0 the first stage embeds and the last samples, so the prompt
    # enters as token ids and one token comes back; with the head at the client, hidden states both ways.
    from swarm.sim.engine import CLIENT_UPLINK_BPS, POLICIES, Simulator
    from swarm.sim.policies import PolicyContext
    from swarm.types import Hop

    obj = toy_scenario([gpu("a1"), gpu("a2")])
    obj["model"]["head_bytes"] = 2e8
    with_head = parse_scenario(obj)
    without = parse_scenario(toy_scenario([gpu("a1"), gpu("a2")]))
    hops = [Hop("a1", 0, 4), Hop("a2", 4, 8)]

    def net(sc, tokens):
        ctx = PolicyContext(sc.model, sc.rtt_fn(), {n.node_id: n for n in sc.nodes}, 0, 96, 32, 1.0)
        return Simulator(sc, POLICIES["layerhive"](ctx))._net_s("client:eu", hops, tokens)

    hidden = with_head.model.hidden_bytes_per_token * 8
    saved = net(without, 512) - net(with_head, 512)
    assert saved == pytest.approx(512 * (hidden - 4 * 8) / CLIENT_UPLINK_BPS + (512 * hidden - 4 * 8) / 1000e6)


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["workload"].pop("output_tokens"), "workload.output_tokens: missing"),
    (lambda o: o["nodes"][2].update(region="mars"), 'nodes[2].region: unknown region "mars"'),
    (lambda o: o["clients"][0].update(weight=-1), "clients[0].weight: expected a positive number, got -1"),
    (lambda o: o["model"].update(num_layers=0), "model.num_layers: expected an integer >= 1, got 0"),
])
def test_cli_names_the_bad_key_and_exits_2(tmp_path, capsys, mutate, message):
    from node.app.cli_simulate import main

    obj = json.loads(LAB6.read_text())
    mutate(obj)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    assert main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"layerhive simulate: {message}")


def test_cli_unreadable_or_invalid_json_exits_2(tmp_path, capsys):
    from node.app.cli_simulate import main

    broken = tmp_path / "broken.json"
    broken.write_text("{\"name\": ")
    assert main(["simulate", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
