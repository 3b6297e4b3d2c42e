"""Scenario parsing: the documented format, its defaults, and errors that name the bad key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from swarm.sim.scenario import DEFAULT_SELF_RTT_MS, ScenarioError, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"

EXAMPLE = {
    "name": "two-continents-12",
    "seed": 7,
    "model": {
        "name": "meta-llama/Llama-2-70b-hf", "num_layers": 80, "hidden_size": 8192, "layer_bytes": 1.71e9,
        "kv_bytes_per_token_per_layer": 4096, "head_bytes": 1.05e9, "flops_per_token_per_layer": 1.71e9,
    },
    "regions_rtt_ms": {"frankfurt": {"frankfurt": 4, "virginia": 90}, "virginia": {"virginia": 4}},
    "nodes": [
        {"id": "a100-fra-1", "region": "frankfurt", "memory_gb": 80, "mem_bandwidth_gbps": 2039, "tflops": 312,
         "uplink_mbps": 1000, "join_s": 0, "leave_s": None},
        {"id": "4090-va-1", "region": "virginia", "memory_gb": 24, "layer_latency_ms": 1.9, "uplink_mbps": 40},
    ],
    "clients": [{"region": "virginia", "weight": 2}, {"region": "frankfurt", "weight": 1}],
    "workload": {"arrival_rate_per_s": 0.5, "prompt_tokens": 512, "output_tokens": 128, "duration_s": 600},
}


def mutate(fn) -> dict:
    obj = copy.deepcopy(EXAMPLE)
    fn(obj)
    return obj


def test_example_from_the_format_document_parses():
    sc = parse_scenario(EXAMPLE)
    assert sc.name == "two-continents-12" and sc.seed == 7
    assert sc.model.num_layers == 80 and sc.model.head_bytes == 1.05e9
    a100, rtx = sc.nodes
    assert a100.spec.memory_bytes == 80e9 and a100.spec.uplink_bps == 1000e6
    assert a100.tflops == 312 and a100.mem_bandwidth_gbps == 2039
    # Roofline: memory bound decode, compute bound prefill.
    assert a100.spec.layer_latency_s > a100.spec.prefill_s_per_token_per_layer > 0
    assert rtx.spec.layer_latency_s == pytest.approx(1.9e-3)
    assert rtx.spec.uplink_bps == 40e6
    rtt = sc.rtt_fn()
    assert rtt("a100-fra-1", "4090-va-1") == pytest.approx(0.090)
    assert rtt("client:virginia", "a100-fra-1") == pytest.approx(0.090)
    assert rtt("client:virginia", "4090-va-1") == pytest.approx(0.004)
    assert rtt("a100-fra-1", "a100-fra-1") == 0.0


def test_defaults_are_applied():
    def strip(o):
        del o["regions_rtt_ms"]["virginia"]  # self RTT -> default; pair given by the other triangle
        o["nodes"][1] = {"id": "x", "region": "virginia", "memory_gb": 24, "layer_latency_ms": 2}
        del o["model"]["head_bytes"]
        del o["model"]["flops_per_token_per_layer"]
        o["extra_key"] = {"ignored": True}

    sc = parse_scenario(mutate(strip))
    node = sc.nodes[1]
    assert node.spec.uplink_bps == 100e6
    assert node.join_s == 0 and node.leave_s is None
    assert sc.model.head_bytes == 0
    assert sc.model.flops_per_token_per_layer == sc.model.layer_bytes
    assert sc.region_rtt_s[("virginia", "virginia")] == pytest.approx(DEFAULT_SELF_RTT_MS / 1000)
    assert sc.region_rtt_s[("virginia", "frankfurt")] == pytest.approx(0.090)


def test_lower_triangle_is_accepted():
    sc = parse_scenario(mutate(lambda o: o.update(regions_rtt_ms={
        "frankfurt": {"frankfurt": 4}, "virginia": {"frankfurt": 90, "virginia": 4}})))
    assert sc.region_rtt_s[("frankfurt", "virginia")] == pytest.approx(0.090)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda o: o["nodes"][1].update(memory_gb="24GB"),
         'nodes[1].memory_gb: expected a positive number, got "24GB"'),
        (lambda o: o["model"].pop("num_layers"), "model.num_layers: missing"),
        (lambda o: o["model"].update(num_layers=0), "model.num_layers: expected an integer >= 1"),
        (lambda o: o["nodes"][0].update(region="tokyo"), 'nodes[0].region: unknown region "tokyo"'),
        (lambda o: o["clients"][1].update(region="mars"), 'clients[1].region: unknown region "mars"'),
        (lambda o: o["nodes"][0].pop("tflops"), "nodes[0].tflops: missing"),
        (lambda o: o["nodes"][1].pop("layer_latency_ms"), "nodes[1].layer_latency_ms: missing"),
        (lambda o: o["nodes"][1].update(id="a100-fra-1"), 'nodes[1].id: duplicate node id "a100-fra-1"'),
        (lambda o: o["nodes"][0].update(leave_s=-3), "nodes[0].leave_s: expected a non-negative number"),
        (lambda o: o["nodes"][0].update(join_s=100, leave_s=50), "nodes[0].leave_s: 50.0 is not after join_s"),
        (lambda o: o["nodes"][0].update(uplink_mbps=True), "nodes[0].uplink_mbps: expected a positive number"),
        (lambda o: o.update(nodes=[]), "nodes: expected a non-empty list"),
        (lambda o: o.pop("workload"), "workload: missing"),
        (lambda o: o["workload"].update(duration_s="long"), "workload.duration_s: expected a positive number"),
        (lambda o: o["regions_rtt_ms"]["frankfurt"].pop("virginia"),
         "regions_rtt_ms.frankfurt.virginia: missing"),
        (lambda o: o["regions_rtt_ms"]["virginia"].update(frankfurt=80),
         "regions_rtt_ms.virginia.frankfurt: 80.0 disagrees"),
        (lambda o: o["regions_rtt_ms"].update(virginia=[4]), "regions_rtt_ms.virginia: expected an object"),
        (lambda o: o.update(model=None), "model: expected an object"),
    ],
)
def test_malformed_input_names_the_bad_key(fn, message):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(mutate(fn))
    assert str(err.value).startswith(message), str(err.value)


def test_non_object_root_is_rejected():
    with pytest.raises(ScenarioError, match="scenario: expected an object"):
        parse_scenario([1, 2])


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_scenarios_parse(path):
    sc = parse_scenario(json.loads(path.read_text()))
    assert sc.nodes and sc.clients
