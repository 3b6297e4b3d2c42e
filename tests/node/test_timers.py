"""The emulated links' timers (node.net.timers): every callback runs, never before its moment, in order."""

from __future__ import annotations

import asyncio
import random

from node.net.timers import MAX_LEAD_S, call_later_precisely, precise_timers


def test_callbacks_run_once_each_never_early_and_in_order_of_their_moments() -> None:
    async def main() -> list[tuple[int, tuple[float, float], float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[int, tuple[float, float], float]] = []
        rng = random.Random(7)
        delays = [rng.choice([0.0, 0.001, 0.004, 0.004, 0.013]) for _ in range(60)]
        moments: dict[int, tuple[float, float]] = {}  # a callback's moment lies between the clock's two reads
        for index, delay in enumerate(delays):
            before = loop.time() + delay
            call_later_precisely(delay, lambda i=index: fired.append((i, moments[i], loop.time())))
            moments[index] = (before, loop.time() + delay)
            if index % 7 == 0:
                await asyncio.sleep(0.0015)  # timers armed while others are pending, earlier and later ones
        await asyncio.sleep(0.05)
        return fired

    fired = asyncio.run(main())
    assert sorted(index for index, _, _ in fired) == list(range(60))
    assert all(at >= earliest for _, (earliest, _), at in fired)
    # A link's messages arrive in the order they were sent: no callback runs after one whose moment is surely later.
    # (Two moments within the clock's reads of each other, e.g. 0.5 us apart, may run either way.)
    for position, (index, (earliest, _), _) in enumerate(fired):
        assert all(latest >= earliest for _, (_, latest), _ in fired[position + 1:]), index


def test_each_event_loop_gets_its_own_timers() -> None:
    for _ in range(3):  # asyncio.run makes a new loop each time: the timers of a closed loop are not reused
        async def main() -> bool:
            done = asyncio.get_running_loop().create_future()
            call_later_precisely(0.002, done.set_result, True)
            return await asyncio.wait_for(done, 5)

        assert asyncio.run(main())


def test_a_failing_callback_is_reported_and_the_later_ones_still_run() -> None:
    async def main() -> tuple[list[int], list[dict]]:
        loop = asyncio.get_running_loop()
        reported: list[dict] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        ran: list[int] = []

        def fail() -> None:
            raise ValueError("a broken callback")

        for index in range(20):  # enough wake-ups for the timers to learn how early to arm
            call_later_precisely(0.002 + index * 0.001, ran.append, index)
        call_later_precisely(0.0105, fail)
        await asyncio.sleep(0.05)
        return ran, reported

    ran, reported = asyncio.run(main())
    assert ran == list(range(20))
    assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)


def test_the_lead_is_learned_from_wake_ups_and_bounded() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        for _ in range(12):
            done = loop.create_future()
            call_later_precisely(0.003, done.set_result, None)
            await done
        return precise_timers().lead_s

    lead = asyncio.run(main())
    assert 0 < lead <= MAX_LEAD_S  # an idle loop always wakes after the moment it was armed for
