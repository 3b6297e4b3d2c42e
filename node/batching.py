"""Batching the steps of concurrent sessions into shared forward passes on one compute thread.

Decode is memory-bound: one token of one session reads every weight of the stage, so N sessions
stepping together in one pass cost about what one does. `StepBatcher.run` is awaited from the
event loop by each session's handler; steps that arrive while the compute thread is busy wait in
a FIFO queue and are taken together when it frees up. Nothing is held back on purpose: an idle
batcher starts a step at once (no added latency), so batches form exactly when there is a backlog.

Admission, in order: a batch is either decode steps (1 token each) of up to `max_batch_size`
sessions, oldest first, or one chunk of at most `max_batch_tokens` tokens of the oldest prefill.
The oldest waiting step decides which, except that after a prefill chunk, waiting decode steps go
next: a long prefill and a stream of decodes alternate, and neither starves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from node.stage import KVCache, Stage, StepInput

logger = logging.getLogger(__name__)


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

    def next_input(self, max_tokens: int) -> StepInput:
        """The step itself, or for a prefill the next chunk of at most `max_tokens` tokens."""
        step = self.step
        if self.done_tokens == 0 and step.tokens <= max_tokens:
            return step
        chunk = step.hidden[:, self.done_tokens: self.done_tokens + max_tokens]
        return StepInput(chunk, step.position + self.done_tokens, step.cache, step.layers)


class StepBatcher:
    """Runs sessions' steps on `stage`, batching concurrent decode steps; see the module docstring."""

    def __init__(self, stage: Stage, *, max_batch_size: int = 32, max_batch_tokens: int = 512,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1")
        self.stage = stage
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens  # also the prefill chunk size
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self._waiting: deque[_Pending] = deque()
        self._running = 0
        self._busy: set[KVCache] = set()  # caches with a step waiting or running: one at a time each
        self._worker: asyncio.Task | None = None
        self._after_prefill = False
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # decode batch size -> passes run (observability, tests)
        self.steps_done = 0

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
        pending = _Pending(step, asyncio.get_running_loop().create_future())
        self._busy.add(cache)
        self._waiting.append(pending)
        if self._worker is None:
            self._worker = asyncio.create_task(self._work())
        return await pending.future

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
        try:
            while self._waiting and not self._closed:
                # One loop turn first: sessions whose last step just returned may already have their next
                # step ready (a local client, a pushed hop); letting them in now makes the batch bigger.
                await asyncio.sleep(0)
                batch = self._next_batch()
                if not batch:
                    continue
                inputs = [p.next_input(self.max_batch_tokens) for p in batch]
                self._running = len(batch)
                try:
                    results = await loop.run_in_executor(self._executor, self._compute, inputs)
                finally:
                    self._running = 0
                for pending, step, result in zip(batch, inputs, results, strict=True):
                    self._deliver(pending, step, result)
        except Exception as e:  # e.g. the executor was shut down under us
            logger.exception("step batcher stopped")
            while self._waiting:
                self._finish(self._waiting.popleft(), error=e)
        finally:
            while self._closed and self._waiting:
                self._finish(self._waiting.popleft(), error=BatcherClosed("the stage is shutting down"))
            self._worker = None

    def _next_batch(self) -> list[_Pending]:
        """Takes the next batch off the queue."""
        for pending in [p for p in self._waiting if p.future.done()]:  # callers that gave up
            self._waiting.remove(pending)
            self._busy.discard(pending.step.cache)
        if not self._waiting:
            return []
        decodes = [p for p in self._waiting if p.is_decode]
        if decodes and (self._waiting[0].is_decode or self._after_prefill):
            batch = decodes[: min(self.max_batch_size, self.max_batch_tokens)]
            for pending in batch:
                self._waiting.remove(pending)
            self._after_prefill = False
            self.batch_sizes[len(batch)] += 1
            return batch
        self._after_prefill = True
        return [self._waiting.popleft()]  # the oldest step is a prefill: one chunk of it, alone

    def _compute(self, inputs: list[StepInput]) -> list[torch.Tensor | Exception]:
        """On the compute thread. A failed batch is retried one step at a time, so only the culprit
        fails (caches advance only when a pass completes, so the retry starts from a clean state)."""
        try:
            return self.stage.forward_batch(inputs)
        except Exception as e:
            if len(inputs) == 1:
                return [e]
        results: list[torch.Tensor | Exception] = []
        for step in inputs:
            try:
                results.append(self.stage.forward_batch([step])[0])
            except Exception as e:
                results.append(e)
        return results

    def _deliver(self, pending: _Pending, step: StepInput, result: torch.Tensor | Exception) -> None:
        if isinstance(result, Exception):
            self._finish(pending, error=result)
            return
        pending.done_tokens += step.tokens
        if pending.done_tokens < pending.step.tokens:  # a prefill with chunks to go
            if self._closed:
                self._finish(pending, error=BatcherClosed("the stage is shutting down"))
            else:
                pending.outputs.append(result)
                self._waiting.appendleft(pending)  # it was the oldest step: it keeps its place
            return
        self._finish(pending, result=torch.cat([*pending.outputs, result], dim=1) if pending.outputs else result)

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
