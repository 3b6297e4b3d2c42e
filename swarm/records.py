"""The record a node announces on the DHT, and its strict validation.

Pure code: records arrive from strangers, so `ServerRecord.from_dict` checks every
field's type and range and raises `RecordError` naming the bad field.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from swarm.types import ModelSpec, NodeSpec

STATES = ("joining", "online", "draining", "offline")
REACHABILITY = ("direct", "relayed", "unreachable")
QUANTIZATIONS = ("none", "int8", "int4")  # how a node holds its layers' weights (node.model.quant)
MAX_LAYERS = 1 << 12
# Epochs count re-plans, one per change of the swarm: 2^53 is beyond any swarm's life, exact as a float, and
# far from the 64-bit limit that `epoch + 1` would overflow when a node announces the next one.
MAX_EPOCH = (1 << 53) - 1
MAX_COUNT = 1 << 31  # free KV tokens, queue length, sessions


class RecordError(ValueError):
    pass


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str
    model: str
    start: int
    end: int
    state: str = "online"
    layer_latency_s: float = 0.0  # measured decode latency of one layer for one token
    prefill_s_per_token_per_layer: float = 0.0
    uplink_bps: float = 0.0
    memory_bytes: float = 0.0  # memory offered for weights plus KV cache
    free_kv_tokens: int = 0
    queue_len: int = 0
    sessions: int = 0
    reachability: str = "direct"
    region: str = ""
    epoch: int = 0  # the assignment epoch this range follows
    version: str = ""
    quant: str = "none"  # one of QUANTIZATIONS: the planner sizes the node's layers by it, verification its error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, num_layers: int | None = None) -> ServerRecord:
        if not isinstance(data, dict):
            raise RecordError(f"a record must be a map, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in data:
                if f.default is MISSING:
                    raise RecordError(f"{name}: missing")
                continue
            values[name] = _check(name, data[name], _REQUIRED.get(name) or type(f.default))
        record = cls(**values)
        record.validate(num_layers)
        return record

    def validate(self, num_layers: int | None = None) -> None:
        limit = num_layers if num_layers is not None else MAX_LAYERS
        if not 0 <= self.start < self.end <= limit:
            raise RecordError(f"start/end: range {self.start}:{self.end} is outside the model's {limit} layers")
        if self.state not in STATES:
            raise RecordError(f"state: {self.state!r} is not one of {STATES}")
        if self.reachability not in REACHABILITY:
            raise RecordError(f"reachability: {self.reachability!r} is not one of {REACHABILITY}")
        if self.quant not in QUANTIZATIONS:
            raise RecordError(f"quant: {self.quant!r} is not one of {QUANTIZATIONS}")
        for name in ("layer_latency_s", "prefill_s_per_token_per_layer", "uplink_bps", "memory_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise RecordError(f"{name}: must be a finite number >= 0, got {value}")
        if self.memory_bytes > 1e14:  # 100 TB on one node is a lie, not a GPU
            raise RecordError(f"memory_bytes: {self.memory_bytes:.3g} is not a plausible amount of memory")
        for name, most in (("free_kv_tokens", MAX_COUNT), ("queue_len", MAX_COUNT), ("sessions", MAX_COUNT),
                           ("epoch", MAX_EPOCH)):
            if not 0 <= getattr(self, name) <= most:
                raise RecordError(f"{name}: must be in [0, {most}], got {getattr(self, name)}")


_REQUIRED = {"peer_id": str, "model": str, "start": int, "end": int}


def _check(name: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise RecordError(f"{name}: expected {expected.__name__}, got {type(value).__name__}")
    if expected is str and len(value) > 256:
        raise RecordError(f"{name}: longer than 256 characters")
    return value


# What the planner assumes of a field a record leaves at 0 (not measured yet).
UNKNOWN_LAYER_LATENCY_S = 0.005  # until a node has served a step and measured itself
UNKNOWN_MEMORY_BYTES = 16e9
UNKNOWN_UPLINK_BPS = 100e6

# Claims are believed only within what hardware can do; beyond, they are taken at these bounds. A decode step
# of one layer is a dozen kernels at a few microseconds each, whatever the layer's size (a GPU's launch cost,
# a CPU's dispatch); prefill amortises that over a chunk's tokens. No volunteer machine has more than a few
# TB of memory, nor an uplink beyond 100 Gbit/s.
MIN_LAYER_LATENCY_S = 10e-6
MIN_PREFILL_S_PER_TOKEN_PER_LAYER = MIN_LAYER_LATENCY_S / 512
MAX_MEMORY_BYTES = 2e12
MAX_UPLINK_BPS = 100e9


def node_spec(record: ServerRecord, model: ModelSpec | None = None) -> NodeSpec:
    """The planner's view of a node, from its record: unmeasured figures get the neutral guesses above, and
    claims beyond what hardware can do are taken at the plausible bounds. With the `model`, its layers weigh
    what they do at the record's quantization."""
    return NodeSpec(
        node_id=record.peer_id,
        region=record.region or "unknown",
        memory_bytes=min(record.memory_bytes or UNKNOWN_MEMORY_BYTES, MAX_MEMORY_BYTES),
        layer_latency_s=max(record.layer_latency_s or UNKNOWN_LAYER_LATENCY_S, MIN_LAYER_LATENCY_S),
        prefill_s_per_token_per_layer=max(record.prefill_s_per_token_per_layer or UNKNOWN_LAYER_LATENCY_S / 20,
                                          MIN_PREFILL_S_PER_TOKEN_PER_LAYER),
        uplink_bps=min(record.uplink_bps or UNKNOWN_UPLINK_BPS, MAX_UPLINK_BPS),
        relayed=record.reachability == "relayed",
        layer_bytes=model.layer_bytes_at(record.quant) if model is not None and record.quant != "none" else 0.0,
    )
