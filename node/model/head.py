"""The chain's two ends: token embedding in, final norm + LM head out.

A chain's first stage holds the embedding and its last stage the norm and LM head, so a
session can run as a ring (`node.serve.server`): the last stage samples and sends the token
straight back to the first, and the client is off the per-token path. The client holds
both ends too (`ClientHead`) for the paths where it computes them itself: client-relayed
chains, and audited sessions that check every stage's hidden states (`node.client.verify`).
Volunteers see token ids either way: a first stage's input embeddings map one-to-one to
token ids, and a last stage can apply the public LM head to its own output.

The LM head is the one big matmul at the end (vocab x hidden): `LMHead.next_logits` runs
it off the event loop, and the last positions of all sessions waiting at that moment go
through it together, so the head's weights are read once per round, not once per session.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModel, AutoModelForCausalLM

from node.model.checkpoint import EmbeddingRows, ModelSource, load_head, stage_config
from node.model.projection import Projection


class Embedder:
    """Token ids -> the first layer's input, from the checkpoint's mapped file (`EmbeddingRows`)."""

    def __init__(self, source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.dtype, self.device = dtype, torch.device(device)
        self._rows = EmbeddingRows(source)
        self.vocab_size = self._rows.vocab_size
        self.scale = embedding_scale(source)

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] ids -> [batch, tokens, hidden] states."""
        if token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < self.vocab_size:
            raise IndexError(f"token ids must be in [0, {self.vocab_size})")
        rows = self._rows.rows(token_ids.reshape(-1)).to(device=self.device, dtype=self.dtype)
        if self.scale != 1.0:  # in the embedding's dtype, as transformers scales it
            rows = rows * torch.tensor(self.scale, dtype=self.dtype)
        return rows.view(*token_ids.shape, -1)


def embedding_scale(source: ModelSource) -> float:
    """What the architecture multiplies token embeddings by: sqrt(hidden) for Gemma, else 1; read off
    transformers' own (meta, weightless) embedding module so every scaled architecture is covered."""
    with torch.device("meta"):
        model = AutoModel.from_config(stage_config(source.config, 0, 0))
    return float(getattr(model.embed_tokens, "scalar_embed_scale", 1.0))


class LMHead:
    """The last layer's output -> next-token logits: the architecture's final norm, then the LM head.

    `rows` = (a, b) holds only the head's rows for token ids [a, b): a ring's first stage holds such a share
    and computes those logits while the last stage computes the rest (`node.serve.server`, "head sharing")."""

    def __init__(self, source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 rows: tuple[int, int] | None = None) -> None:
        self.dtype, self.device = dtype, torch.device(device)
        with torch.device("meta"):  # a model without layers, for the architecture's own norm module
            model = AutoModelForCausalLM.from_config(stage_config(source.config, 0, 0), dtype=dtype)
        norm_weight, weight = load_head(source, dtype=dtype, device=device)
        model.load_state_dict({"model.norm.weight": norm_weight}, strict=False, assign=True)
        self.vocab_size = weight.shape[0]
        a, b = self.rows = rows if rows is not None else (0, self.vocab_size)
        if not 0 <= a < b <= self.vocab_size:
            raise ValueError(f"head rows {a}:{b} are not within the vocabulary of {self.vocab_size}")
        if (a, b) != (0, self.vocab_size):
            weight = weight[a:b].clone()  # a copy, so the whole matrix read from the checkpoint is freed
        self.norm = model.model.norm
        self.softcap = getattr(source.config, "final_logit_softcapping", None)  # Gemma 2 style: cap * tanh(z / cap)
        self.lm_head = Projection(weight, sliceable=True)
        del weight  # on CPU in fp32 the projection holds a transposed copy
        # last positions waiting for the head, by the rows they need
        self._pending: dict[tuple[int, int], list[tuple[torch.Tensor, asyncio.Future]]] = {}

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """[batch, tokens, hidden] states of the last layer -> [batch, tokens, b - a] logits (fp32) of token
        ids [a, b) = `rows` (default all this head holds)."""
        a, b = rows if rows is not None else self.rows
        if not self.rows[0] <= a < b <= self.rows[1]:
            raise ValueError(f"rows {a}:{b} are not within this head's {self.rows[0]}:{self.rows[1]}")
        normed = self.norm(hidden.to(device=self.device, dtype=self.dtype))
        logits = self.lm_head(normed, outputs=(a - self.rows[0], b - self.rows[0])).float()
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap

    async def next_logits(self, hidden: torch.Tensor, compute: ThreadPoolExecutor, *,
                          alone_on_loop: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (of `rows`, default all) after the last position of `hidden` [1, tokens, hidden], batched with
        other callers wanting the same rows, run on `compute`: the process's one torch thread (see
        `node.serve.batching`). `alone_on_loop`: a batch of this call alone runs on the event loop instead (see
        `StepBatcher.alone`)."""
        rows = rows if rows is not None else self.rows
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = self._pending.setdefault(rows, [])
        pending.append((hidden[0, -1:], future))
        if len(pending) == 1:  # the first caller starts the batch; later ones join it until it starts
            try:
                await asyncio.sleep(0)
            finally:  # even if this caller was cancelled meanwhile (its session closed): others may have joined
                self._start_batch(rows, compute, alone_on_loop)
        return await future

    def _start_batch(self, rows: tuple[int, int], compute: ThreadPoolExecutor, alone_on_loop: bool) -> None:
        """Runs the batch waiting for `rows`, here on the loop if it is one caller `alone_on_loop`, else on
        `compute`, and answers each caller's future. Nothing here is awaited: a caller cancelled mid-batch cannot
        stop the others' answers (when the first caller ran the batch and awaited it, its cancellation left the
        callers that had joined, and every later one, waiting forever: a node stopped answering for good)."""
        batch = self._pending.pop(rows)
        rows_in = torch.cat([h for h, _ in batch]).unsqueeze(0)
        if alone_on_loop and len(batch) == 1:
            try:
                _answer(batch, self.logits(rows_in, rows))
            except Exception as e:
                _answer(batch, e)
            return
        try:
            computing = asyncio.get_running_loop().run_in_executor(compute, self.logits, rows_in, rows)
        except RuntimeError as e:  # the compute thread was shut down (the stage is closing): every caller hears
            _answer(batch, e)
            return
        computing.add_done_callback(lambda done: _answer(batch, RuntimeError("the head's compute thread shut down")
                                                         if done.cancelled() else done.exception() or done.result()))


def _answer(batch: list[tuple[torch.Tensor, asyncio.Future]], out: torch.Tensor | BaseException) -> None:
    """Each caller of `batch` gets its row of the logits `out`, or the error; a cancelled caller nothing."""
    for index, (_, waiter) in enumerate(batch):
        if waiter.done():
            continue
        if isinstance(out, BaseException):
            waiter.set_exception(out)
        else:
            waiter.set_result(out[0, index])


class ClientHead:
    """Both ends, for a client that embeds and samples itself."""

    def __init__(self, source: ModelSource, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.embedder = Embedder(source, dtype=dtype, device=device)
        self.head = LMHead(source, dtype=dtype, device=device)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client-head")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(token_ids)

    async def next_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return await self.head.next_logits(hidden, self._compute)
