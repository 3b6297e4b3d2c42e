"""GGUF checkpoints served directly: transformers' names for a GGUF file's tensors, and reading them.

A `.gguf` model resolves (`node.model.checkpoint.resolve_model`) to a small cached dir holding the config.json
and tokenizer transformers derives from the file's metadata (slow: minutes for a 262k vocabulary under load,
so it is done once per file and kept), while the weights stay in the GGUF: `GGUFCheckpoint` reads the tensors
a node asks for at their offsets (`node.model.gguf_file`), de-quantises them and undoes llama.cpp's
conversion of each (transformers' own per-architecture `TensorProcessor`: Llama's q/k row permutation,
Gemma's norm weights stored as 1 + w).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers import modeling_gguf_pytorch_utils as hf_gguf

from node.model import embedded_model
from node.model.gguf_file import GGUFFile

FORMAT_VERSION = 1
_GGUF_ARCH = {"gemma3_text": "gemma3"}  # transformers model_type -> GGUF architecture name, where they differ


def metadata_dir(gguf: Path, models_dir: Path) -> Path:
    """The cached config + tokenizer of `gguf`, derived once per file (keyed by its path, size and mtime)."""
    stat = gguf.stat()
    stamp = {"format": FORMAT_VERSION, "gguf": str(gguf), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]

    def build(out: Path, scratch: Path) -> None:
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:
            raise embedded_model.EmbeddedModelError(f"transformers cannot read {gguf}: {type(e).__name__}: {e}") from e
        if "quantization_config" in config.__dict__:  # the weights Layerhive loads from it are plain fp32
            del config.quantization_config
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return embedded_model.build_once(models_dir / "gguf" / f"{gguf.stem}-{key}", build, stamp=stamp)


class GGUFCheckpoint:
    """The tensors of one GGUF file under transformers' `XxxForCausalLM` names ("model.layers.3.mlp.up_proj.weight")."""

    def __init__(self, gguf: Path, config: PretrainedConfig) -> None:
        self.file = GGUFFile(gguf)
        arch = _GGUF_ARCH.get(config.model_type, config.model_type)
        heads = {"num_attention_heads": config.num_attention_heads,
                 "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
        self._processor = hf_gguf.TENSOR_PROCESSORS.get(arch, hf_gguf.TensorProcessor)(config=heads)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        to_hf = hf_gguf.get_gguf_hf_weights_map(model, self._processor)
        # only what the file holds: a tied head has no output.weight
        self.names = {hf: name for name, hf in to_hf.items() if name in self.file.tensors}

    def shape(self, key: str) -> list[int]:
        return list(self.file.tensors[self.names[key]].shape)

    def tensor(self, key: str) -> torch.Tensor:
        name = self.names[key]
        return self._processed(name, self.file.tensor(name))

    def rows(self, key: str, indices: torch.Tensor) -> torch.Tensor:
        name = self.names[key]
        return self._processed(name, self.file.rows(name, indices.numpy()))

    def _processed(self, name: str, weights: np.ndarray) -> torch.Tensor:
        result = self._processor.process(weights=weights, name=name, tensor_key_mapping={}, parsed_parameters={})
        return torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
