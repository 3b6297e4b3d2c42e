"""Batching the steps of concurrent sessions into shared forward passes on one compute thread.

Decode is memory-bound: one token of one session reads every weight of the stage, so N sessions
stepping together in one pass cost about what one does. `StepBatcher.run` is awaited from the
event loop by each session's handler; steps wait in a FIFO queue while the compute thread is busy
and are taken together when it frees up.

Admission: a pass takes the waiting decode steps (1 token each) of up to `max_batch_size` sessions,
oldest first, and fills the rest of its `max_batch_tokens` with chunks of waiting prefills, oldest
first (`Stage.forward_batch` runs steps of any lengths in one pass). Decodes never wait behind a long
prompt, and a prompt advances in every pass, however many sessions decode.

Gathering: sessions that arrive at different moments would each get a pass of their own forever
after (an idle stage starts at once; whoever comes a moment later waits a whole pass and goes alone),
and a loaded node then does N passes per round of tokens where one would do. So the batcher keeps
each session's decode rhythm (the interval between its steps here) and, before a decode pass, waits
for sessions whose next step is due within `max_gather_s`, never past the moment it is overdue.
Once two sessions share a pass they leave together and arrive together at the next stage and in
the next round, so the wait is paid about once per session. A lone session is never held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from node.model.speculative import MAX_DRAFT_TOKENS
from node.model.stage import KVCache, Stage, StepInput

logger = logging.getLogger(__name__)


MAX_ALONE_TOKENS = 1 + MAX_DRAFT_TOKENS


class BatcherClosed(RuntimeError):
    pass


@dataclass(eq=False)
class _Pending:
    step: StepInput
    future: asyncio.Future
    done_tokens: int = 0  # of a prefill run in chunks
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        return self.step.tokens == 1

    @property
    def tokens_left(self) -> int:
        return self.step.tokens - self.done_tokens

    def next_input(self, max_tokens: int) -> StepInput:
        """The step itself, or for a prefill the next chunk of at most `max_tokens` tokens."""
        step = self.step
        if self.done_tokens == 0 and step.tokens <= max_tokens:
            return step
        chunk = step.hidden[:, self.done_tokens: self.done_tokens + max_tokens]
        return StepInput(chunk, step.position + self.done_tokens, step.cache, step.layers)


@dataclass
class _Rhythm:
    """When one session's decode steps arrive here: the last one, and the usual interval between them."""

    last: float
    period: float | None = None

    def arrived(self, now: float) -> None:
        interval = now - self.last
        if self.period is None or not self.period / 3 <= interval <= 3 * self.period:
            self.period = interval  # the first interval, or a new pace (a pause, a new chain): start over
        else:
            self.period = 0.7 * self.period + 0.3 * interval
        self.last = now

    def due_by(self, now: float, within_s: float, usual_period: float | None) -> float | None:
        """The moment its next step is overdue, if that step is expected within `within_s` of now. A session
        with one step so far is taken to keep the pace usual here (`usual_period`), if there is one."""
        period = self.period or usual_period
        if period is None or self.last + period > now + within_s:
            return None
        overdue = self.last + 1.5 * period  # tolerate jitter of half a period, no more
        return overdue if overdue > now else None


class StepBatcher:
    """Runs sessions' steps on `stage`, batching concurrent decode steps; see the module docstring."""

    def __init__(self, stage: Stage, *, max_batch_size: int = 32, max_batch_tokens: int = 512,
                 max_gather_s: float = 0.05, executor: ThreadPoolExecutor | None = None) -> None:
        if max_batch_size < 1 or max_batch_tokens < 2:
            raise ValueError("max_batch_size must be >= 1 and max_batch_tokens >= 2")
        self.stage = stage
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens  # decode steps plus prefill chunks in one pass
        self.max_gather_s = max_gather_s  # 0 turns gathering off
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self._waiting: deque[_Pending] = deque()
        self._running = 0
        self._busy: set[KVCache] = set()  # caches with a step waiting or running: one at a time each
        self._rhythms: weakref.WeakKeyDictionary[KVCache, _Rhythm] = weakref.WeakKeyDictionary()
        self._sessions: weakref.WeakSet[KVCache] = weakref.WeakSet()  # caches that ran here, not forgotten yet
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # decode steps in a pass -> passes run (observability)
        self.gather_waits = 0  # passes held back for due sessions
        self.steps_done = 0
        self.compute_s = 0.0  # wall time the compute thread spent in forward passes

    @property
    def queue_len(self) -> int:
        """Steps waiting for the compute thread."""
        return len(self._waiting)

    @property
    def pending(self) -> int:
        """Steps not answered yet: waiting or running."""
        return len(self._waiting) + self._running

    async def run(self, cache: KVCache, hidden: torch.Tensor, position: int,
                  layers: Sequence[int] | None = None) -> torch.Tensor:
        """`Stage.forward(hidden, position, cache, layers)`, batched with other sessions' steps.

        Raises ValueError at once for a step that cannot run (bad shape, wrong position, a step of this
        cache already pending), without queueing it; BatcherClosed after `shutdown()`."""
        if self._closed:
            raise BatcherClosed("the stage is shutting down")
        if cache in self._busy:
            raise ValueError("this session already has a step waiting or running")
        step = StepInput(hidden, position, cache, layers)
        self.stage.check_step(step)
        loop = asyncio.get_running_loop()
        known = cache in self._sessions
        self._sessions.add(cache)
        if step.tokens == 1:
            if (rhythm := self._rhythms.get(cache)) is None:
                self._rhythms[cache] = _Rhythm(loop.time())
            else:
                rhythm.arrived(loop.time())
        # Not a session's first step here: sessions that start together get one loop turn to meet. A decode step,
        # or one with a speculative draft (a few tokens: as quick as a decode on a memory-bound pass).
        if step.tokens <= MAX_ALONE_TOKENS and known and self._worker is None and self.alone:
            return self._run_alone(step)
        pending = _Pending(step, loop.create_future())
        self._busy.add(cache)
        self._waiting.append(pending)
        self._arrival.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._work())
        return await pending.future

    def _run_alone(self, step: StepInput) -> torch.Tensor:
        """A lone session's decode step, run here and now on the event loop (see `alone`). It skips the queue,
        the worker task and their loop turns: on a ring that idles between tokens each turn runs on cold
        caches, and a stage paid 0.2-0.3 ms per step for them (measured here)."""
        self._running = 1
        try:
            result = self._compute([step])[0]
        finally:
            self._running = 0
            self.steps_done += 1
            self.batch_sizes[1] += step.tokens == 1  # decode passes by size; a draft's pass is not one
        if isinstance(result, Exception):
            raise result
        return result

    def forget(self, cache: KVCache) -> None:
        """The session has closed: stop expecting its steps."""
        self._rhythms.pop(cache, None)
        self._sessions.discard(cache)

    def shutdown(self) -> None:
        """Fails waiting steps; a running pass finishes in the background (its steps still get answers)."""
        self._closed = True
        while self._waiting:
            self._finish(self._waiting.popleft(), error=BatcherClosed("the stage is shutting down"))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the worker: one task, alive while there is work -------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[_Pending, int]] = []
        try:
            while self._waiting and not self._closed:
                # One loop turn first: sessions whose last step just returned may already have their next
                # step ready (a local client, a pushed hop); letting them in now makes the batch bigger.
                await asyncio.sleep(0)
                await self._gather()
                batch = self._next_batch()
                if not batch:
                    continue
                inputs = [pending.next_input(budget) for pending, budget in batch]
                self._running = len(batch)
                try:
                    if len(inputs) == 1 and inputs[0].tokens == 1 and self.alone:
                        results = self._compute(inputs)
                    else:
                        results = await loop.run_in_executor(self._executor, self._compute, inputs)
                finally:
                    self._running = 0
                unfinished = []
                for (pending, _), step, result in zip(batch, inputs, results, strict=True):
                    if self._deliver(pending, step, result):
                        unfinished.append(pending)
                self._waiting.extendleft(reversed(unfinished))  # prefills with chunks to go keep their place
                batch = []
        except Exception as e:  # e.g. the executor was shut down under us
            logger.exception("step batcher stopped")
            for pending, _ in batch:  # the pass in hand: its callers must hear too
                if not pending.future.done():
                    self._finish(pending, error=e)
            while self._waiting:
                self._finish(self._waiting.popleft(), error=e)
        finally:
            while self._closed and self._waiting:
                self._finish(self._waiting.popleft(), error=BatcherClosed("the stage is shutting down"))
            self._worker = None

    @property
    def alone(self) -> bool:
        """Whether at most one session steps here and nothing else waits. Its decode pass then runs on the
        event loop itself (and so does a server's LM head for it): handing it to the compute thread and back
        costs about 0.25 ms each way on an idle machine (two thread wake-ups), 3% of a token on a 3-stage
        chain, and there is nothing for the loop to do meanwhile. With other sessions about, the loop must
        stay free to send their outputs on while a pass runs.

        Only with one torch thread, though: torch run from a second thread gets an OpenMP team of its own,
        and with two teams on the cores GNU OpenMP stops spinning between parallel regions, so every op
        of both waits for a wake-up (2 threads on 2 cores here: 32 -> 55 ms per token)."""
        return not self._waiting and len(self._sessions) <= 1 and torch.get_num_threads() == 1

    async def _gather(self) -> None:
        """Holds a decode pass back until the sessions due within `max_gather_s` have arrived, or are overdue."""
        decodes = sum(p.is_decode for p in self._waiting)
        if self.max_gather_s <= 0 or not decodes or decodes >= self.max_batch_size:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        periods = [r.period for r in self._rhythms.values() if r.period is not None]
        usual_period = statistics.median(periods) if periods else None
        due = {cache: by for cache, rhythm in self._rhythms.items()
               if cache not in self._busy and (by := rhythm.due_by(now, self.max_gather_s, usual_period)) is not None}
        if not due:
            return
        self.gather_waits += 1
        deadline = min(now + self.max_gather_s, max(due.values()))
        while not self._closed and any(cache not in self._busy for cache in due) and loop.time() < deadline:
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), deadline - loop.time())

    def _next_batch(self) -> list[tuple[_Pending, int]]:
        """Takes the next pass off the queue: (step, tokens it may run now) for each step in it."""
        for pending in [p for p in self._waiting if p.future.done()]:  # callers that gave up
            self._waiting.remove(pending)
            self._busy.discard(pending.step.cache)
        prefills = [p for p in self._waiting if not p.is_decode]
        max_decodes = min(self.max_batch_size, self.max_batch_tokens - (1 if prefills else 0))
        batch = [(p, 1) for p in self._waiting if p.is_decode][:max_decodes]
        budget = self.max_batch_tokens - len(batch)
        for pending in prefills:
            if budget <= 0:
                break
            batch.append((pending, min(budget, pending.tokens_left)))
            budget -= batch[-1][1]
        for pending, _ in batch:
            self._waiting.remove(pending)
        if batch and batch[0][0].is_decode:
            self.batch_sizes[sum(p.is_decode for p, _ in batch)] += 1
        return batch

    def _compute(self, inputs: list[StepInput]) -> list[torch.Tensor | Exception]:
        """On the compute thread. A failed batch is retried one step at a time, so only the culprit
        fails (caches advance only when a pass completes, so the retry starts from a clean state)."""
        started = time.perf_counter()
        try:
            return self.stage.forward_batch(inputs)
        except Exception as e:
            if len(inputs) == 1:
                return [e]
        finally:
            self.compute_s += time.perf_counter() - started
        results: list[torch.Tensor | Exception] = []
        for step in inputs:
            try:
                results.append(self.stage.forward_batch([step])[0])
            except Exception as e:
                results.append(e)
        return results

    def _deliver(self, pending: _Pending, step: StepInput, result: torch.Tensor | Exception) -> bool:
        """Answers the step, or keeps a prefill chunk's output; True if the step has chunks to go."""
        if isinstance(result, Exception):
            self._finish(pending, error=result)
            return False
        pending.done_tokens += step.tokens
        if pending.tokens_left > 0:
            if self._closed:
                self._finish(pending, error=BatcherClosed("the stage is shutting down"))
                return False
            pending.outputs.append(result)
            return True
        self._finish(pending, result=torch.cat([*pending.outputs, result], dim=1) if pending.outputs else result)
        return False

    def _finish(self, pending: _Pending, *, result: torch.Tensor | None = None,
                error: BaseException | None = None) -> None:
        self._busy.discard(pending.step.cache)
        self.steps_done += 1
        if pending.future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)
