"""The emulated links' timers (node.net.timers): every callback runs, never before its moment, in order."""

from __future__ import annotations

import asyncio
import random

from node.net.timers import call_later_precisely


def test_callbacks_run_once_each_never_early_and_in_order_of_their_moments() -> None:
    async def main() -> list[tuple[int, float, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[int, float, float]] = []
        rng = random.Random(7)
        delays = [rng.choice([0.0, 0.001, 0.004, 0.004, 0.013]) for _ in range(60)]
        for index, delay in enumerate(delays):
            target = loop.time() + delay
            call_later_precisely(delay, lambda i=index, t=target: fired.append((i, t, loop.time())))
            if index % 7 == 0:
                await asyncio.sleep(0.0015)  # timers armed while others are pending, earlier and later ones
        await asyncio.sleep(0.05)
        return fired

    fired = asyncio.run(main())
    assert sorted(index for index, _, _ in fired) == list(range(60))
    assert all(at >= target for _, target, at in fired)
    moments = [(target, index) for index, target, _ in fired]
    assert moments == sorted(moments)  # a link's messages arrive in the order they were sent


def test_each_event_loop_gets_its_own_timers() -> None:
    for _ in range(3):  # asyncio.run makes a new loop each time: the timers of a closed loop are not reused
        async def main() -> bool:
            done = asyncio.get_running_loop().create_future()
            call_later_precisely(0.002, done.set_result, True)
            return await asyncio.wait_for(done, 5)

        assert asyncio.run(main())
