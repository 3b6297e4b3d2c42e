"""Cost model: roofline, memory, batching, network legs and chain latency, with hand-checked numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from swarm.costmodel import (
    GPU_DATASHEET,
    NO_KV_PENALTY_S,
    RELAY_EXTRA_LEG_S,
    TOKEN_ID_BYTES,
    batched_layer_s,
    chain_prefill_s,
    chain_token_s,
    handover_s,
    kv_penalty_s,
    kv_share_bytes,
    kv_shortage_s,
    layer_capacity,
    leg_s,
    loaded_layer_s,
    loaded_step_s,
    memory_needed_bytes,
    node_from_datasheet,
    node_rate_tokens_per_s,
    range_fits,
    region_rtt_matrix,
    roofline_layer_latency_s,
    roofline_prefill_s_per_token_per_layer,
    transfer_s,
)
from swarm.types import Hop, LayerRange, ModelSpec, NodeLoad, NodeSpec

LLAMA_70B = ModelSpec("llama-2-70b", num_layers=80, hidden_size=8192, layer_bytes=1.71e9,
                      kv_bytes_per_token_per_layer=4096, head_bytes=1.05e9, flops_per_token_per_layer=1.71e9)


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound():
    memory, bandwidth, flops = GPU_DATASHEET["RTX 4090"]
    decode = roofline_layer_latency_s(LLAMA_70B, bandwidth, flops)
    assert decode == pytest.approx(1.71e9 / (1008e9 * 0.75))  # ~2.26 ms, weights read once
    assert roofline_layer_latency_s(LLAMA_70B, bandwidth, flops, bandwidth_efficiency=1.0) == pytest.approx(
        1.71e9 / 1008e9)
    prefill = roofline_prefill_s_per_token_per_layer(LLAMA_70B, flops)
    assert prefill == pytest.approx(1.71e9 / (165e12 * 0.5))
    assert prefill < decode / 50  # a prompt token is far cheaper than a decode step
    node = node_from_datasheet("x", "r", LLAMA_70B, memory_bytes=memory, mem_bandwidth_Bps=bandwidth, flops=flops)
    assert node.layer_latency_s == decode and node.prefill_s_per_token_per_layer == prefill


def test_memory_and_layer_capacity():
    node = NodeSpec("x", "r", memory_bytes=24e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=1e-5)
    per_layer = 1.71e9 + 4096 * 2048 * 4  # weights + KV of 4 sessions of 2048 tokens
    assert layer_capacity(LLAMA_70B, node, sessions=4, context_tokens=2048) == int(24e9 // per_layer)
    with_head = int((24e9 - 1.05e9) // per_layer)
    assert layer_capacity(LLAMA_70B, node, sessions=4, context_tokens=2048, embedding=True,
                          lm_head=True) == with_head
    assert memory_needed_bytes(LLAMA_70B, 10, sessions=4, context_tokens=2048, embedding=True) == pytest.approx(
        10 * per_layer + 1.05e9 / 2)
    huge = NodeSpec("h", "r", memory_bytes=1e13, layer_latency_s=0.002, prefill_s_per_token_per_layer=1e-5)
    assert layer_capacity(LLAMA_70B, huge) == 80  # never more than the model
    tiny = NodeSpec("t", "r", memory_bytes=1e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=1e-5)
    assert layer_capacity(LLAMA_70B, tiny) == 0
    assert range_fits(LLAMA_70B, node, LayerRange(10, 10 + with_head), sessions=4, context_tokens=2048)
    assert not range_fits(LLAMA_70B, node, LayerRange(0, 14), sessions=4, context_tokens=2048)


def test_a_ranges_kv_share_is_what_its_weights_leave_and_what_range_fits_checks():
    middle, ends = LayerRange(10, 20), LayerRange(0, 80)
    assert kv_share_bytes(LLAMA_70B, 24e9, middle) == pytest.approx(24e9 - 10 * 1.71e9)
    assert kv_share_bytes(LLAMA_70B, 200e9, ends) == pytest.approx(200e9 - 80 * 1.71e9 - 1.05e9)  # both head halves
    assert kv_share_bytes(LLAMA_70B, 10e9, middle) == 0.0  # the weights alone do not fit: no KV, never negative
    # A range fits with s sessions exactly when its KV share holds s sessions' cache on each of its layers.
    node = NodeSpec("x", "r", memory_bytes=24e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=1e-5)
    for sessions in (1, 4, 16, 64, 256):
        session_kv = len(middle) * 4096 * 2048 * sessions
        fits = range_fits(LLAMA_70B, node, middle, sessions=sessions, context_tokens=2048)
        assert fits == (kv_share_bytes(LLAMA_70B, node.memory_bytes, middle) >= session_kv), sessions


def test_batching_is_free_until_compute_bound():
    node = NodeSpec("x", "r", 24e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=0.0001, uplink_bps=1e9)
    assert batched_layer_s(node, 1) == batched_layer_s(node, 20) == 0.002
    assert batched_layer_s(node, 40) == pytest.approx(0.004)
    assert node_rate_tokens_per_s(LLAMA_70B, node, 10, batch=20) == pytest.approx(20 / 0.02)
    # The uplink caps the rate: 1 Mbit/s carries 1e6 / (8 * 16 KiB) tokens/s.
    slow = NodeSpec("s", "r", 24e9, 0.002, 0.0001, uplink_bps=1e6)
    assert node_rate_tokens_per_s(LLAMA_70B, slow, 1) == pytest.approx(1e6 / (8 * 16384))


def test_load_and_kv_penalty():
    node = NodeSpec("x", "r", 24e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=0.0001)
    assert loaded_layer_s(node, None) == 0.002
    assert loaded_layer_s(node, NodeLoad(queue_len=2)) == pytest.approx(0.006)
    assert loaded_layer_s(node, NodeLoad(active_sessions=39)) == pytest.approx(0.004)
    assert kv_penalty_s(NodeLoad(free_kv_tokens=100), 1000) == NO_KV_PENALTY_S
    assert kv_penalty_s(NodeLoad(free_kv_tokens=5000), 1000) == 0.0


def test_one_load_formula_for_a_node_or_a_whole_table():
    # The router reads a table of loads as arrays with the very formulas that cost one node: same figures.
    nodes = [NodeSpec(f"n{i}", "r", 24e9, layer_latency_s=lat, prefill_s_per_token_per_layer=pre)
             for i, (lat, pre) in enumerate([(0.002, 1e-4), (0.001, 3e-5), (0.004, 2e-6), (0.0005, 5e-5)])]
    loads = [NodeLoad(0, 0, 0), NodeLoad(3, 39, 640), NodeLoad(1, 7, 5000), NodeLoad(0, 200, 639)]
    per_layer = loaded_step_s(np.array([n.layer_latency_s for n in nodes]),
                              np.array([n.prefill_s_per_token_per_layer for n in nodes]),
                              np.array([x.active_sessions for x in loads]), np.array([x.queue_len for x in loads]))
    assert per_layer.tolist() == [loaded_layer_s(n, x) for n, x in zip(nodes, loads, strict=True)]
    assert len(set(per_layer.tolist())) == 4  # memory bound, queued, compute bound: the cases differ
    penalty = kv_shortage_s(np.array([x.free_kv_tokens for x in loads]), 640)
    assert penalty.tolist() == [kv_penalty_s(x, 640) for x in loads] == [NO_KV_PENALTY_S, 0.0, 0.0, NO_KV_PENALTY_S]


def test_a_hand_over_is_the_chain_s_middle_leg():
    # What the allocator charges between two stages is exactly what a chain's cost adds for that leg.
    nodes, rtt, hops = _two_stage_swarm()
    for relayed in [(False, False), (True, False), (False, True), (True, True)]:
        spec = {n: dataclasses.replace(nodes[n], relayed=r) for n, r in zip("ab", relayed, strict=True)}
        total = chain_token_s(LLAMA_70B, hops, spec, rtt, client="c")
        compute = 40 * 0.001 + 40 * 0.002
        # The model's ends are held by the swarm: token ids enter and leave the chain.
        ends = (leg_s(rtt("c", "a"), TOKEN_ID_BYTES, 100e6, receiver_relayed=relayed[0])
                + leg_s(rtt("b", "c"), TOKEN_ID_BYTES, 1e9, sender_relayed=relayed[1]))
        assert handover_s(LLAMA_70B, rtt("a", "b"), spec["a"], spec["b"]) == pytest.approx(total - compute - ends)


def test_transfer_and_leg():
    assert transfer_s(16384, 100e6) == pytest.approx(16384 * 8 / 100e6)  # 1.31 ms for one Llama-70B state
    assert leg_s(0.090, 16384, 100e6) == pytest.approx(0.045 + 16384 * 8 / 100e6)
    assert leg_s(0.0, 0, 1e9, sender_relayed=True, receiver_relayed=True) == pytest.approx(2 * RELAY_EXTRA_LEG_S)


def _two_stage_swarm():
    nodes = {
        "a": NodeSpec("a", "r", 80e9, layer_latency_s=0.001, prefill_s_per_token_per_layer=1e-5, uplink_bps=1e9),
        "b": NodeSpec("b", "r", 80e9, layer_latency_s=0.002, prefill_s_per_token_per_layer=1e-5, uplink_bps=1e9),
    }
    rtts = {frozenset({"c", "a"}): 0.020, frozenset({"c", "b"}): 0.040, frozenset({"a", "b"}): 0.010}

    def rtt(x: str, y: str) -> float:
        return 0.0 if x == y else rtts[frozenset({x, y})]

    return nodes, rtt, (Hop("a", 0, 40), Hop("b", 40, 80))


def test_push_chain_crosses_k_plus_one_legs():
    nodes, rtt, hops = _two_stage_swarm()
    compute = 40 * 0.001 + 40 * 0.002
    token_in = 4 * 8 / 100e6  # the client sends a token id (the swarm holds the embedding)
    hidden = 16384 * 8 / 1e9
    token_out = 4 * 8 / 1e9  # the LM head's holder sends back a token id
    expected = compute + (0.020 / 2 + token_in) + (0.010 / 2 + hidden) + (0.040 / 2 + token_out)
    assert chain_token_s(LLAMA_70B, hops, nodes, rtt, client="c") == pytest.approx(expected)


def test_relay_chain_crosses_two_legs_per_stage():
    nodes, rtt, hops = _two_stage_swarm()
    compute = 40 * 0.001 + 40 * 0.002
    up_hidden, up_token = 16384 * 8 / 100e6, 4 * 8 / 100e6
    down_hidden, down_token = 16384 * 8 / 1e9, 4 * 8 / 1e9
    legs = (0.010 + up_token) + (0.010 + down_hidden) + (0.020 + up_hidden) + (0.020 + down_token)
    relay = chain_token_s(LLAMA_70B, hops, nodes, rtt, client="c", transport="relay")
    assert relay == pytest.approx(compute + legs)
    assert relay > chain_token_s(LLAMA_70B, hops, nodes, rtt, client="c")
    with pytest.raises(ValueError):
        chain_token_s(LLAMA_70B, hops, nodes, rtt, client="c", transport="carrier-pigeon")


def test_prefill_is_bandwidth_bound_on_the_wire():
    nodes, rtt, hops = _two_stage_swarm()
    ttft = chain_prefill_s(LLAMA_70B, hops, nodes, rtt, client="c", prompt_tokens=512)
    compute = 40 * max(0.001, 512 * 1e-5) + 40 * max(0.002, 512 * 1e-5)
    wire = 512 * 4 * 8 / 100e6 + 512 * 16384 * 8 / 1e9 + 4 * 8 / 1e9
    assert ttft == pytest.approx(compute + wire + 0.035)


def test_region_rtt_matrix_probes_one_pair_per_region_pair():
    nodes = [NodeSpec(f"{r}{i}", r, 1e9, 0.001, 1e-5) for r in ["eu", "us"] for i in range(3)]
    calls = []

    def rtt(a: str, b: str) -> float:
        calls.append((a, b))
        return 0.005 if a[:2] == b[:2] else 0.09

    regions, matrix = region_rtt_matrix(nodes, rtt)
    assert regions == ["eu", "us"]
    assert matrix.tolist() == [[0.005, 0.09], [0.09, 0.005]]
    assert len(calls) == 3
