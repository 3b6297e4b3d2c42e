"""The chain's two ends, held by the client: token embedding in, final norm + LM head out.

Keeping them on the client means no volunteer ever sees token ids or logits, only
hidden states, and any node can serve any middle range. The LM head is the client's
one big matmul (vocab x hidden): `next_logits` runs it off the event loop, and the
last positions of all sessions waiting at that moment go through it together, so one
client serving many sessions (the API server) reads the head's weights once per round.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM

from node.checkpoint import ModelSource, load_embedding, load_head
from node.stage import stage_config


class ClientHead:
    def __init__(self, source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.dtype, self.device = dtype, torch.device(device)
        config = stage_config(source.config, 0, 0)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        norm_weight, lm_head_weight = load_head(source, dtype=dtype, device=device)
        weights = {
            "model.embed_tokens.weight": load_embedding(source, dtype=dtype, device=device),
            "model.norm.weight": norm_weight,
            "lm_head.weight": lm_head_weight,
        }
        model.load_state_dict(weights, strict=False, assign=True)
        self.embed_tokens = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.hidden_size = config.hidden_size
        self._pending: list[tuple[torch.Tensor, asyncio.Future]] = []  # last positions waiting for the LM head
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client-head")

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] ids -> [batch, tokens, hidden] states."""
        return self.embed_tokens(token_ids.to(self.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] states of the last layer -> [batch, tokens, vocab] logits (fp32)."""
        return self.lm_head(self.norm(hidden.to(device=self.device, dtype=self.dtype))).float()

    async def next_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[vocab] logits after the last position of `hidden` [1, tokens, hidden], batched with other callers."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((hidden[0, -1:], future))
        if len(self._pending) == 1:  # the first waiter runs the batch; later ones join it until it starts
            await asyncio.sleep(0)
            batch, self._pending = self._pending, []
            try:
                rows = await asyncio.get_running_loop().run_in_executor(
                    self._worker, self.logits, torch.cat([h for h, _ in batch]).unsqueeze(0)
                )
            except Exception as e:
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(e)
            else:
                for index, (_, waiter) in enumerate(batch):
                    if not waiter.done():
                        waiter.set_result(rows[0, index])
        return await future

