"""Verifier sessions kept open between the checks of one checked session (see node.client.verify).

A check re-runs one stage's step on another node that holds its layers, after replaying every input the stage ran
before it. In a one-stage session opened afresh for each check, that replays the whole prefix every time: at check
rate p, about p x n prefills over an n-token answer (O(n^2) work, on machines that also serve the swarm). A
`Replay` keeps the verifier's session and remembers the inputs it ran, so that the next check on it replays only
the inputs since (its KV cache holds the rest). `Replays` keeps a few per checked stage, on different verifiers:
which one re-runs a check is still drawn at random each time (node.client.verify.Auditor), so one colluding
verifier cannot cover a whole session.

A kept session is used only for a check that continues what it ran: the inputs it ran must be a prefix of the
check's (a speculating ring's rejected draft, or a rewound chain, replaces inputs: then the session is closed, since
a verifier session cannot rewind, and a new one replays from 0), and must not reach past the checked step (a check
that finished out of order: that one runs in a session of its own). A kept session that fails is dropped.

To the verifier a kept session is what every client holds: one session per chain, opened with the checked session's
`max_length`, stepped now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from node.client.session import ChainSession
from node.net.protocol import PREFILL_CHUNK_TOKENS

POOL_SIZE = 3  # open verifier sessions kept per checked stage (and kind of check): at most one per verifier


@dataclass(eq=False)
class Replay:
    """One verifier's one-stage session, opened for the checks of one stage of one checked session."""

    session: ChainSession
    ledger: Any  # the verifier's receipts (node.client.verify.Ledger): its outputs, its signed steps
    dtype: torch.dtype  # the dtype the verifier announced
    ran: torch.Tensor | list[int] | None = None  # the inputs it ran, positions [0, length)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one check at a time
    closed: bool = False

    @property
    def peer(self) -> str:
        return self.session.chain[0].node_id

    @property
    def length(self) -> int:
        if self.ran is None:
            return 0
        return len(self.ran) if isinstance(self.ran, list) else self.ran.shape[1]

    def follows(self, inputs: torch.Tensor | list[int]) -> bool:
        """Whether what it ran is a prefix of `inputs` (the same kind, token ids or hidden states)."""
        length = self.length
        if self.ran is None:
            return True
        if isinstance(self.ran, list) != isinstance(inputs, list):
            return False
        if isinstance(inputs, list):
            return inputs[:length] == self.ran
        return inputs.shape[1] >= length and torch.equal(inputs[:, :length], self.ran)

    def ahead_of(self, position: int) -> bool:
        """Whether it ran past `position`: it cannot re-run the step there."""
        return self.length > position

    async def run(self, inputs: torch.Tensor | list[int], position: int, end: int, *, sample: bool = False,
                  merged: bool = False, draft: tuple[int, ...] = ()
                  ) -> tuple[torch.Tensor, int | tuple[int, ...] | None]:
        """Replays inputs [length, position) in prefill chunks, then runs the step [position, end); returns the
        verifier's outputs for every position it ran, [length, end) as it was before (the catch-up's rows, which the
        caller compares too, then the step's) and, with `sample` (a session opened with sampling: a ring's last
        stage), the token the verifier samples after the step; with a `draft` (a speculating ring's step, whose last
        rows ran it), the tokens it samples for the draft's positions and after, as a speculating last stage does
        (`_kept`). It must follow `inputs` and not be ahead of
        `position` (the caller checks). `merged`: the replay and the step in one step from `length` (one forward
        instead of two, when what is replayed fits a chunk); the verifier then signs no step at `position`."""
        session, tokens = self.session, isinstance(inputs, list)
        rows = (lambda a, b: inputs[a:b]) if tokens else (lambda a, b: inputs[:, a:b])
        start = self.length if merged and end - self.length <= PREFILL_CHUNK_TOKENS else position
        token, outputs = None, []
        if session.sampling is not None:  # hidden states in, the output comes as an echo (the ledger keeps it)
            for offset in range(self.length, start, PREFILL_CHUNK_TOKENS):
                await session.sampled_token(rows(offset, min(start, offset + PREFILL_CHUNK_TOKENS)), offset,
                                            sample=False)
                outputs.append(await self.ledger.output(0, offset))
            token = await session.sampled_token(rows(start, end), start, sample=sample, draft=draft)
            outputs.append(await self.ledger.output(0, start))
            if sample and draft:
                token = await self._kept(token, end - len(draft), draft)
        else:
            step = session.embed_step if tokens else session.step
            for offset in range(self.length, start, PREFILL_CHUNK_TOKENS):
                outputs.append(await step(rows(offset, min(start, offset + PREFILL_CHUNK_TOKENS)), offset))
            outputs.append(await step(rows(start, end), start))
        self.ran = list(inputs[:end]) if tokens else inputs[:, :end].clone()
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], token

    async def _kept(self, first: int, position: int, draft: tuple[int, ...]) -> tuple[int, ...]:
        """The tokens the verifier sampled from `position` on for a step that ran `draft` there, starting with
        `first`: the draft's tokens it kept, then its own (node.model.speculative.verify_draft), each at its position,
        up to the one that ends generation, as the server sends them (`_feed_tokens`)."""
        tokens, params = [first], self.session.sampling
        while (len(tokens) <= len(draft) and tokens[-1] == draft[len(tokens) - 1]
               and tokens[-1] not in params.stop_token_ids and position + len(tokens) - 1 < self.session.max_length):
            tokens.append(await self.session.next_token(position + len(tokens)))
        return tuple(tokens)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.session.close()


class Replays:
    """The verifier sessions kept for one checked session: per (stage index, whether the check samples), up to
    POOL_SIZE, each on another verifier. Closed with the checked session (`close`), once the checks still running
    on them (`running`: a failed chain's checks go on while the next chain opens) are done."""

    def __init__(self) -> None:
        self._pools: dict[tuple[int, bool], dict[str, Replay]] = {}
        self._last_turn: dict[int, asyncio.Future] = {}
        self._running = 0
        self._ending = False
        self.closed = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Around a check of the session: its kept sessions stay open until it ends."""
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if self._ending and not self._running:
                await self.close()

    def turn(self, index: int) -> tuple[asyncio.Future | None, asyncio.Future]:
        """A place in line for a check of stage `index` that starts now: (the previous check's turn, to await
        before using the stage's kept sessions; this one's, to set once done). Checks run in the background and
        would reach a kept session in whatever order their other awaits end; one that came after a later one
        could not use it (it cannot rewind), so they take it in the order they were sampled."""
        previous = self._last_turn.get(index)
        self._last_turn[index] = mine = asyncio.get_running_loop().create_future()
        return (previous if previous is not None and not previous.done() else None), mine

    def pool(self, index: int, samples: bool) -> dict[str, Replay]:
        """Verifier peer -> its kept session, for checks of stage `index`."""
        return self._pools.setdefault((index, samples), {})

    @staticmethod
    async def drop(pool: dict[str, Replay] | None, replay: Replay) -> None:
        """Closes `replay` and forgets it (a session that failed, or ran other inputs than the check's)."""
        if pool is not None and pool.get(replay.peer) is replay:
            del pool[replay.peer]
        await replay.close()

    async def prune(self, pool: dict[str, Replay], verifiers: list[str]) -> None:
        """Closes the kept sessions of verifiers no longer among `verifiers` (gone offline, banned)."""
        for peer in [peer for peer in pool if peer not in verifiers]:
            await self.drop(pool, pool[peer])

    async def close(self) -> None:
        """Closes every kept session now, or, while checks run, once the last of them ends."""
        self._ending = True
        if self._running:
            return
        self.closed = True
        for pool in self._pools.values():
            for replay in list(pool.values()):
                with contextlib.suppress(Exception):
                    await replay.close()
            pool.clear()
