"""The LM head's batching of concurrent callers (`LMHead.next_logits`), against the real head of a tiny model."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from node.model.checkpoint import resolve_model
from node.model.head import LMHead

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("alone_on_loop", [False, True])
def test_a_caller_cancelled_mid_batch_leaves_the_others_and_later_callers_answered(tiny_checkpoint, alone_on_loop):
    """A session closed while its step waits for the head cancels its caller. That caller started the batch
    others joined: the batch must still run for them, and later callers must get batches of their own. (When the
    first caller ran the batch itself, its cancellation left the joined callers and every later one waiting
    forever: a node whose client abandoned an answer stopped answering every session at the head.)"""
    head = LMHead(resolve_model(str(tiny_checkpoint("llama", num_layers=2))))
    hidden = torch.randn(3, 1, 1, head.norm.weight.shape[0])
    compute = ThreadPoolExecutor(max_workers=1)

    async def main() -> list[torch.Tensor]:
        first = asyncio.create_task(head.next_logits(hidden[0], compute, alone_on_loop=alone_on_loop))
        joined = asyncio.create_task(head.next_logits(hidden[1], compute, alone_on_loop=alone_on_loop))
        await asyncio.sleep(0)  # both are waiting on the batch now
        first.cancel()
        answered = await asyncio.wait_for(joined, 10)
        later = await asyncio.wait_for(head.next_logits(hidden[2], compute, alone_on_loop=alone_on_loop), 10)
        assert first.cancelled()
        return [answered, later]

    try:
        answered, later = asyncio.run(main())
    finally:
        compute.shutdown()
    torch.testing.assert_close(answered, head.logits(hidden[1])[0, -1])
    torch.testing.assert_close(later, head.logits(hidden[2])[0, -1])


def test_callers_of_a_batch_hear_when_the_compute_thread_is_gone(tiny_checkpoint):
    """A stage shutting down closes its compute thread: a batch that cannot start there fails every caller of it,
    not only the one that started it (the others would wait forever)."""
    head = LMHead(resolve_model(str(tiny_checkpoint("llama", num_layers=2))))
    hidden = torch.randn(2, 1, 1, head.norm.weight.shape[0])
    compute = ThreadPoolExecutor(max_workers=1)
    compute.shutdown()

    async def main() -> list[BaseException | torch.Tensor]:
        callers = [head.next_logits(h, compute) for h in hidden]
        return await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes), outcomes
