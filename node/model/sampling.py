"""Sampling parameters and the sampler, shared by the client and by a chain's last stage.

The sampler draws the token at `position` from a generator seeded by (seed, position), not
from one generator advanced token by token: the token at a position depends only on the
logits there and the session's seed. So a chain rebuilt after a failure, or a ring whose
last stage samples (`node.serve.server`), picks exactly what the client would have picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MAX_STOP_TOKENS = 64
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh draw each time (a failover may then change the rest of the answer)
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(self.stop_token_ids)}")

    def is_last(self, token: int, produced: int) -> bool:
        """Whether generation ends with `token`, the `produced`-th token generated (counting from 1)."""
        return token in self.stop_token_ids or produced >= self.max_new_tokens

    def to_wire(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stop_token_ids)}

    @classmethod
    def from_wire(cls, fields: Any) -> SamplingParams:
        """Raises ValueError on anything but what `to_wire` makes."""
        if not isinstance(fields, dict) or set(fields) != {"max_new_tokens", "temperature", "top_p", "seed", "stop"}:
            raise ValueError("sampling must be a map of max_new_tokens, temperature, top_p, seed and stop")
        numbers = {k: fields[k] for k in ("temperature", "top_p")}
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()):
            raise ValueError(f"temperature and top_p must be numbers, got {numbers}")
        integers = [fields["max_new_tokens"], *fields["stop"]] if isinstance(fields["stop"], list) else None
        if integers is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in integers):
            raise ValueError("max_new_tokens and stop must be an integer and a list of integers")
        seed = fields["seed"]
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or null, got {seed!r}")
        return cls(fields["max_new_tokens"], float(numbers["temperature"]), float(numbers["top_p"]), seed,
                   tuple(fields["stop"]))


def position_generator(seed: int | None, position: int) -> torch.Generator | None:
    if seed is None:
        return None
    # splitmix-style mixing, so neighbouring (seed, position) pairs give unrelated streams
    mixed = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The weights a sampled token is drawn with: softmax at the temperature, cut to the top_p nucleus."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs  # not renormalised after the cut: multinomial needs no normalising


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Picks the token at `position` from the [vocab] logits computed for it."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = token_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=position_generator(params.seed, position)))
