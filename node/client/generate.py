"""Token generation through a chain, in the spirit of gpt-fast: small functions, explicit positions.

`prefill` runs the prompt, `decode_one_token` one step, `generate` loops them and
yields token ids as they are decided.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import torch

from node.model.head import ClientHead
from node.model.sampling import SamplingParams, sample
from node.net.protocol import PREFILL_CHUNK_TOKENS


class Chain(Protocol):
    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor: ...


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
    logits = await prefill(chain, head, prompt_ids, 0)
    position = len(prompt_ids)
    for produced in range(1, params.max_new_tokens + 1):
        token = sample(logits, params, position)
        yield token
        if params.is_last(token, produced):
            return
        logits = await decode_one_token(chain, head, token, position)
        position += 1
