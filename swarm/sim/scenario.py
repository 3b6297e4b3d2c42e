"""Parse and validate a swarm scenario (see shared/reference/scenario-format.md).

Pure: takes the already-decoded JSON object, returns immutable objects built on swarm.types.
Every rejection is a `ScenarioError` whose message starts with the path of the bad key,
e.g. `nodes[3].memory_gb: expected a positive number, got "24GB"`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from swarm.costmodel import roofline_layer_latency_s, roofline_prefill_s_per_token_per_layer
from swarm.types import ModelSpec, NodeSpec

DEFAULT_SELF_RTT_MS = 5.0
DEFAULT_UPLINK_MBPS = 100.0
# For a node that only reports a measured decode latency we still need its compute-bound time per
# token (prefill, large batches). Consumer and datacenter GPUs have a FLOP/byte ratio of ~70-300
# at peak; ~100 is a realistic achieved ratio, so flops-bound time per token ~ decode latency / 100.
MEASURED_ARITHMETIC_RATIO = 100.0


class ScenarioError(ValueError):
    """A malformed scenario; the message names the offending key path."""


@dataclass(frozen=True)
class SimNode:
    """A node of the scenario: its capabilities plus its lifetime in the simulation."""

    spec: NodeSpec
    join_s: float
    leave_s: float | None
    tflops: float | None = None  # datasheet values, when the scenario gives them
    mem_bandwidth_gbps: float | None = None

    @property
    def node_id(self) -> str:
        return self.spec.node_id


@dataclass(frozen=True)
class ClientSpec:
    region: str
    weight: float

    @property
    def endpoint(self) -> str:
        return client_endpoint(self.region)


@dataclass(frozen=True)
class Workload:
    arrival_rate_per_s: float
    prompt_tokens: int
    output_tokens: int
    duration_s: float


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    model: ModelSpec
    region_rtt_s: Mapping[tuple[str, str], float]  # both orders present, self entries included
    nodes: tuple[SimNode, ...]
    clients: tuple[ClientSpec, ...]
    workload: Workload

    def rtt_fn(self):
        """An RttFn over node ids and client endpoints ("client:<region>")."""
        region_of = {n.node_id: n.spec.region for n in self.nodes}
        region_of.update({c.endpoint: c.region for c in self.clients})
        table = self.region_rtt_s

        def rtt(a: str, b: str) -> float:
            if a == b:
                return 0.0
            ra = region_of.get(a) or _client_region(a)
            rb = region_of.get(b) or _client_region(b)
            return table[(ra, rb)]

        return rtt


def client_endpoint(region: str) -> str:
    return f"client:{region}"


def _client_region(endpoint: str) -> str:
    if endpoint.startswith("client:"):
        return endpoint[len("client:"):]
    raise KeyError(f"unknown endpoint {endpoint!r}")


_MISSING = object()


def _fmt(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _get(obj: Mapping, key: str, path: str, default: object = _MISSING) -> object:
    if key in obj:
        return obj[key]
    if default is _MISSING:
        raise ScenarioError(f"{path}.{key}: missing" if path else f"{key}: missing")
    return default


def _number(value: object, path: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and value in (float("inf"), float("-inf")):
        ok = False
    if ok and positive and not (value > 0 or (allow_zero and value == 0)):
        ok = False
    if not ok:
        kind = "a non-negative number" if allow_zero else ("a positive number" if positive else "a number")
        raise ScenarioError(f"{path}: expected {kind}, got {_fmt(value)}")
    return float(value)


def _integer(value: object, path: str, *, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ScenarioError(f"{path}: expected an integer >= {minimum}, got {_fmt(value)}")
    return value


def _mapping(value: object, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{path}: expected an object, got {_fmt(value)}")
    return value


def _list(value: object, path: str) -> list:
    if not isinstance(value, list) or not value:
        raise ScenarioError(f"{path}: expected a non-empty list, got {_fmt(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{path}: expected a non-empty string, got {_fmt(value)}")
    return value


def parse_scenario(obj: object) -> Scenario:
    """Validate `obj` (decoded JSON) and build a Scenario; raise ScenarioError naming the bad key."""
    root = _mapping(obj, "scenario")
    name = _string(_get(root, "name", "", "unnamed"), "name")
    seed = _integer(_get(root, "seed", "", 0), "seed", minimum=0)
    model = _parse_model(_mapping(_get(root, "model", ""), "model"))
    rtt = _parse_rtt(_mapping(_get(root, "regions_rtt_ms", ""), "regions_rtt_ms"))
    regions = {a for a, _ in rtt}
    nodes = _parse_nodes(_list(_get(root, "nodes", ""), "nodes"), model, regions)
    clients = _parse_clients(_list(_get(root, "clients", ""), "clients"), regions)
    workload = _parse_workload(_mapping(_get(root, "workload", ""), "workload"))
    return Scenario(name, seed, model, rtt, nodes, clients, workload)


def _parse_model(m: Mapping) -> ModelSpec:
    layer_bytes = _number(_get(m, "layer_bytes", "model"), "model.layer_bytes")
    flops = _get(m, "flops_per_token_per_layer", "model", None)
    return ModelSpec(
        name=_string(_get(m, "name", "model", "model"), "model.name"),
        num_layers=_integer(_get(m, "num_layers", "model"), "model.num_layers"),
        hidden_size=_integer(_get(m, "hidden_size", "model"), "model.hidden_size"),
        layer_bytes=layer_bytes,
        kv_bytes_per_token_per_layer=_number(
            _get(m, "kv_bytes_per_token_per_layer", "model"), "model.kv_bytes_per_token_per_layer"
        ),
        head_bytes=_number(_get(m, "head_bytes", "model", 0), "model.head_bytes", allow_zero=True),
        flops_per_token_per_layer=(
            layer_bytes if flops is None else _number(flops, "model.flops_per_token_per_layer")
        ),
    )


def _parse_rtt(r: Mapping) -> dict[tuple[str, str], float]:
    given: dict[tuple[str, str], float] = {}
    regions: set[str] = set()
    for a, row in r.items():
        regions.add(a)
        for b, ms in _mapping(row, f"regions_rtt_ms.{a}").items():
            regions.add(b)
            path = f"regions_rtt_ms.{a}.{b}"
            value = _number(ms, path, allow_zero=(a == b))
            if (b, a) in given and abs(given[(b, a)] - value) > 1e-9:
                other = f"regions_rtt_ms.{b}.{a} = {given[(b, a)]}"
                raise ScenarioError(f"{path}: {value} disagrees with {other}")
            given[(a, b)] = value
    table: dict[tuple[str, str], float] = {}
    for a in sorted(regions):
        for b in sorted(regions):
            ms = given.get((a, b), given.get((b, a)))
            if ms is None:
                if a != b:
                    raise ScenarioError(f"regions_rtt_ms.{a}.{b}: missing (neither triangle gives it)")
                ms = DEFAULT_SELF_RTT_MS
            table[(a, b)] = ms / 1000.0
    return table


def _parse_nodes(items: list, model: ModelSpec, regions: set[str]) -> tuple[SimNode, ...]:
    seen: set[str] = set()
    nodes = []
    for i, raw in enumerate(items):
        path = f"nodes[{i}]"
        n = _mapping(raw, path)
        node_id = _string(_get(n, "id", path), f"{path}.id")
        if node_id in seen:
            raise ScenarioError(f"{path}.id: duplicate node id {_fmt(node_id)}")
        seen.add(node_id)
        region = _string(_get(n, "region", path), f"{path}.region")
        if region not in regions:
            raise ScenarioError(f"{path}.region: unknown region {_fmt(region)} (not in regions_rtt_ms)")
        memory = _number(_get(n, "memory_gb", path), f"{path}.memory_gb") * 1e9
        uplink = _number(_get(n, "uplink_mbps", path, DEFAULT_UPLINK_MBPS), f"{path}.uplink_mbps") * 1e6
        join_s = _number(_get(n, "join_s", path, 0), f"{path}.join_s", allow_zero=True)
        leave_raw = _get(n, "leave_s", path, None)
        leave_s = None if leave_raw is None else _number(leave_raw, f"{path}.leave_s", allow_zero=True)
        if leave_s is not None and leave_s <= join_s:
            raise ScenarioError(f"{path}.leave_s: {leave_s} is not after join_s {join_s}")
        relayed = _get(n, "relayed", path, False)
        if not isinstance(relayed, bool):
            raise ScenarioError(f"{path}.relayed: expected true or false, got {_fmt(relayed)}")
        decode_s, prefill_s, tflops, bw = _node_speed(n, path, model)
        spec = NodeSpec(node_id, region, memory, decode_s, prefill_s, uplink, relayed)
        nodes.append(SimNode(spec, join_s, leave_s, tflops, bw))
    return tuple(nodes)


def _node_speed(n: Mapping, path: str, model: ModelSpec) -> tuple[float, float, float | None, float | None]:
    """(decode s/layer/token, compute-bound s/layer/token, datasheet tflops, datasheet GB/s)."""
    has_bw, has_tf = "mem_bandwidth_gbps" in n, "tflops" in n
    tflops = bw = None
    if has_bw or has_tf:
        if not has_tf:
            raise ScenarioError(f"{path}.tflops: missing (mem_bandwidth_gbps needs tflops)")
        if not has_bw:
            raise ScenarioError(f"{path}.mem_bandwidth_gbps: missing (tflops needs mem_bandwidth_gbps)")
        bw = _number(n["mem_bandwidth_gbps"], f"{path}.mem_bandwidth_gbps")
        tflops = _number(n["tflops"], f"{path}.tflops")
    if "layer_latency_ms" in n:
        decode = _number(n["layer_latency_ms"], f"{path}.layer_latency_ms") / 1000.0
        flops_bound = (
            roofline_prefill_s_per_token_per_layer(model, tflops * 1e12)
            if tflops
            else decode / MEASURED_ARITHMETIC_RATIO
        )
        return decode, min(flops_bound, decode), tflops, bw
    if tflops is None or bw is None:
        raise ScenarioError(f"{path}.layer_latency_ms: missing (give it, or mem_bandwidth_gbps and tflops)")
    # Roofline (swarm.costmodel, with realistic efficiencies): decode reads all of a layer's weights
    # once per step; prefill is compute bound.
    decode = roofline_layer_latency_s(model, bw * 1e9, tflops * 1e12)
    return decode, roofline_prefill_s_per_token_per_layer(model, tflops * 1e12), tflops, bw


def _parse_clients(items: list, regions: set[str]) -> tuple[ClientSpec, ...]:
    clients = []
    for i, raw in enumerate(items):
        path = f"clients[{i}]"
        c = _mapping(raw, path)
        region = _string(_get(c, "region", path), f"{path}.region")
        if region not in regions:
            raise ScenarioError(f"{path}.region: unknown region {_fmt(region)} (not in regions_rtt_ms)")
        weight = _number(_get(c, "weight", path, 1), f"{path}.weight")
        clients.append(ClientSpec(region, weight))
    return tuple(clients)


def _parse_workload(w: Mapping) -> Workload:
    return Workload(
        arrival_rate_per_s=_number(_get(w, "arrival_rate_per_s", "workload"), "workload.arrival_rate_per_s"),
        prompt_tokens=_integer(_get(w, "prompt_tokens", "workload"), "workload.prompt_tokens"),
        output_tokens=_integer(_get(w, "output_tokens", "workload"), "workload.output_tokens"),
        duration_s=_number(_get(w, "duration_s", "workload"), "workload.duration_s"),
    )
