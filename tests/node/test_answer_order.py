"""A ring's tokens come from two stages' streams, which keep no order between them: the client must take each
token at its position whichever arrives first (found by benchmarks/abandoned.py: a head-sharing ring's second
token, sent by its first stage, overtook the first token, sent by its last stage, and the client dropped it and
waited 20 s for it)."""

from __future__ import annotations

import asyncio

import pytest

from node.client.session import MAX_AHEAD_PER_STAGE, ChainSession, StageFailure, _Stream
from node.model.sampling import SamplingParams
from node.net.protocol import pack_response
from swarm.types import Hop

PROMPT = [5, 6, 7]


def _ring(events: asyncio.Queue, new_tokens: int) -> ChainSession:
    chain = [Hop("first-stage", 0, 3), Hop("last-stage", 3, 6)]
    streams = [_Stream(hop, index, events) for index, hop in enumerate(chain)]  # never opened: sends just queue
    return ChainSession(chain, streams, events, max_length=len(PROMPT) + new_tokens, relay=False, wire="none",
                        step_timeout_s=2.0, sampling=SamplingParams(max_new_tokens=new_tokens))


def _token(position: int, token: int):
    return pack_response({"token": token, "position": position})


async def _answer(session: ChainSession) -> list[int]:
    return [token async for token in session.tokens(PROMPT, 0)]


def test_a_token_that_overtakes_the_one_before_it_is_kept_for_its_turn() -> None:
    async def main() -> list[int]:
        events: asyncio.Queue = asyncio.Queue()
        session = _ring(events, 3)
        # The first stage's tokens for positions 4 and 5 arrive before the last stage's token for position 3.
        for source, position, token in [(0, 4, 41), (0, 5, 51), (1, 3, 31)]:
            events.put_nowait((source, _token(position, token)))
        return await _answer(session)

    assert asyncio.run(main()) == [31, 41, 51]


def test_a_stage_flooding_answers_ahead_is_bounded_and_does_not_hide_the_others() -> None:
    async def main() -> tuple[list[int], int]:
        events: asyncio.Queue = asyncio.Queue()
        session = _ring(events, 2)
        for position in range(5, 5 + 10 * MAX_AHEAD_PER_STAGE):  # the last stage sends far ahead
            events.put_nowait((1, _token(position, 99)))
        for source, position, token in [(0, 4, 41), (1, 3, 31)]:
            events.put_nowait((source, _token(position, token)))
        tokens = await _answer(session)
        return tokens, len(session._ahead)

    tokens, held = asyncio.run(main())
    assert tokens == [31, 41]
    assert held <= MAX_AHEAD_PER_STAGE


def test_an_answer_never_sent_still_times_out() -> None:
    async def main() -> None:
        events: asyncio.Queue = asyncio.Queue()
        session = _ring(events, 3)
        events.put_nowait((0, _token(5, 51)))  # ahead, but position 3 never comes
        await _answer(session)

    with pytest.raises(StageFailure, match="no answer"):
        asyncio.run(main())
