"""The chain's two ends, held by the client: token embedding in, final norm + LM head out.

Keeping them on the client means no volunteer ever sees token ids or logits, only
hidden states, and any node can serve any middle range.
"""

from __future__ import annotations

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

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] ids -> [batch, tokens, hidden] states."""
        return self.embed_tokens(token_ids.to(self.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] states of the last layer -> [batch, tokens, vocab] logits (fp32)."""
        return self.lm_head(self.norm(hidden.to(device=self.device, dtype=self.dtype))).float()
