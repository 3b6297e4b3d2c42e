"""A stage: decoder layers [start, end) of a model, run with one KV cache per session.

We reuse transformers' own `XxxModel` (Llama, Qwen2, Mistral) built with only the
stage's layers, fed `inputs_embeds` and explicit positions, so attention masks,
rotary embeddings and sliding windows are exactly the library's. Embeddings and the
final norm are not part of a stage: the client holds them (see `node.head`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoModel, DynamicCache, PretrainedConfig

from node.checkpoint import ModelSource, load_layers


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is slow and lossy there), bf16/fp16 on accelerators."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def stage_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The model's config cut down to layers [start, end)."""
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # per-layer attention kinds (e.g. sliding window) follow the layers
        cut.layer_types = list(layer_types[start:end])
    return cut


@dataclass(frozen=True)
class StageShape:
    hidden_size: int
    num_layers: int
    kv_bytes_per_token: int  # K and V of one token across all of this stage's layers


class Stage:
    """Runs hidden states through layers [start, end); stateless apart from the caches it hands out."""

    def __init__(
        self, source: ModelSource, start: int, end: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        if not 0 <= start < end <= source.num_layers:
            raise ValueError(
                f"layer range {start}:{end} is outside {source.name}, which has {source.num_layers} layers"
            )
        self.source, self.start, self.end = source, start, end
        self.dtype, self.device = dtype, device
        self.config = stage_config(source.config, start, end)
        with torch.device("meta"):
            model = AutoModel.from_config(self.config, dtype=dtype)
        model.embed_tokens = None
        model.norm = torch.nn.Identity()  # the final norm belongs to the client's head
        weights = load_layers(source, start, end, dtype=dtype, device=device)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or any(key.startswith("layers.") for key in missing):
            raise ValueError(f"checkpoint of {source.name} does not fit layers {start}:{end}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        # Non-persistent buffers (rotary frequencies) cannot live on the meta device.
        model.rotary_emb = type(model.rotary_emb)(config=self.config).to(device)
        self.model = model.eval()
        self.shape = StageShape(
            hidden_size=self.config.hidden_size,
            num_layers=end - start,
            kv_bytes_per_token=kv_bytes_per_token(self.config, dtype) * (end - start),
        )

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, position: int, cache: DynamicCache) -> torch.Tensor:
        """Runs `hidden` [batch, tokens, hidden] whose first token sits at `position`; extends `cache`."""
        tokens = hidden.shape[1]
        positions = torch.arange(position, position + tokens, device=self.device).unsqueeze(0)
        out = self.model(
            inputs_embeds=hidden.to(device=self.device, dtype=self.dtype),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V of one token in one layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8
