"""Shared fixtures: tiny random checkpoints (fast, many shards) and the embedded default model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TINY_ARCHS = ("llama", "qwen2", "mistral", "llama3", "qwen3", "phi3", "gemma3")
TINY_VOCAB = 256
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = ["system", "user", "assistant", "hello", "hi", "the", "a", "is", "of", "what", "capital", "paris"]


def tiny_config(arch: str, num_layers: int):
    """A tiny config of `arch`: hidden 64, 4 heads, 2 KV heads (GQA), vocab 256, each architecture's own
    features switched on (Llama 3 rope scaling, Qwen3 q/k norms, Phi-3 partial rotary and a sliding window,
    Gemma 3 sandwich norms, q/k norms, local and global layers with their own rope bases)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":  # Qwen2 has q/k/v biases; small Qwen2 models tie the lm_head to the embedding
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=16)
    if arch == "llama3":  # Llama 3.x: rope scaled past an original context shorter than the test sequences
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
        return LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if arch == "phi3":
        rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
        return Phi3Config(**common, tie_word_embeddings=False, sliding_window=16, rope_parameters=rope)
    if arch == "gemma3":  # every third layer global, the others local with a window of 8
        kinds = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]
        rope = {"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                "full_attention": dict(rope_type="default", rope_theta=1000000.0)}
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                layer_types=kinds, rope_parameters=rope, tie_word_embeddings=True)
    raise ValueError(f"no tiny config for {arch!r}; have {TINY_ARCHS}")


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocab, with a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _SPECIAL_TOKENS + _WORDS
    vocab += [f"w{i}" for i in range(TINY_VOCAB - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=TINY_CHAT_TEMPLATE,
    )
    return tokenizer


def build_tiny_checkpoint(path: Path, arch: str = "llama", num_layers: int = 6, shard_layers: int = 1
                          ) -> Path:
    """Save a seeded random `arch` model to `path`, about `shard_layers` layers per shard file
    (0: one unsharded model.safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers))
    with torch.no_grad():  # random everything, norms included, so any mix-up of tensors shows
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else
                        0.05 * torch.randn_like(param))
    layer_size = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers.0." in n)
    max_shard = shard_layers * layer_size + 1024 if shard_layers else 1 << 30
    model.save_pretrained(path, max_shard_size=max_shard)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint(arch="llama", num_layers=6, shard_layers=1) -> Path`: a tiny random checkpoint dir,
    built once per argument set per session. Shared: copy it before modifying it."""
    cache: dict[tuple[str, int, int], Path] = {}

    def make(arch: str = "llama", num_layers: int = 6, shard_layers: int = 1) -> Path:
        key = (arch, num_layers, shard_layers)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{num_layers}l-{shard_layers}s")
            cache[key] = build_tiny_checkpoint(path, arch, num_layers, shard_layers)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (SmolLM2-135M-Instruct), fetched and converted into layerhive_home()
    on first use (~20-30 s), cached across sessions afterwards."""
    from node.model.checkpoint import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)
