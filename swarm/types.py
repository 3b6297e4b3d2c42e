"""The swarm's shared vocabulary: plain, immutable data with no I/O.

The allocator, the router, the rebalancer, the simulator and the live node all
speak in these types, so that the simulator runs the very functions the swarm
runs. Units are SI throughout: seconds, bytes, bits per second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

NodeId = str

# Round-trip time in seconds between two endpoints (node ids, or a client id such as
# "client:virginia"). Must be symmetric and return 0.0 for an endpoint and itself.
RttFn = Callable[[str, str], float]


@dataclass(frozen=True)
class ModelSpec:
    """What the scheduler needs to know of a model."""

    name: str
    num_layers: int
    hidden_size: int
    layer_bytes: float  # weights of one decoder layer at the serving dtype
    kv_bytes_per_token_per_layer: float  # K and V of one token in one layer
    head_bytes: float = 0.0  # embedding + LM head, for whoever holds the chain's ends
    flops_per_token_per_layer: float = 0.0  # 0 means "same as layer_bytes" (2 FLOPs / 16-bit weight)
    wire_bytes_per_element: int = 2  # hidden states cross the network as fp16/bf16
    quant_layer_bytes: tuple[tuple[str, float], ...] = ()  # (quantization, layer_bytes) for quantized weights

    @property
    def hidden_bytes_per_token(self) -> float:
        return float(self.hidden_size * self.wire_bytes_per_element)

    @property
    def flops_per_layer(self) -> float:
        return self.flops_per_token_per_layer or self.layer_bytes

    def layer_bytes_at(self, quant: str) -> float:
        """One layer's weights held at `quant` ("none" or one `quant_layer_bytes` lists: else the dense size)."""
        return dict(self.quant_layer_bytes).get(quant, self.layer_bytes)


@dataclass(frozen=True)
class NodeSpec:
    """A node's capabilities, as measured by `layerhive bench` or derived from a datasheet."""

    node_id: NodeId
    region: str
    memory_bytes: float  # memory the node offers for weights plus KV cache
    layer_latency_s: float  # decode: one token through one layer
    prefill_s_per_token_per_layer: float  # prefill: amortised time per prompt token per layer
    uplink_bps: float = 100e6
    relayed: bool = False  # reachable only through a libp2p relay
    layer_bytes: float = 0.0  # one layer's weights as this node holds them (quantized); 0: the model's layer_bytes


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers [start, end) of the model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class Assignment:
    """Which contiguous layer range each node serves; `epoch` orders successive plans."""

    ranges: Mapping[NodeId, LayerRange]
    epoch: int = 0


@dataclass(frozen=True)
class NodeLoad:
    """A node's live load, as announced in its DHT record."""

    queue_len: int = 0  # requests waiting for compute
    active_sessions: int = 0
    free_kv_tokens: int = 1 << 30  # KV-cache tokens it can still admit


@dataclass(frozen=True)
class Hop:
    """One stage of a chain: `node_id` runs layers [start, end) (possibly a sub-range of what it holds)."""

    node_id: NodeId
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    expected_token_s: float  # expected per-token latency of this chain
    details: Mapping[str, float] = field(default_factory=dict)
