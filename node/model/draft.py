"""A draft model: a small model with the target's tokenizer that proposes the next few tokens of a session.

Prompt lookup (`node.model.speculative.propose_draft`) drafts well only where the text repeats itself (code,
lists); in free chat it rarely finds anything. A small model of the same family (SmolLM2-135M for SmolLM2-1.7B,
Llama 3.2 1B for Llama 3.1 70B) guesses most of a chat's tokens right, at a small fraction of the target's cost.

In a ring the tokens never pass through the client before the next step (the last stage feeds them straight to
the first), so the draft is made where the next step starts: at the ring's first stage, which knows every token
of its sessions. The draft rides that step through every stage and is verified at the last one exactly as a
lookup draft is, so the output is unchanged; only the acceptance rate differs.

Bounds (the sessions are strangers'): the draft model keeps a KV cache for at most `max_sessions` sessions (the
least recently drafted is dropped and drafted for afresh later), each growing with its session up to `max_context`
tokens; beyond that a session gets no draft. A session's history is caught up at most `max_feed` tokens per round,
so a long prompt (or a session evicted and back) holds the compute thread, and the other sessions' steps queued on
it, for one chunk at a time, as the stage's own prefills are chunked. A node's stages (one retiring after a move,
its successor) share one draft model from their own compute threads: a lock keeps its sessions apart.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from node.model.checkpoint import ModelSource
from node.model.stage import KVCache, Stage

DRAFT_MAX_SESSIONS = 8
DRAFT_MAX_CONTEXT = 2048
DRAFT_MAX_FEED = 256  # tokens of history caught up per round: about a stage prefill chunk's time on the thread


@dataclass
class _DraftState:
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # the tokens whose K/V the cache holds, in order


class DraftModel:
    """Greedy drafts from a whole small model (embedding, every layer, head) held at `quant`."""

    def __init__(self, source: ModelSource, *, target_vocab_size: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", quant: str = "none", max_sessions: int = DRAFT_MAX_SESSIONS,
                 max_context: int = DRAFT_MAX_CONTEXT, max_feed: int = DRAFT_MAX_FEED) -> None:
        vocab = source.config.vocab_size
        if vocab > target_vocab_size:
            raise ValueError(f"draft model {source.name} has {vocab} token ids, the target only "
                             f"{target_vocab_size}: they cannot share a tokenizer")
        self.source, self.max_sessions, self.max_context, self.max_feed = source, max_sessions, max_context, max_feed
        self.stage = Stage(source, 0, source.num_layers, dtype=dtype, device=torch.device(device),
                           share_head=False, quant=quant)
        self._states: OrderedDict[Hashable, _DraftState] = OrderedDict()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def propose(self, key: Hashable, history: Sequence[int], k: int) -> list[int]:
        """Up to `k` greedy tokens to follow `history` (the session's tokens so far); [] when the session's
        history is longer than the draft model's context bound, or still being caught up."""
        if k < 1 or not history or len(history) + k > self.max_context:
            return []
        with self._lock:
            state = self._state_for(key)
            kept = _common_prefix(state.tokens, history)
            if kept == len(history):  # the cache must end one token short, so a step yields the next logits
                kept -= 1
            state.cache.truncate(kept)
            del state.tokens[kept:]
            if len(history) - kept > self.max_feed:
                self._feed(state, list(history[kept:kept + self.max_feed]))
                return []
            logits = self._feed(state, list(history[kept:]))
            draft: list[int] = []
            while True:
                token = int(logits.argmax())
                draft.append(token)
                if len(draft) == k:
                    return draft
                logits = self._feed(state, [token])

    @property
    def max_bytes(self) -> int:
        """The most memory it holds: its weights (layers and head; the embedding rows are read from the mapped
        checkpoint) and every session's cache at its bound. A node counts it against the KV budget of the stage
        it drafts for."""
        head = self.stage.head
        weights = sum(t.nbytes for module in (self.stage.layers, head.lm_head, head.norm)
                      for t in itertools.chain(module.parameters(), module.buffers()))
        return weights + self.max_sessions * self.stage.cache_bytes(self.max_context)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._states.pop(key, None)

    def _state_for(self, key: Hashable) -> _DraftState:
        state = self._states.pop(key, None)
        if state is None:
            state = _DraftState(self.stage.new_cache())  # grows with the session: a short one holds little
            while len(self._states) >= self.max_sessions:
                self._states.popitem(last=False)
        self._states[key] = state  # most recently drafted last
        return state

    def _feed(self, state: _DraftState, tokens: list[int]) -> torch.Tensor:
        """Runs `tokens` through the model after what the cache holds; the logits after the last one."""
        embedded = self.stage.embedder.embed(torch.tensor([tokens]))
        hidden = self.stage.forward(embedded, len(state.tokens), state.cache)
        state.tokens.extend(tokens)
        return self.stage.head.logits(hidden[:, -1:])[0, -1]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
