"""Token generation through a chain, in the spirit of gpt-fast: small functions, explicit positions.

`prefill` runs the prompt, `decode_one_token` one step, `generate` loops them and
yields token ids as they are decided.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from node.head import ClientHead

# Long prompts are sent in chunks so one message stays small and stages start sooner.
PREFILL_CHUNK_TOKENS = 512


class Chain(Protocol):
    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Picks the next token from [vocab] logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


async def prefill(chain: Chain, head: ClientHead, token_ids: Sequence[int], position: int) -> torch.Tensor:
    """Runs prompt tokens starting at `position`; returns the logits after the last one."""
    hidden = None
    for offset in range(0, len(token_ids), PREFILL_CHUNK_TOKENS):
        chunk = torch.tensor([list(token_ids[offset : offset + PREFILL_CHUNK_TOKENS])])
        hidden = await chain.step(head.embed(chunk), position + offset)
    assert hidden is not None, "prefill needs at least one token"
    return await head.next_logits(hidden)


async def decode_one_token(chain: Chain, head: ClientHead, token_id: int, position: int) -> torch.Tensor:
    hidden = await chain.step(head.embed(torch.tensor([[token_id]])), position)
    return await head.next_logits(hidden)


async def generate(
    chain: Chain, head: ClientHead, prompt_ids: Sequence[int], params: SamplingParams
) -> AsyncIterator[int]:
    """Yields generated token ids; stops after a stop token (which is yielded) or max_new_tokens."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    logits = await prefill(chain, head, prompt_ids, 0)
    position = len(prompt_ids)
    for produced in range(params.max_new_tokens):
        token = sample(logits, params, generator)
        yield token
        if token in params.stop_token_ids or produced + 1 == params.max_new_tokens:
            return
        logits = await decode_one_token(chain, head, token, position)
        position += 1
