"""A chain session that survives stages dying or stalling mid-answer.

When a stage fails, the client bans that peer, picks a new chain without it, replays
what the old chain had been fed as a chunked prefill to rebuild every stage's KV cache,
and goes on. The replay recomputes exactly what the lost caches held, so the answer
continues as if nothing happened:
- `generate` (a ring: the last stage samples) replays the prompt and the tokens received
  so far, and asks the new ring for the rest. Sampling depends only on (seed, position)
  (`node.model.sampling`), so the new last stage draws what the old one would have.
- `step` (the client embeds and samples) remembers the hidden states it fed and replays them.

Every chain is checked (`node.client.verify`, docs/trust.md): its stages' receipts are bound in a ledger, and
an `Auditor` re-runs a random sample of steps elsewhere. A ring is checked off its critical path: the checks of
the tokens already yielded run in the background, and a liar found among them (or an equivocation) ends the
chain; `generate` then yields a `Revision` — the answer keeps only the tokens made before that chain opened —
and the rest is rebuilt on a chain without the liar, so the final answer is the honest one. A chain that fails for
another reason is replaced at once, its pending checks going on meanwhile: a lie they find later revises the
answer back to before that chain (its tokens stand only once its checks pass). A step of the client's
own chain (`step`) is checked before its output is used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from node.client.generate import generate
from node.client.session import ChainSession, NoChainError, StageFailure, SwarmClient
from node.client.verify import LIES, PROVEN_BAN_S, SUSPECT_AVOID_S, Auditor, Ledger, attach_ledger
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.net.evidence import EvidenceError
from node.net.protocol import PREFILL_CHUNK_TOKENS
from swarm.types import Hop

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Codes that mean "this stage cannot take the session", not "this stage is broken".
# Answers that blame no stage: a refusal, a session reclaimed for being idle, a direct link between stages that
# broke (either end could be at fault). The client retries without banning anyone.
REFUSALS = {"no_capacity", "busy", "draining", "link_failed", "reclaimed", "idle"}
# Under churn a gap in the swarm's layers closes within seconds (a killed node restarts, the rebalancer moves one
# in): an answer that finds no chain waits this long for one, re-reading the swarm every COVER_POLL_S, before it
# fails. A model no node serves at all fails at once.
COVER_WAIT_S = 20.0
COVER_POLL_S = 1.0
# A stage that timed out but still answers a probe of its info (within LIVENESS_PROBE_S) is alive, only slow or
# stalled for this session: it is avoided this long, not banned, so an answer whose only node of a range stalled
# once resumes on it within the cover wait. A stage that does not answer (dead, frozen, cut off) is banned, and so
# is one that stalls again within STALL_MEMORY_S: a node answering probes but no steps would otherwise hold each
# answer it is picked for a step timeout, every STALLED_AVOID_S.
LIVENESS_PROBE_S = 2.0
STALLED_AVOID_S = 5.0
STALL_MEMORY_S = 120.0
SETTLE_TIMEOUT_S = 60.0  # an answer waits this long at most for its last checks (each one tries several verifiers)


@dataclass(frozen=True)
class Revision:
    """Yielded by a ring's `generate` when a check failed: of the tokens yielded so far, only the first `keep`
    stand (they were made before the chain with the liar opened); the tokens after this replace the rest."""

    keep: int


@dataclass(frozen=True)
class FailoverEvent:
    peer: str
    code: str
    position: int
    recovery_s: float  # from noticing the failure to the retried step's answer
    reporter: str | None = None  # who said so: another stage than `peer` for an accusation


class ResilientSession:
    """Generation on replaceable chain sessions: as a ring (`generate`), or step by step with the client
    embedding and sampling (`step`, the `Chain` protocol of `node.client.generate`). Use one or the other."""

    def __init__(self, client: SwarmClient, *, max_length: int, relay: bool = False, wire: str = "none",
                 max_failovers: int = 5, backoff_s: float = 0.2, step_timeout_s: float = 30.0,
                 auditor: Auditor | None = None, verify: bool = True, speculate: int = 0,
                 cover_wait_s: float = COVER_WAIT_S) -> None:
        self.client, self.max_length = client, max_length
        # Checks of the stages' work (node.client.verify): on unless `verify` is False (benchmarks' baseline).
        self.auditor = auditor or (Auditor(client, step_timeout_s=step_timeout_s) if verify else None)
        self.ledger: Ledger | None = None  # the current chain's receipts
        self.relay, self.wire = relay, wire
        self.speculate = speculate  # a ring's draft length limit (node.net.protocol: speculation); 0: none
        self.max_failovers, self.backoff_s, self.step_timeout_s = max_failovers, backoff_s, step_timeout_s
        self.cover_wait_s = cover_wait_s
        self._uncovered_since: float | None = None  # when the current wait for a chain began (`_wait_for_cover`)
        self.session: ChainSession | None = None
        self.history = _Inputs()  # chain inputs fed so far, in position order
        self.events: list[FailoverEvent] = []
        self.chains: list[tuple[Hop, ...]] = []  # every chain opened, in order: more than one after a failover
        self._pending_event: tuple[StageFailure, int, float] | None = None  # a failure not yet recovered from
        self.unfinished_checks = 0  # a ring's checks cut off after SETTLE_TIMEOUT_S: those steps went unchecked

    async def open(self) -> None:
        """Opens a chain now rather than at the first step; a stage that cannot open is failed over as in `step`."""
        await self._with_failover(0, self._ensure_chain)

    async def _open_new_chain(self, sampling: SamplingParams | None = None) -> ChainSession:
        chain = await self.client.choose_chain(session_tokens=self.max_length, relay=self.relay)
        wire = self.client.wire_for(chain) if self.wire == "auto" else self.wire
        session = await self.client.open_session(
            chain, max_length=self.max_length, relay=self.relay, wire=wire, step_timeout_s=self.step_timeout_s,
            sampling=sampling, speculate=self.speculate if sampling is not None else 0,
        )
        self.ledger = attach_ledger(session, self.client.model)
        self.chains.append(tuple(chain))
        return session

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       head: ClientHead | None = None) -> AsyncIterator[int | Revision]:
        """Yields generated tokens, up to a stop token (yielded) or max_new_tokens. Without `head` the
        chain runs as a ring, and a failed ring is replaced by a new one fed the prompt and the tokens so
        far, which samples the rest; a ring caught lying is replaced the same way after a `Revision`. With
        `head` the client embeds and samples (`node.client.generate`)."""
        if head is not None:
            await self.open()
            async for token in generate(self, head, prompt_ids, params):
                yield token
            return
        if self.relay:
            raise ValueError("a ring is not relayed: pass the client's head")
        produced: list[int] = []
        failovers, chain_from = 0, 0
        checks = _Checks()
        try:
            while True:
                try:
                    if self.session is None:
                        chain_from = len(produced)  # tokens made by earlier chains (their checks may still run)
                        rest = replace(params, max_new_tokens=params.max_new_tokens - len(produced))
                        self.session = await self._open_new_chain(sampling=rest)
                    async for token in self.session.tokens([*prompt_ids, *produced], 0):
                        produced.append(token)
                        self._check_ring_step(checks, [*prompt_ids, *produced], chain_from)
                        checks.raise_caught()
                        self._record_recovery()
                        yield token
                    self._check_ring_tail(checks, [*prompt_ids, *produced], chain_from)
                    self.unfinished_checks += await _settle(checks)  # the answer is final once its checks are in
                    if (lie := _late_lie(self.session.events)) is not None:
                        raise lie  # found in what arrived after the last token: handled as one found before it
                    return
                except (StageFailure, NoChainError) as error:
                    # A chain that failed for another reason than a lie: its pending checks go on while the next
                    # chain opens and continues the answer, and its tokens stand only once they pass (a liar that
                    # goes silent right after lying must not keep its lies by cutting its checks short): a lie
                    # found later revises the answer back to before that chain, as below.
                    if isinstance(error, StageFailure) and error.code in LIES:
                        keep = checks.caught_from if checks.caught_from is not None else chain_from
                        checks.retire()
                        if len(produced) > keep:
                            del produced[keep:]
                            yield Revision(keep)
                    failovers = await self._recover(error, len(prompt_ids) + len(produced), failovers)
        finally:
            _cancel(checks)

    def _check_ring_step(self, checks: _Checks, ids: list[int], chain_from: int) -> None:
        """Maybe checks one stage of the ring step that sampled the last of `ids`, in the background; the chain's
        tokens begin at `chain_from` of the answer's."""
        if self.auditor is None or not self.auditor.sample():
            return
        if (step := self._last_ring_step(ids)) is not None:
            self._start_ring_check(checks, self.auditor.pick_stage(self.session), step, ids, chain_from)

    def _check_ring_tail(self, checks: _Checks, ids: list[int], chain_from: int) -> None:
        """At the answer's end, one more check of each stage whose last step no check was started at. A check
        compares every position its verifier replays (`Auditor._replayed_lie`), so every position up to a stage's
        last check is compared; these cover the rest, the answer's last tokens. Price: per stage, one forward of
        the positions since its last check, on a verifier, before the answer is final."""
        if self.auditor is None or self.auditor.probability <= 0:
            return
        if (step := self._last_ring_step(ids)) is not None:
            for index in range(len(self.session.chain)):
                if self.ledger.checked_through.get(index, -1) < step:
                    self._start_ring_check(checks, index, step, ids, chain_from)

    def _last_ring_step(self, ids: list[int]) -> int | None:
        """The position of the ring's step that sampled the last of `ids`. In a speculating ring, a kept draft token
        was fed to the first stage in no step of its own: the step is the one that ran the draft."""
        ledger = self.ledger
        steps = [p for p in ledger.fed.get(0, {}) if p < len(ids) - 1]
        if not steps:
            return None
        step, echoed = max(steps), ledger.outputs.get(0, {})
        within = [p for p, rows in echoed.items() if p < step < p + rows.shape[1]]  # a row of an earlier step
        return max(within) if within and step not in echoed else step

    def _start_ring_check(self, checks: _Checks, index: int, step: int, ids: list[int], chain_from: int) -> None:
        """Checks stage `index`'s ring step at `step` in the background."""
        through = self.ledger.checked_through
        through[index] = max(through.get(index, step), step)
        task = asyncio.create_task(self.auditor.check(self.session, index, step, token_ids=ids[:len(ids) - 1]))
        checks[task] = chain_from

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if position != self.history.length:
            raise ValueError(f"step at position {position}, but {self.history.length} positions were fed so far")

        async def attempt() -> torch.Tensor:
            await self._ensure_chain()
            output = await self.session.step(hidden, position)
            if self.auditor is not None and self.auditor.sample():
                index = self.auditor.pick_stage(self.session)
                await self.auditor.check(self.session, index, position, chain_inputs=self.history.through(hidden))
            return output

        output = await self._with_failover(position, attempt)
        self.history.append(hidden)
        return output

    async def _ensure_chain(self) -> None:
        """A chain with every input fed so far: the current one, or a new one rebuilt by replay."""
        if self.session is None:
            self.session = await self._open_new_chain()
            await self._replay()

    async def _with_failover(self, position: int, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs `attempt` until it succeeds or `_recover` gives up."""
        failovers = 0
        while True:
            try:
                result = await attempt()
                break
            except (StageFailure, NoChainError) as error:
                failovers = await self._recover(error, position, failovers)
        self._record_recovery()
        return result

    async def _recover(self, error: StageFailure | NoChainError, position: int, failovers: int) -> int:
        """After a failed attempt: the failed stage is banned (unless it only refused) and its chain dropped,
        so the next attempt routes around it. Returns the failovers so far; re-raises after `max_failovers`."""
        if isinstance(error, NoChainError):
            await self._wait_for_cover(error)
            return failovers
        failovers += 1
        started = time.perf_counter()
        await self._abandon(error, position)
        if failovers > self.max_failovers:
            raise NoChainError(f"gave up after {self.max_failovers} failovers; last: {error}") from error
        self._pending_event = self._pending_event or (error, position, started)
        await asyncio.sleep(_backoff(self.backoff_s, failovers))
        return failovers

    async def _abandon(self, failure: StageFailure, position: int) -> None:
        logger.warning("stage %s failed at position %d (%s); failing over", failure.peer, position, failure)
        if failure.accusation or failure.code in LIES:
            # One stage's word against another's, an equivocation or an unresolved dispute: no evidence of which
            # lied, so both are avoided for a while and neither is banned (a proven liar already is).
            for peer in (failure.peer, failure.reporter):
                self.client.ban(peer, for_s=SUSPECT_AVOID_S)
            if failure.code == "equivocated":  # its own signatures convict it (node.client.verify.Ledger._culprit)
                self.client.ban(failure.peer, for_s=PROVEN_BAN_S)
                await self._publish_proofs()
        elif (failure.code == "timeout" and self.client.first_stall(failure.peer, within_s=STALL_MEMORY_S)
              and await self._answers(failure.peer)):
            self.client.ban(failure.peer, for_s=STALLED_AVOID_S)
        elif failure.code not in REFUSALS:
            self.client.ban(failure.peer)
        await self._close_chain()

    async def _answers(self, peer: str) -> bool:
        """Whether `peer` answers a probe of its info within LIVENESS_PROBE_S."""
        try:
            await self.client.node_info(peer, timeout_s=LIVENESS_PROBE_S)
            return True
        except Exception:  # a timeout, a broken connection or a malformed answer alike: not alive for us
            return False

    async def _publish_proofs(self) -> None:
        """Publishes the chain's proofs of equivocation (node.net.evidence), for other clients and the planners."""
        book = self.client.peer.proof_book(self.client.model)
        for proof in self.ledger.proofs if self.ledger is not None else ():
            try:
                await asyncio.wait_for(book.publish(proof), self.step_timeout_s)
                logger.warning("published the proof that %s equivocated", proof["accused"])
            except (EvidenceError, TimeoutError) as e:
                logger.warning("could not publish a proof of equivocation: %r", e)
        if self.ledger is not None:
            self.ledger.proofs.clear()

    async def _replay(self) -> None:
        """Rebuilds the new chain's KV caches from the inputs fed so far."""
        if not self.history.length:
            return
        inputs = self.history.fed()
        for offset in range(0, inputs.shape[1], PREFILL_CHUNK_TOKENS):
            await self.session.step(inputs[:, offset : offset + PREFILL_CHUNK_TOKENS], offset)

    async def _wait_for_cover(self, error: NoChainError) -> None:
        """No chain now: waits `COVER_POLL_S` for the swarm to re-form, or re-raises `error` once it has waited
        `cover_wait_s` since the first miss, or at once when no layer of the model is served at all (nothing to wait
        for: a model nobody serves, not a gap)."""
        now = time.monotonic()
        if self._uncovered_since is None:
            self._uncovered_since = now
        nobody_serves = len(error.uncovered_layers) == self.client.num_layers
        if nobody_serves or now - self._uncovered_since >= self.cover_wait_s:
            self._uncovered_since = None
            raise error
        logger.info("no chain yet (%s); waiting for the swarm to re-form", error)
        await asyncio.sleep(COVER_POLL_S)

    def _record_recovery(self) -> None:
        self._uncovered_since = None
        if self._pending_event is None:
            return
        failure, position, started = self._pending_event
        self.events.append(FailoverEvent(failure.peer, failure.code, position, time.perf_counter() - started,
                                         failure.reporter))
        self._pending_event = None

    async def _close_chain(self) -> None:
        """Closes the current chain's session, and the verifier sessions its checks kept open."""
        if self.session is not None:
            await self.session.close()
            if self.auditor is not None:
                await self.auditor.release(self.session)
        self.session = None

    async def close(self) -> None:
        await self._close_chain()
        if self.auditor is not None:  # what its checks vouched for in this session, for everyone to read
            try:
                await asyncio.wait_for(self.client.publish_credit(), 10.0)
            except Exception as e:  # credit is bookkeeping: a DHT that does not answer must not fail the answer
                logger.info("could not publish checked credit: %r", e)


class _Inputs:
    """Hidden states fed to the chain, in one buffer that doubles as it fills: appending a step and
    viewing everything fed so far cost O(step), not a copy of the whole history each time."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None  # [1, capacity, hidden] on the CPU
        self.length = 0

    def fed(self) -> torch.Tensor:
        """[1, length, hidden]: everything appended so far (a view; valid until the next append)."""
        return self._buffer[:, : self.length]

    def through(self, hidden: torch.Tensor) -> torch.Tensor:
        """What `fed()` will be once `hidden` is appended, without appending it."""
        end = self.length + hidden.shape[1]
        if self._buffer is None or end > self._buffer.shape[1] or self._buffer.dtype != hidden.dtype:
            grown = torch.empty(1, max(end, 2 * self.length, 64), hidden.shape[2], dtype=hidden.dtype)
            if self._buffer is not None:
                grown[:, : self.length] = self._buffer[:, : self.length]
            self._buffer = grown
        self._buffer[:, self.length: end] = hidden.detach().cpu()
        return self._buffer[:, :end]

    def append(self, hidden: torch.Tensor) -> None:
        self.through(hidden)
        self.length += hidden.shape[1]


class _Checks(dict):
    """An answer's pending checks, each with where its chain's tokens begin in the answer (those a lie it finds
    withdraws: the chain's, and the later chains' built on them)."""

    caught_from: int | None = None  # of the check whose failure `raise_caught` raised last

    def __init__(self) -> None:
        super().__init__()
        # Checks of tokens a revision withdrew: they run on, since a lie they find still bans its liar and publishes
        # the proof (a colluding pair's second liar is caught in the same answer as the first), but they revise
        # nothing more. `_settle` waits for them too.
        self.retired: set[asyncio.Task] = set()

    def retire(self) -> None:
        """After a revision: the pending checks go on as `retired`, the finished ones are forgotten."""
        for task in self:
            if task.done():
                _seen(task)
            else:
                self.retired.add(task)
        self.clear()
        self.caught_from = None

    def raise_caught(self) -> None:
        """Raises the failure of a finished check that caught a liar; forgets the finished ones."""
        for task in [t for t in self if t.done()]:
            chain_from = self.pop(task)
            if not task.cancelled() and isinstance(task.exception(), StageFailure):
                self.caught_from = chain_from
                raise task.exception()
            if not task.cancelled() and task.exception() is not None:
                logger.warning("a check could not run: %r", task.exception())


def _late_lie(events: asyncio.Queue) -> StageFailure | None:
    """A lie the ledger found after the answer's last token was read (an equivocation seen in a late echo, under
    load): it was queued, but nothing reads the chain's events once the tokens are in, so the liar kept its place
    (test_verify's equivocator, 1 full-suite run in 4). Other queued items go back as they were."""
    lie, others = None, []
    while not events.empty():
        item = events.get_nowait()
        if lie is None and isinstance(item[1], StageFailure) and item[1].code in LIES:
            lie = item[1]
        else:
            others.append(item)
    for item in others:
        asyncio.Queue.put_nowait(events, item)  # not the ledger's put_nowait: it has seen them already
    return lie


async def _settle(checks: _Checks, timeout_s: float = SETTLE_TIMEOUT_S) -> int:
    """Waits for the answer's checks to end, but not for ever: a check that cannot finish (its verifiers died
    and none answers, or a machine too loaded to run it in time) leaves its step unchecked rather than the answer
    unfinished. Returns how many were left unfinished."""
    late: set[asyncio.Task] = set()
    if checks or checks.retired:  # all of them, even after one found a lie: each liar is then caught with evidence
        _, late = await asyncio.wait([*checks, *checks.retired], timeout=timeout_s)
    if late:
        logger.warning("%d check(s) of this answer did not finish within %.0f s: left unchecked", len(late),
                       timeout_s)
        for task in late:
            task.cancel()
            checks.pop(task, None)
    for task in checks.retired:
        if task.done():
            _seen(task)
    checks.retired.clear()
    checks.raise_caught()
    return len(late)


def _cancel(checks: _Checks) -> None:
    for task in [*checks, *checks.retired]:
        _seen(task)
        task.cancel()
    checks.clear()
    checks.retired.clear()
    checks.caught_from = None


def _seen(task: asyncio.Task) -> None:
    """Marks a finished check's exception as seen: what it found was acted on already, or no longer matters."""
    if task.done() and not task.cancelled():
        task.exception()


def _backoff(base_s: float, attempt: int) -> float:
    """The first retry goes at once (another replica is usually there); later ones back off exponentially."""
    return 0.0 if attempt <= 1 else base_s * 2 ** (attempt - 2)
