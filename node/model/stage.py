"""A stage: decoder layers [start, end) of a model, with preallocated KV caches and batched steps.

Weights live in transformers' own modules (the decoder layers of `XxxModel` for Llama, Qwen2, Qwen3,
Mistral, Phi-3 and Gemma 3, built on the meta device and filled by `node.model.checkpoint.load_layers`; q/k/v
and gate/up are then fused into one projection each, and every projection becomes a `node.model.projection.Projection`,
which holds its weight the way the device multiplies fastest), and so do the norms, the MLP's
activation and the rotary embedding; the forward itself is orchestrated here, gpt-fast style, so that:

* decode steps of many sessions run as one pass: norms, projections and MLP see every session's
  tokens at once, so each weight is read once per pass (decode is memory-bound: that is the win),
  while attention runs per session against that session's own cache;
* a session may run a sub-range of the stage's layers (a chain that uses only part of this node);
* each session's KV cache is preallocated for its max_length, so the bytes a server reserves per
  session (`Stage.cache_bytes`) are exactly the bytes the cache holds.

Layer ranges here (`layers=`, `KVCache.layers`) are absolute model layer indices, like the protocol's
`open {start, end}`: a stage serving 10:20 runs `layers=(12, 20)`, never `(2, 10)`.
A stage that starts at layer 0 also holds the token embedding (and the first half of the LM head, which it
computes in rings: `head_share`), and one that ends at the last layer the final norm and LM head
(`node.model.head`), for sessions run as a ring.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, PretrainedConfig

from node.model.checkpoint import ModelSource, load_layers, stage_config
from node.model.head import Embedder, LMHead
from node.model.hugepages import HUGE_PAGES_FROM_BYTES, move_weights_to_huge_pages
from node.model.quant import FUSED_PROJECTIONS, check_quant, quantized_projection

LayerSpan = tuple[int, int]  # absolute [a, b) model layer indices


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


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """K and V of one token in one layer."""
    return 2 * _kv_heads(config) * _head_dim(config) * torch.finfo(dtype).bits // 8


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer of `config`: how many most recent tokens (itself included) a query sees, None = all.

    Qwen2 marks sliding layers in `layer_types`; Mistral applies `sliding_window` to every layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


@dataclass(frozen=True)
class StageShape:
    hidden_size: int
    num_layers: int
    kv_bytes_per_token: int  # K and V of one token across all of this stage's layers


@dataclass(eq=False)  # identity semantics: a cache is one session's state, hashable by identity
class KVCache:
    """One session's K/V for layers `layers`, in tensors [layers, kv_heads, capacity, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor
    layers: LayerSpan
    max_length: int | None  # None: grows on demand (references and tests; servers preallocate)
    length: int = 0  # tokens written so far; the next step must start at this position

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def get_seq_length(self) -> int:  # DynamicCache's name for it, for code written against that
        return self.length

    def truncate(self, length: int) -> None:
        """Forgets every position from `length` on (a rejected speculative draft); the next step starts there and
        overwrites them. Nothing is freed: a preallocated cache keeps its size."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if self.max_length is not None:
            raise ValueError(f"positions up to {needed} exceed the cache's max_length {self.max_length}")
        grown = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], grown, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)


@dataclass
class StepInput:
    """One session's step in a batch: `hidden` [1, tokens, hidden] whose first token sits at `position`."""

    hidden: torch.Tensor
    position: int
    cache: KVCache
    layers: LayerSpan | None = None  # default: the cache's layers

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]


def _fuse_projections(layer: torch.nn.Module, quant: str = "none", backend: str | None = None) -> None:
    """Replaces the layer's q/k/v projections by one `self_attn.qkv_proj` and gate/up by one `mlp.gate_up_proj`
    (biases too: Qwen2 has them on q, k and v), and every projection by a `Projection`, which keeps its weight
    in the layout the device streams fastest, or by its `quant` form (`node.model.quant`, with `backend`'s
    kernels). Three fewer ops per layer took the projections and MLP of 10 SmolLM2 layers from 10.0 to 9.7 ms
    here (each output is the same row-by-input dot product).
    Phi-3 checkpoints hold both fused already, in the same order; its MLP calls its activation `activation_fn`."""
    if not hasattr(layer.mlp, "act_fn"):
        layer.mlp.act_fn = layer.mlp.activation_fn
    for fused, full_names in FUSED_PROJECTIONS.items():
        owner_name, fused_name = fused.split(".")
        owner, names = getattr(layer, owner_name), [name.split(".")[1] for name in full_names]
        if hasattr(owner, fused_name):
            linear = getattr(owner, fused_name)
            projection = quantized_projection(linear.weight.detach(), linear.bias, quant, backend=backend)
            setattr(owner, fused_name, projection)
            continue
        parts = [getattr(owner, name) for name in names]
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in parts])
        weight = torch.cat([part.weight for part in parts])
        for name in names:
            delattr(owner, name)  # the fused copy replaces them: no weight is held twice
        del parts
        setattr(owner, fused_name, quantized_projection(weight, bias, quant, backend=backend))
    for owner, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
        linear = getattr(owner, name)
        setattr(owner, name, quantized_projection(linear.weight.detach(), linear.bias, quant, backend=backend))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of `x` [tokens, heads, d] by `cos`/`sin` [tokens, 1, r], computed as
    transformers' `apply_rotary_pos_emb` does: x * cos + rotate_half(x) * sin on the first r dims of each head
    (r < d: Phi-3's partial rotary), the rest passed through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((_rotate(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RotaryTables:
    """cos/sin [tokens, 1, r] at given positions, by layer type where the model turns each type by its own
    frequencies (Gemma 3: local layers base 10k, global ones 1M), else under the key None.

    The model's own rotary module computes them. With a static rope type its frequencies never change, so it
    computes them once for a block of positions and a step indexes that block (gpt-fast's precomputed table):
    calling the module per pass (its autocast context, its checks, and a signature lookup) cost ~40 us warm
    here, several times that on the cold caches of a stage that idled between steps, and a ring pays it at
    every stage. Dynamic rope types (NTK "dynamic", "longrope") rescale with the sequence: those call per pass."""

    BLOCK = 256  # positions computed at a time: a decode step computes its block once every 256 tokens

    def __init__(self, rotary_emb: torch.nn.Module, layer_types: Sequence[str] | None, dtype: torch.dtype) -> None:
        self.rotary_emb, self.dtype = rotary_emb, dtype
        typed = "layer_type" in inspect.signature(rotary_emb.forward).parameters
        self.kinds: list[str | None] = sorted(set(layer_types or ())) if typed else [None]
        rope_types = getattr(rotary_emb, "rope_type", "default")
        rope_types = list(rope_types.values()) if isinstance(rope_types, dict) else [rope_types]
        self.static = not any("dynamic" in kind or kind == "longrope" for kind in rope_types)
        self._tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}  # rows past _positions: not yet
        self._positions = 0  # the tables hold positions [0, _positions)

    def at(self, positions: torch.Tensor, end: int) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """The tables at `positions`, all below `end` (an int, so that a GPU need not be asked for their max)."""
        if not self.static:
            return self._computed(positions)
        if end > self._positions:
            self._extend(end, positions.device)
        return {kind: (cos[positions], sin[positions]) for kind, (cos, sin) in self._tables.items()}

    def _extend(self, end: int, device: torch.device) -> None:
        """Computes the blocks of positions from the tables' end past `end` only, into tables whose room doubles
        when full: each position is computed once, and no growth recomputes or stalls on what was there (from
        scratch, 128k positions took ~2 s here). Rows are written before the bound moves past them, so a reader
        never indexes a row not yet written."""
        size = -(-end // self.BLOCK) * self.BLOCK
        new = self._computed(torch.arange(self._positions, size, device=device))
        tables = {}
        for kind, rows in new.items():
            held = self._tables.get(kind)
            if held is None or held[0].shape[0] < size:
                room = max(size, 2 * held[0].shape[0]) if held is not None else size
                grown = tuple(torch.empty((room, *row.shape[1:]), dtype=row.dtype, device=row.device) for row in rows)
                if held is not None:
                    for table, old in zip(grown, held, strict=True):
                        table[: self._positions] = old[: self._positions]
                held = grown
            for table, row in zip(held, rows, strict=True):
                table[self._positions: size] = row
            tables[kind] = held
        self._tables, self._positions = tables, size

    @property
    def nbytes(self) -> int:
        """What the tables hold now (their whole room, rows not yet computed included)."""
        return sum(table.nbytes for tables in self._tables.values() for table in tables)

    def max_bytes(self, positions: int) -> int:
        """The most the tables can hold while steps stay below `positions`: whole blocks, in a room that at most
        doubles past them (`_extend`). Memory a node's KV budget leaves room for, as the tables are never shrunk:
        for SmolLM2 (64 rotary dims, fp32) 8 MB at 8,192 positions. Dynamic rope types keep no tables: 0."""
        if not self.static or positions <= 0:
            return 0
        device = next(self.rotary_emb.buffers(), torch.empty(0)).device
        row = self._computed(torch.arange(1, device=device))  # one position of each kind: its width and dtype
        per_position = sum(cos.nbytes + sin.nbytes for cos, sin in row.values())
        return 2 * -(-positions // self.BLOCK) * self.BLOCK * per_position

    def _computed(self, positions: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        x = torch.empty(0, dtype=self.dtype, device=positions.device)  # the module reads only its dtype and device
        tables = {}
        for kind in self.kinds:
            extra = {} if kind is None else {"layer_type": kind}
            cos, sin = self.rotary_emb(x, positions.unsqueeze(0), **extra)
            tables[kind] = (cos[0, :, None], sin[0, :, None])
        return tables


@dataclass
class _Rows:
    """Where one step's tokens sit in the flattened [tokens, hidden] batch."""

    begin: int
    tokens: int
    position: int
    cache: KVCache


class Stage:
    """Runs hidden states through layers [start, end); stateless apart from the caches it hands out."""

    def __init__(
        self, source: ModelSource, start: int, end: int, *, dtype: torch.dtype, device: torch.device,
        with_ends: bool = True, share_head: bool = True, quant: str = "none", quant_backend: str | None = None,
        huge_pages: bool = True,
    ) -> None:
        """`with_ends=False`: layers only, even at the model's ends (timing layers, nothing served).
        `share_head=False`: a first stage holds no share of the LM head (`head_share`).
        `quant`: how the layers' projections are held ("none", "int8", "int4": `node.model.quant`, whose
        `quantized_projection` picks the kernels unless `quant_backend` names them); the embedding, norms and
        LM head stay at `dtype`.
        `huge_pages=False`: the weights stay on the pages they were allocated on (`node.model.hugepages`)."""
        if not 0 <= start < end <= source.num_layers:
            raise ValueError(
                f"layer range {start}:{end} is outside {source.name}, which has {source.num_layers} layers"
            )
        self.source, self.start, self.end = source, start, end
        self.dtype, self.device, self.quant = dtype, torch.device(device), check_quant(quant)
        self.quant_backend = quant_backend
        self.config = stage_config(source.config, start, end)
        with torch.device("meta"):
            model = AutoModel.from_config(self.config, dtype=dtype)
        model.embed_tokens = None
        model.norm = torch.nn.Identity()  # the final norm belongs to the client's head
        for index in range(start, end):  # one at a time: a quantized stage never holds all its layers dense
            self._load_layer(model, index)
        # Non-persistent buffers (rotary frequencies) cannot live on the meta device.
        model.rotary_emb = type(model.rotary_emb)(config=self.config).to(self.device)
        self.model = model.eval()
        self.layers = model.layers
        self.windows = sliding_windows(self.config)
        self.head_dim, self.kv_heads = _head_dim(self.config), _kv_heads(self.config)
        self.num_heads = self.config.num_attention_heads
        self.layer_types = getattr(self.config, "layer_types", None)
        self.rotary = RotaryTables(model.rotary_emb, self.layer_types, dtype)
        self.qk_norms = hasattr(self.layers[0].self_attn, "q_norm")
        self.sandwich_norms = hasattr(self.layers[0], "pre_feedforward_layernorm")
        # A chain's ends, so it can close into a ring (node.serve.server): the first stage embeds the tokens it
        # is sent, the last one computes logits and samples.
        self.embedder = Embedder(source, dtype=dtype, device=device) if with_ends and start == 0 else None
        self.head = LMHead(source, dtype=dtype, device=device) if with_ends and end == source.num_layers else None
        # A first stage that does not also end the model holds the LM head's first half: in a ring it computes
        # those logits while the last stage computes the rest (node.serve.server), so half the head's time leaves the
        # critical path, for half the head's memory here.
        shares = with_ends and share_head and start == 0 and end < source.num_layers
        self.head_share = LMHead(source, dtype=dtype, device=device, rows=(0, source.config.vocab_size // 2)) \
            if shares else None
        self.shape = StageShape(
            hidden_size=self.config.hidden_size,
            num_layers=end - start,
            kv_bytes_per_token=kv_bytes_per_token(self.config, dtype) * (end - start),
        )
        # Decode streams these weights every token: on 2 MB pages, without page walks. Only weights that outgrow the
        # TLB's reach with small pages (~8 MB here) gain, and moving costs ~3 ms a MB at load.
        if huge_pages and self.device.type == "cpu" and self.layer_bytes * (end - start) >= HUGE_PAGES_FROM_BYTES:
            move_weights_to_huge_pages()

    def _load_layer(self, model: torch.nn.Module, index: int) -> None:
        """Reads model layer `index` into `model` (its layer `index - start`), then fuses (and quantizes) it."""
        local = f"layers.{index - self.start}."
        weights = {local + key.removeprefix("layers.0."): tensor for key, tensor in
                   load_layers(self.source, index, index + 1, dtype=self.dtype, device=self.device).items()}
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or any(key.startswith(local) for key in missing):
            raise ValueError(f"checkpoint of {self.source.name} does not fit layer {index}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        del weights  # the modules hold them now; fusing frees each separate projection as it goes
        _fuse_projections(model.layers[index - self.start], self.quant, self.quant_backend)

    @property
    def layer_bytes(self) -> int:
        """Bytes of one of this stage's layers as held (all have the same shapes)."""
        layer = self.layers[0]
        return sum(t.nbytes for t in itertools.chain(layer.parameters(), layer.buffers()))

    # --- caches -----------------------------------------------------------------------------------

    def resolve_layers(self, layers: Sequence[int] | None) -> LayerSpan:
        """Absolute [a, b) within [start, end); None means the whole stage."""
        if layers is None:
            return self.start, self.end
        a, b = (int(x) for x in layers)
        if not self.start <= a < b <= self.end:
            raise ValueError(f"layers {a}:{b} are not a non-empty part of this stage's {self.start}:{self.end} "
                             "(layer indices are absolute model layers)")
        return a, b

    def cache_bytes(self, max_length: int, layers: Sequence[int] | None = None) -> int:
        """Bytes of `new_cache(max_length, layers)`: what a server should reserve for the session."""
        a, b = self.resolve_layers(layers)
        return max_length * (b - a) * kv_bytes_per_token(self.config, self.dtype)

    def new_cache(self, max_length: int | None = None, layers: Sequence[int] | None = None) -> KVCache:
        """A session's cache for `layers` (absolute, default the whole stage), preallocated for
        `max_length` tokens; without max_length it starts small and grows (tests, references)."""
        a, b = self.resolve_layers(layers)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        shape = (b - a, self.kv_heads, max_length or 16, self.head_dim)
        # empty, not zeros: slots are written before they are read, and untouched pages cost nothing yet
        with torch.inference_mode():
            keys = torch.empty(shape, dtype=self.dtype, device=self.device)
            values = torch.empty(shape, dtype=self.dtype, device=self.device)
        return KVCache(keys, values, (a, b), max_length)

    # --- stepping ---------------------------------------------------------------------------------

    def check_step(self, step: StepInput) -> None:
        """Raises ValueError if `step` cannot run; cheap (no tensor data read), so a batcher can call it
        on the event loop before a bad step gets into a batch with good ones."""
        hidden, cache = step.hidden, step.cache
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache from Stage.new_cache, got {type(cache).__name__}")
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise ValueError("hidden states must be a floating-point tensor")
        size = self.shape.hidden_size
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != size:
            raise ValueError(f"hidden states must have shape [1, tokens, {size}], "
                             f"got {list(hidden.shape)}")
        if step.layers is not None and self.resolve_layers(step.layers) != cache.layers:
            raise ValueError(f"step runs layers {tuple(step.layers)} but its cache holds layers {cache.layers}")
        if cache.keys.shape[1:] != (self.kv_heads, cache.capacity, self.head_dim) or cache.keys.dtype != self.dtype \
                or not self.start <= cache.layers[0] < cache.layers[1] <= self.end:
            raise ValueError("cache was not made by this stage")
        if step.position != cache.length:
            raise ValueError(f"step at position {step.position}, but the cache holds {cache.length} tokens")
        if cache.max_length is not None and step.position + step.tokens > cache.max_length:
            raise ValueError(f"positions {step.position}..{step.position + step.tokens} exceed "
                             f"the cache's max_length {cache.max_length}")

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, position: int, cache: KVCache,
                layers: Sequence[int] | None = None) -> torch.Tensor:
        """One session's step: `hidden` [1, tokens, hidden], first token at `position`, through `layers`
        (absolute, must be the cache's; default the cache's). Extends `cache`; returns [1, tokens, hidden]."""
        return self.forward_batch([StepInput(hidden, position, cache, layers)])[0]

    @torch.inference_mode()
    def forward_batch(self, steps: Sequence[StepInput]) -> list[torch.Tensor]:
        """Runs the steps of several sessions as one pass; each extends its own cache.

        Tokens of all steps are flattened into one [tokens, hidden] matrix, so every weight is read once.
        Steps may run different layer spans: each run of layers with the same set of sessions is one
        segment. Caches advance only once every layer has run, so a failed pass leaves them usable."""
        for step in steps:
            self.check_step(step)
        if len({id(step.cache) for step in steps}) != len(steps):
            raise ValueError("two steps of one batch share a cache")
        x = torch.cat([step.hidden[0] for step in steps]).to(device=self.device, dtype=self.dtype)
        rows, begin = [], 0
        for step in steps:
            step.cache._ensure_capacity(step.position + step.tokens)
            rows.append(_Rows(begin, step.tokens, step.position, step.cache))
            begin += step.tokens
        positions = torch.cat([torch.arange(r.position, r.position + r.tokens) for r in rows]).to(self.device)
        rotary = self.rotary.at(positions, end=max(r.position + r.tokens for r in rows))

        bounds = sorted({b for step in steps for b in step.cache.layers})
        for seg_start, seg_end in itertools.pairwise(bounds):
            active = [i for i, step in enumerate(steps) if step.cache.layers[0] <= seg_start < step.cache.layers[1]]
            if len(active) == len(steps):
                x = self._run_layers(seg_start, seg_end, x, rotary, rows)
            elif active:  # only some sessions run these layers: gather their rows, run, scatter back
                index = torch.cat([torch.arange(rows[i].begin, rows[i].begin + rows[i].tokens) for i in active])
                index = index.to(self.device)
                sub_rows, begin = [], 0
                for i in active:
                    sub_rows.append(_Rows(begin, rows[i].tokens, rows[i].position, rows[i].cache))
                    begin += rows[i].tokens
                sub_rotary = {kind: (cos[index], sin[index]) for kind, (cos, sin) in rotary.items()}
                out = self._run_layers(seg_start, seg_end, x[index], sub_rotary, sub_rows)
                x = x.index_copy(0, index, out)
        for step in steps:
            step.cache.length = step.position + step.tokens
        return [x[r.begin: r.begin + r.tokens].unsqueeze(0) for r in rows]

    def _run_layers(self, a: int, b: int, x: torch.Tensor,
                    rotary: dict[str | None, tuple[torch.Tensor, torch.Tensor]], rows: list[_Rows]) -> torch.Tensor:
        """Absolute layers [a, b) on the flattened tokens `x` [tokens, hidden] of the sessions in `rows`.

        Gemma 3 norms each sublayer's output too ("sandwich" norms): its `post_attention_layernorm` is applied
        to the attention's output, and `pre_feedforward_layernorm` is the MLP's input norm."""
        for index in range(a, b):
            layer = self.layers[index - self.start]
            kind = self.layer_types[index - self.start] if self.layer_types and None not in rotary else None
            attention = self._attention(index, layer.self_attn, layer.input_layernorm(x), *rotary[kind], rows)
            if self.sandwich_norms:
                x = x + layer.post_attention_layernorm(attention)
                h = layer.pre_feedforward_layernorm(x)
            else:
                x = x + attention
                h = layer.post_attention_layernorm(x)
            gate, up = layer.mlp.gate_up_proj(h).chunk(2, dim=-1)
            out = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            x = x + (layer.post_feedforward_layernorm(out) if self.sandwich_norms else out)
        return x

    def _attention(self, index: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, rows: list[_Rows]) -> torch.Tensor:
        n, d = h.shape[0], self.head_dim
        qkv = attn.qkv_proj(h)
        rotated = self.num_heads + self.kv_heads  # q and k heads, which turn by the same angles: one rotation
        qk = qkv[:, : rotated * d].view(n, rotated, d)
        if self.qk_norms:  # Qwen3, Gemma 3: each q and k head is RMS-normed before it turns
            qk = torch.cat((attn.q_norm(qk[:, : self.num_heads]), attn.k_norm(qk[:, self.num_heads:])), dim=1)
        qk = _rotate(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, rotated * d:].view(n, self.kv_heads, d)
        window = self.windows[index - self.start]
        out = torch.empty_like(q)
        for r in rows:
            end = r.position + r.tokens
            layer_keys = r.cache.keys[index - r.cache.layers[0]]  # [kv_heads, capacity, head_dim]
            layer_values = r.cache.values[index - r.cache.layers[0]]
            layer_keys[:, r.position: end] = k[r.begin: r.begin + r.tokens].transpose(0, 1)
            layer_values[:, r.position: end] = v[r.begin: r.begin + r.tokens].transpose(0, 1)
            first = 0 if window is None else max(0, r.position + 1 - window)  # oldest key any query sees
            out[r.begin: r.begin + r.tokens] = self._session_attention(
                q[r.begin: r.begin + r.tokens], layer_keys[:, first:end], layer_values[:, first:end],
                r.position, first, window, attn.scaling,
            )
        return attn.o_proj(out.view(n, self.num_heads * d))

    def _session_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int,
                           first: int, window: int | None, scale: float) -> torch.Tensor:
        """q [tokens, heads, d] at positions position.., keys/values [kv_heads, S, d] at positions first..

        GQA without copying K/V: the query heads sharing a KV head are stacked along the query axis,
        so one SDPA over [kv_heads, group * tokens, d] serves them all (what repeat_kv computes)."""
        tokens, heads, d = q.shape
        group = heads // self.kv_heads
        q = q.view(tokens, self.kv_heads, group, d).permute(1, 2, 0, 3).reshape(self.kv_heads, group * tokens, d)
        mask = None
        if tokens > 1:  # a single new token sees every key in the span `first` already cut to the window
            q_pos = torch.arange(position, position + tokens, device=q.device).repeat(group)
            k_pos = torch.arange(first, first + keys.shape[1], device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # causal within the new tokens
            if window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - window
        # 4-D inputs: with 3-D ones, CPU SDPA falls back to its slower math kernel.
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale)[0]
        return out.view(self.kv_heads, group, tokens, d).permute(2, 0, 1, 3).reshape(tokens, heads, d)
