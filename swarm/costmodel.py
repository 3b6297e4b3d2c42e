"""Cost model: how long a node takes to run layers, what it can hold, and what a chain costs.

Pure arithmetic, no I/O. Units are SI throughout:
  * time in seconds (``_s``), memory and payloads in bytes, link speeds in **bits** per second
    (``uplink_bps``, like `NodeSpec.uplink_bps`), memory bandwidth in bytes per second (``_Bps``),
    compute in FLOP per second (``flops``).

Public API (stable; the simulator and the allocator/router/rebalancer use these):

    roofline_layer_latency_s(model, mem_bandwidth_Bps, flops, *, context_tokens=0,
                             bandwidth_efficiency=0.75, flops_efficiency=0.5) -> float
    roofline_prefill_s_per_token_per_layer(model, flops, *, flops_efficiency=0.5) -> float
    node_from_datasheet(node_id, region, model, *, memory_bytes, mem_bandwidth_Bps, flops,
                        uplink_bps=100e6, relayed=False) -> NodeSpec
    kv_bytes_per_layer(model, sessions, context_tokens) -> float
    weight_bytes_per_layer(model, node) -> float
    memory_needed_bytes(model, layers, *, sessions, context_tokens, embedding=False, lm_head=False,
                        layer_bytes=0.0) -> float
    layer_capacity(model, node, *, sessions=1, context_tokens=2048, embedding=False, lm_head=False) -> int
    range_fits(model, node, rng, *, sessions, context_tokens) -> bool
    batched_step_s(layer_latency_s, prefill_s_per_token_per_layer, batch) -> float | numpy.ndarray
    kv_share_bytes(model, memory_bytes, rng, *, layer_bytes=0.0) -> float
    batched_layer_s(node, batch) -> float
    stage_decode_s(node, layers, *, batch=1) -> float
    stage_prefill_s(node, layers, prompt_tokens) -> float
    node_rate_tokens_per_s(model, node, layers, *, batch=1) -> float
    transfer_s(payload_bytes, uplink_bps) -> float
    leg_s(rtt_s, payload_bytes, sender_uplink_bps, *, sender_relayed=False, receiver_relayed=False) -> float
    handover_s(model, rtt_s, sender, receiver=None) -> float
    loaded_step_s(layer_latency_s, prefill_s_per_token_per_layer, active_sessions, queue_len) -> float | ndarray
    loaded_layer_s(node, load) -> float
    kv_shortage_s(free_kv_tokens, session_tokens) -> float | numpy.ndarray
    kv_penalty_s(load, session_tokens) -> float
    chain_token_s(model, hops, nodes, rtt, *, client, sink=None, transport="push", load=None,
                  session_tokens=0, client_uplink_bps=100e6) -> float
    chain_prefill_s(model, hops, nodes, rtt, *, client, prompt_tokens, sink=None, transport="push",
                    client_uplink_bps=100e6) -> float
    region_rtt_matrix(nodes, rtt) -> tuple[list[str], numpy.ndarray]

Model of a chain (hops h_1..h_k on nodes n_1..n_k, client c, sink s defaulting to c):
  * "push" (stage to stage, Parallax style): c -> n_1 -> ... -> n_k -> s, k+1 one-way legs.
  * "relay" (client-centric, Petals style): c -> n_j -> c for every hop, 2k one-way legs.
  * one leg a->b = RTT(a,b)/2 + payload*8/uplink(a) + RELAY_EXTRA_LEG_S for each relayed endpoint.
  * the payload is one hidden state per token, except a token id (TOKEN_ID_BYTES) entering layer 0 or
    leaving the last layer when the swarm holds the embedding/LM head (model.head_bytes > 0).
  * compute of a hop = layers x per-layer decode latency x load; a node lacking free KV cache for the
    session costs NO_KV_PENALTY_S extra (Petals uses 10 s too), so it is used only as a last resort.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from itertools import pairwise

import numpy as np

from swarm.types import Hop, LayerRange, ModelSpec, NodeId, NodeLoad, NodeSpec, RttFn

Figure = float | np.ndarray  # the load formulas take one node's figures, or a whole table's as arrays

TOKEN_ID_BYTES = 4
DEFAULT_CLIENT_UPLINK_BPS = 100e6
# A relayed node's traffic takes a detour through a libp2p relay: roughly one extra
# short-haul half round trip per leg touching it.
RELAY_EXTRA_LEG_S = 0.025
NO_KV_PENALTY_S = 10.0
# One queued request ahead of us costs about one decode step of the node.
QUEUE_STEP_WEIGHT = 1.0

# Datasheet figures (memory bytes, memory bandwidth B/s, dense FP16 tensor FLOP/s) from scenario-format.md.
GPU_DATASHEET: dict[str, tuple[float, float, float]] = {
    "H100 SXM": (80e9, 3350e9, 989e12),
    "A100 SXM": (80e9, 2039e9, 312e12),
    "A100 PCIe": (40e9, 1555e9, 312e12),
    "L40S": (48e9, 864e9, 362e12),
    "A10": (24e9, 600e9, 125e12),
    "L4": (24e9, 300e9, 121e12),
    "V100": (32e9, 900e9, 125e12),
    "T4": (16e9, 320e9, 65e12),
    "RTX 4090": (24e9, 1008e9, 165e12),
    "RTX 3090": (24e9, 936e9, 71e12),
}


# --- single node: speed ---------------------------------------------------------------------------


def roofline_layer_latency_s(
    model: ModelSpec,
    mem_bandwidth_Bps: float,
    flops: float,
    *,
    context_tokens: int = 0,
    bandwidth_efficiency: float = 0.75,
    flops_efficiency: float = 0.5,
) -> float:
    """Decode latency of one token through one layer, from datasheet figures.

    Decode reads every weight (and the session's KV cache) once per token, so it is memory
    bound; the compute term only matters on bandwidth-rich, FLOP-poor parts. Datasheet peaks
    are never reached, hence the efficiencies.
    """
    bytes_read = model.layer_bytes + model.kv_bytes_per_token_per_layer * context_tokens
    memory_s = bytes_read / (mem_bandwidth_Bps * bandwidth_efficiency)
    compute_s = model.flops_per_layer / (flops * flops_efficiency)
    return max(memory_s, compute_s)


def roofline_prefill_s_per_token_per_layer(
    model: ModelSpec, flops: float, *, flops_efficiency: float = 0.5
) -> float:
    """Amortised prefill time of one prompt token in one layer: prefill is compute bound."""
    return model.flops_per_layer / (flops * flops_efficiency)


def node_from_datasheet(
    node_id: NodeId,
    region: str,
    model: ModelSpec,
    *,
    memory_bytes: float,
    mem_bandwidth_Bps: float,
    flops: float,
    uplink_bps: float = 100e6,
    relayed: bool = False,
) -> NodeSpec:
    """A NodeSpec whose speeds are roofline estimates (for nodes that have not been benchmarked)."""
    return NodeSpec(
        node_id=node_id,
        region=region,
        memory_bytes=memory_bytes,
        layer_latency_s=roofline_layer_latency_s(model, mem_bandwidth_Bps, flops),
        prefill_s_per_token_per_layer=roofline_prefill_s_per_token_per_layer(model, flops),
        uplink_bps=uplink_bps,
        relayed=relayed,
    )


def _maximum(a: Figure, b: Figure) -> Figure:
    """max(a, b), elementwise when either is a numpy array: one formula serves a node or a whole table."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


def batched_step_s(layer_latency_s: Figure, prefill_s_per_token_per_layer: Figure, batch: Figure) -> Figure:
    """One decode step of `batch` concurrent tokens through one layer (numbers, or numpy arrays elementwise).

    Memory bound (weights read once for the whole batch) until the batch's compute exceeds it,
    so batching is nearly free up to roughly layer_latency / prefill_per_token tokens.
    """
    return _maximum(layer_latency_s, _maximum(batch, 1) * prefill_s_per_token_per_layer)


def batched_layer_s(node: NodeSpec, batch: int) -> float:
    """`batched_step_s` of one node."""
    return batched_step_s(node.layer_latency_s, node.prefill_s_per_token_per_layer, batch)


def stage_decode_s(node: NodeSpec, layers: int, *, batch: int = 1) -> float:
    """One decode step of a stage of `layers` layers carrying `batch` concurrent tokens."""
    return layers * batched_layer_s(node, batch)


def stage_prefill_s(node: NodeSpec, layers: int, prompt_tokens: int) -> float:
    """Prefill of a whole prompt through a stage (never faster than one memory-bound pass)."""
    return layers * max(node.layer_latency_s, prompt_tokens * node.prefill_s_per_token_per_layer)


def node_rate_tokens_per_s(model: ModelSpec, node: NodeSpec, layers: int, *, batch: int = 1) -> float:
    """Decode tokens per second a node can push through a stage of `layers` layers.

    The lesser of its compute rate (batch tokens per step) and its uplink rate (one hidden state
    per token). Relayed nodes get a fifth of their uplink, as Petals assumes.
    """
    if layers <= 0:
        return 0.0
    compute_rate = max(batch, 1) / stage_decode_s(node, layers, batch=batch)
    uplink = node.uplink_bps * (0.2 if node.relayed else 1.0)
    network_rate = uplink / (8.0 * model.hidden_bytes_per_token)
    return min(compute_rate, network_rate)


# --- single node: memory --------------------------------------------------------------------------


def kv_bytes_per_layer(model: ModelSpec, sessions: float, context_tokens: int) -> float:
    """KV cache one layer needs to hold `sessions` concurrent sessions of `context_tokens` each."""
    return model.kv_bytes_per_token_per_layer * context_tokens * sessions


def weight_bytes_per_layer(model: ModelSpec, node: NodeSpec) -> float:
    """One layer's weights on `node`: what its quantization makes of them, else the model's size."""
    return node.layer_bytes or model.layer_bytes


def memory_needed_bytes(
    model: ModelSpec,
    layers: int,
    *,
    sessions: float,
    context_tokens: int,
    embedding: bool = False,
    lm_head: bool = False,
    layer_bytes: float = 0.0,
) -> float:
    """Weights + KV budget of `layers` layers, plus half the head bytes for each chain end held.

    `model.head_bytes` is the embedding plus the LM head; a node starting at layer 0 holds the
    embedding, one ending at the last layer holds the LM head (each about half). `layer_bytes`: a node's
    own bytes per layer (`weight_bytes_per_layer`); 0: the model's.
    """
    per_layer = (layer_bytes or model.layer_bytes) + kv_bytes_per_layer(model, sessions, context_tokens)
    head = model.head_bytes / 2 * (int(embedding) + int(lm_head))
    return layers * per_layer + head


def layer_capacity(
    model: ModelSpec,
    node: NodeSpec,
    *,
    sessions: float = 1,
    context_tokens: int = 2048,
    embedding: bool = False,
    lm_head: bool = False,
) -> int:
    """How many layers (at most the whole model) fit in the node's memory with the KV budget."""
    per_layer = weight_bytes_per_layer(model, node) + kv_bytes_per_layer(model, sessions, context_tokens)
    free = node.memory_bytes - model.head_bytes / 2 * (int(embedding) + int(lm_head))
    if free <= 0 or per_layer <= 0:
        return 0
    # A hair of tolerance so that a node sized exactly for n layers is not refused by rounding.
    return max(0, min(model.num_layers, math.floor(free / per_layer + 1e-9)))


def range_fits(
    model: ModelSpec, node: NodeSpec, rng: LayerRange, *, sessions: float, context_tokens: int
) -> bool:
    """Whether the node can hold `rng` (and the head parts its ends imply) with the KV budget."""
    need = memory_needed_bytes(
        model,
        len(rng),
        sessions=sessions,
        context_tokens=context_tokens,
        embedding=rng.start == 0,
        lm_head=rng.end == model.num_layers,
        layer_bytes=node.layer_bytes,
    )
    return rng.end <= model.num_layers and need <= node.memory_bytes * (1 + 1e-9)


def kv_share_bytes(model: ModelSpec, memory_bytes: float, rng: LayerRange, *, layer_bytes: float = 0.0) -> float:
    """The KV cache a node offering `memory_bytes` keeps for sessions once it holds `rng`: what the range's
    weights (`layer_bytes` each, as in `memory_needed_bytes`), and the head parts its ends imply, leave of its
    memory (never below 0). The allocator plans a node's KV room with it, and the node's server enforces it as
    its KV budget."""
    weights = memory_needed_bytes(model, len(rng), sessions=0, context_tokens=0, embedding=rng.start == 0,
                                  lm_head=rng.end == model.num_layers, layer_bytes=layer_bytes)
    return max(0.0, memory_bytes - weights)


# --- network --------------------------------------------------------------------------------------


def transfer_s(payload_bytes: float, uplink_bps: float) -> float:
    """Serialisation time of a payload on an uplink (bytes -> bits)."""
    return payload_bytes * 8.0 / uplink_bps


def leg_s(
    rtt_s: float,
    payload_bytes: float,
    sender_uplink_bps: float,
    *,
    sender_relayed: bool = False,
    receiver_relayed: bool = False,
) -> float:
    """One one-way hop of a token's hidden state: half the RTT plus the sender's serialisation."""
    relay = RELAY_EXTRA_LEG_S * (int(sender_relayed) + int(receiver_relayed))
    return rtt_s / 2.0 + transfer_s(payload_bytes, sender_uplink_bps) + relay


def handover_s(model: ModelSpec, rtt_s: float, sender: NodeSpec, receiver: NodeSpec | None = None) -> float:
    """A hand-over between stages: one token's hidden state from `sender` to `receiver` over a link of `rtt_s`
    (`receiver` None: an endpoint that is not a node, e.g. a client, so no relay detour on its side)."""
    return leg_s(rtt_s, model.hidden_bytes_per_token, sender.uplink_bps, sender_relayed=sender.relayed,
                 receiver_relayed=receiver is not None and receiver.relayed)


# --- load -----------------------------------------------------------------------------------------


def loaded_step_s(layer_latency_s: Figure, prefill_s_per_token_per_layer: Figure, active_sessions: Figure,
                  queue_len: Figure) -> Figure:
    """Expected per-layer time of one more decode token on a node under load (numbers, or numpy arrays
    elementwise: the router reads a whole load table with it).

    Joining `active_sessions` others in the batch costs the batched step time; every queued
    request ahead adds about one more step.
    """
    step = batched_step_s(layer_latency_s, prefill_s_per_token_per_layer, active_sessions + 1)
    return step * (1.0 + QUEUE_STEP_WEIGHT * queue_len)


def loaded_layer_s(node: NodeSpec, load: NodeLoad | None) -> float:
    """`loaded_step_s` of one node under `load` (None: no load announced, its unloaded latency)."""
    if load is None:
        return node.layer_latency_s
    return loaded_step_s(node.layer_latency_s, node.prefill_s_per_token_per_layer, load.active_sessions,
                         load.queue_len)


def kv_shortage_s(free_kv_tokens: Figure, session_tokens: int) -> Figure:
    """Extra cost of a node announcing `free_kv_tokens`, too few for the session's KV cache (0 if enough);
    numbers, or numpy arrays elementwise."""
    return NO_KV_PENALTY_S * (free_kv_tokens < max(session_tokens, 1))


def kv_penalty_s(load: NodeLoad | None, session_tokens: int) -> float:
    """`kv_shortage_s` of one node under `load` (None: no load announced, no penalty)."""
    if load is None:
        return 0.0
    return kv_shortage_s(load.free_kv_tokens, session_tokens)


# --- chains ---------------------------------------------------------------------------------------


def _endpoint_uplink(endpoint: str, nodes: Mapping[NodeId, NodeSpec], client_uplink_bps: float) -> float:
    node = nodes.get(endpoint)
    return node.uplink_bps if node is not None else client_uplink_bps


def _endpoint_relayed(endpoint: str, nodes: Mapping[NodeId, NodeSpec]) -> bool:
    node = nodes.get(endpoint)
    return node is not None and node.relayed


def _endpoint_leg_s(nodes: Mapping[NodeId, NodeSpec], rtt: RttFn, client_uplink_bps: float, a: str, b: str,
                    payload: float) -> float:
    """`leg_s` from endpoint `a` to endpoint `b`, each a node id or a client."""
    return leg_s(rtt(a, b), payload, _endpoint_uplink(a, nodes, client_uplink_bps),
                 sender_relayed=_endpoint_relayed(a, nodes), receiver_relayed=_endpoint_relayed(b, nodes))


def _payload_in(model: ModelSpec, layer: int) -> float:
    """Bytes per token entering `layer`: a token id at layer 0 if the swarm embeds, else a hidden state."""
    if layer == 0 and model.head_bytes > 0:
        return TOKEN_ID_BYTES
    return model.hidden_bytes_per_token


def _payload_out(model: ModelSpec, layer_end: int) -> float:
    """Bytes per token leaving a stage that ends at `layer_end`: a token id if it holds the LM head."""
    if layer_end == model.num_layers and model.head_bytes > 0:
        return TOKEN_ID_BYTES
    return model.hidden_bytes_per_token


def chain_token_s(
    model: ModelSpec,
    hops: Sequence[Hop],
    nodes: Mapping[NodeId, NodeSpec],
    rtt: RttFn,
    *,
    client: str,
    sink: str | None = None,
    transport: str = "push",
    load: Mapping[NodeId, NodeLoad] | None = None,
    session_tokens: int = 0,
    client_uplink_bps: float = DEFAULT_CLIENT_UPLINK_BPS,
) -> float:
    """Expected per-token decode latency of a chain (see the module docstring for the model).

    `client` sends the chain its input, `sink` (default: the client) receives its output; either
    may be a node id, e.g. when re-routing the missing layers around a dead stage.
    """
    if not hops:
        return 0.0
    sink = client if sink is None else sink
    load = load or {}
    total = 0.0
    for hop in hops:
        node = nodes[hop.node_id]
        node_load = load.get(hop.node_id)
        total += (hop.end - hop.start) * loaded_layer_s(node, node_load)
        total += kv_penalty_s(node_load, session_tokens)
    leg = partial(_endpoint_leg_s, nodes, rtt, client_uplink_bps)
    if transport == "push":
        total += leg(client, hops[0].node_id, _payload_in(model, hops[0].start))
        for prev, nxt in pairwise(hops):
            total += leg(prev.node_id, nxt.node_id, model.hidden_bytes_per_token)
        total += leg(hops[-1].node_id, sink, _payload_out(model, hops[-1].end))
    elif transport == "relay":
        for hop in hops:
            total += leg(client, hop.node_id, _payload_in(model, hop.start))
            total += leg(hop.node_id, sink, _payload_out(model, hop.end))
    else:
        raise ValueError(f"unknown transport {transport!r} (expected 'push' or 'relay')")
    return total


def chain_prefill_s(
    model: ModelSpec,
    hops: Sequence[Hop],
    nodes: Mapping[NodeId, NodeSpec],
    rtt: RttFn,
    *,
    client: str,
    prompt_tokens: int,
    sink: str | None = None,
    transport: str = "push",
    client_uplink_bps: float = DEFAULT_CLIENT_UPLINK_BPS,
) -> float:
    """Time to push a whole prompt through the chain (time to first token, without queueing).

    Prefill traffic is bandwidth bound: every leg carries `prompt_tokens` hidden states, except
    the token ids entering layer 0 / the sampled token leaving the LM head.
    """
    if not hops:
        return 0.0
    sink = client if sink is None else sink
    total = sum(stage_prefill_s(nodes[h.node_id], h.end - h.start, prompt_tokens) for h in hops)
    leg = partial(_endpoint_leg_s, nodes, rtt, client_uplink_bps)
    first_in = _payload_in(model, hops[0].start) * prompt_tokens
    last_out = _payload_out(model, hops[-1].end) * (1 if hops[-1].end == model.num_layers else prompt_tokens)
    hidden = model.hidden_bytes_per_token * prompt_tokens
    if transport == "push":
        total += leg(client, hops[0].node_id, first_in)
        for prev, nxt in pairwise(hops):
            total += leg(prev.node_id, nxt.node_id, hidden)
        total += leg(hops[-1].node_id, sink, last_out)
    elif transport == "relay":
        for i, hop in enumerate(hops):
            total += leg(client, hop.node_id, first_in if i == 0 else hidden)
            total += leg(hop.node_id, sink, last_out if i == len(hops) - 1 else hidden)
    else:
        raise ValueError(f"unknown transport {transport!r} (expected 'push' or 'relay')")
    return total


# --- regions --------------------------------------------------------------------------------------


def region_rtt_matrix(nodes: Iterable[NodeSpec], rtt: RttFn) -> tuple[list[str], np.ndarray]:
    """Regions (sorted) and their RTT matrix in seconds, probed with one representative pair each.

    The representative of a region is its node with the smallest id; a region's own entry is the
    RTT between its two smallest-id nodes (0 if it has only one). Costs O(regions^2) RTT calls,
    which is what lets the allocator and router reason about 1,000 nodes without 10^6 probes.
    """
    members: dict[str, list[NodeId]] = {}
    for node in nodes:
        members.setdefault(node.region, []).append(node.node_id)
    regions = sorted(members)
    reps = {r: sorted(ids)[:2] for r, ids in members.items()}
    matrix = np.zeros((len(regions), len(regions)))
    for i, a in enumerate(regions):
        for j in range(i, len(regions)):
            b = regions[j]
            if i == j:
                value = rtt(reps[a][0], reps[a][1]) if len(reps[a]) > 1 else 0.0
            else:
                value = rtt(reps[a][0], reps[b][0])
            matrix[i, j] = matrix[j, i] = value
    return regions, matrix
