"""Chat through the swarm: chat template in, streamed text out.

`ChatEngine` is what the CLI, the chat window and the API server all use. It runs each
answer as a ring (the chain's last stage samples; `node.net.protocol`), or with `ring=False`
embeds and samples on the client, which then needs the model's embedding and LM head.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from node.client.failover import ResilientSession, Revision
from node.client.session import SwarmClient
from node.model.checkpoint import ModelSource, load_tokenizer
from node.model.head import ClientHead
from node.model.sampling import MAX_SEED, SamplingParams
from swarm.types import Hop


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


REVISED_NOTICE = "a node was caught lying; the answer restarts from what it did not touch"


@dataclass(frozen=True)
class TextRevision:
    """In a stream of text deltas: of the text streamed so far only the first `keep_chars` characters stand (a
    lying node was caught; `node.client.failover.Revision`); the deltas after this continue from there."""

    keep_chars: int


@dataclass(frozen=True)
class AnswerStats:
    """A snapshot of one answer: how many tokens, how fast, and the chains of stages that served it."""

    model: str
    tokens: int
    elapsed_s: float  # since the question was sent
    first_token_s: float | None  # the wait for the first token: routing, opening the chain, the prompt's prefill
    tokens_per_s: float | None  # generation speed after the first token; None before the second
    chains: tuple[tuple[Hop, ...], ...]  # in order: more than one when a stage failed and the answer moved


@dataclass
class AnswerTrace:
    """Filled in while an answer streams (`ChatEngine.stream_tokens(..., trace=)`); `stats()` snapshots it."""

    model: str
    started_at: float = field(default_factory=time.monotonic)
    tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    chains: list[tuple[Hop, ...]] = field(default_factory=list)

    def count_token(self) -> None:
        self.last_token_at = time.monotonic()
        self.first_token_at = self.first_token_at or self.last_token_at
        self.tokens += 1

    def stats(self) -> AnswerStats:
        now = time.monotonic()
        speed = None
        if self.tokens >= 2 and self.last_token_at > self.first_token_at:
            speed = (self.tokens - 1) / (self.last_token_at - self.first_token_at)
        first = self.first_token_at - self.started_at if self.first_token_at is not None else None
        return AnswerStats(self.model, self.tokens, now - self.started_at, first, speed, tuple(self.chains))


class TextStreamer:
    """Turns a growing list of token ids into text deltas, holding back half-formed characters."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def revise(self, keep_tokens: int) -> int:
        """Drops the tokens after the first `keep_tokens` (a `Revision`); returns how many characters of the text
        emitted so far still stand. The text after them comes again from the next `push`."""
        del self.token_ids[keep_tokens:]
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).removesuffix("\ufffd")
        keep = len(os.path.commonprefix([self.emitted, text]))
        self.emitted = self.emitted[:keep]
        return keep

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_text(messages: Sequence[Message]) -> str:
    """A conversation as plain "User: ...\nAssistant: ..." lines ending in "Assistant:", for base models that
    have no chat template (Gemma 3 270M): the format pretraining text most often shows a dialogue in."""
    lines = [f"{PLAIN_ROLES.get(m.role, m.role.capitalize())}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def chat_template_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the assistant's turn; a model
    without a template gets `plain_chat_text` (with the special tokens its tokenizer adds, e.g. BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(plain_chat_text(messages))["input_ids"])
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):  # newer tokenizers return a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


class ChatEngine:
    def __init__(self, client: SwarmClient, source: ModelSource, *, ring: bool = True, speculate: int = 0) -> None:
        """`speculate`: a ring's drafts of up to this many tokens (`node.net.protocol`, speculation; 0: none)."""
        self.client, self.source, self.ring = client, source, ring
        self.speculate = speculate if ring else 0
        self.tokenizer = load_tokenizer(source)
        self.max_context = int(getattr(source.config, "max_position_embeddings", 8192))
        self.vocab_size = int(source.config.vocab_size)

    @cached_property
    def head(self) -> ClientHead:
        """The embedding and LM head, loaded only for a client that samples itself (`ring=False`)."""
        return ClientHead(self.source)

    def chat_prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return chat_template_ids(self.tokenizer, messages)

    def completion_prompt_ids(self, text: str) -> list[int]:
        """A raw prompt (no chat template), with whatever special tokens the tokenizer adds itself (e.g. BOS)."""
        return list(self.tokenizer(text)["input_ids"])

    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        generation_eos = getattr(self.source.config, "eos_token_id", None)
        ids = {i for i in (eos, *(generation_eos if isinstance(generation_eos, list) else [generation_eos]))}
        return tuple(sorted(i for i in ids if i is not None))

    async def stream_tokens(self, prompt_ids: Sequence[int], params: SamplingParams,
                            trace: AnswerTrace | None = None) -> AsyncIterator[int | Revision]:
        """Yields the answer's token ids, and a `Revision` when a lying node was caught; `trace`, if given, follows
        its tokens and chains."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        max_length = len(prompt_ids) + params.max_new_tokens
        if max_length > self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus {params.max_new_tokens} new tokens "
                             f"exceeds the model's context of {self.max_context}")
        if not params.stop_token_ids:
            params = replace(params, stop_token_ids=self.stop_token_ids())
        if params.seed is None and params.temperature > 0:  # seeded, a chain rebuilt mid-answer draws the same
            params = replace(params, seed=random.randrange(MAX_SEED))
        session = ResilientSession(self.client, max_length=max_length, speculate=self.speculate)
        if trace is not None:
            trace.chains = session.chains  # the same list: the trace sees each chain as the session opens it
        try:
            async for token in session.generate(prompt_ids, params, None if self.ring else self.head):
                if trace is not None and not isinstance(token, Revision):
                    trace.count_token()
                yield token
        finally:
            await session.close()

    async def stream_chat(self, messages: Sequence[Message], params: SamplingParams,
                          trace: AnswerTrace | None = None) -> AsyncIterator[str | TextRevision]:
        streamer = TextStreamer(self.tokenizer)
        async for token in self.stream_tokens(self.chat_prompt_ids(messages), params, trace):
            if isinstance(token, Revision):
                yield TextRevision(streamer.revise(token.keep))
            elif delta := streamer.push(token):
                yield delta
