"""Figures in words, the same way in every window: layer ranges, counts, peers, chains."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from swarm.types import Hop


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 replica', '2 replicas', '0 sessions'."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def layer_range(start: int, end: int) -> str:
    """A half-open range [start, end) of layers as people count them: 'layers 0–29' for 30 layers, 'layer 5'."""
    return f"layer {start}" if end - start == 1 else f"layers {start}–{end - 1}"


def layer_list(layers: Iterable[int]) -> str:
    """Layers, consecutive ones joined: [2, 3, 4, 7] -> 'layers 2–4, 7'."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    if not runs:
        return "no layers"
    text = ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)
    return f"layer {text}" if len(runs) == 1 and runs[0][0] == runs[0][1] else f"layers {text}"


def short_peer(peer_id: str) -> str:
    """The end of a peer id, enough to tell the nodes of one swarm apart: '…k3XbQ2'."""
    return "…" + peer_id[-6:]


def model_label(name: str) -> str:
    """A model's name without its hub owner or local directories: 'SmolLM2-135M-Instruct'."""
    return name.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def describe_chain(chain: Sequence[Hop], own_peer_id: str | None = None) -> str:
    """'layers 0–14 on …k3XbQ2 (your node) → layers 15–29 on …9fTr1a'."""
    return " → ".join(f"{layer_range(hop.start, hop.end)} on {short_peer(hop.node_id)}"
                      + (" (your node)" if hop.node_id == own_peer_id else "") for hop in chain)
