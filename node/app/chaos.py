"""Chaos runs on a local swarm: generations during which a stage of the chain is SIGKILLed.

Shared by the failover test and `benchmarks/failover.py`, so both exercise the same thing:
a real node process group killed mid-answer, a fresh node started in its place.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from node.app.local_swarm import LocalSwarm
from node.client.failover import FailoverEvent, ResilientSession
from node.client.session import SwarmClient
from node.model.head import ClientHead
from node.model.sampling import SamplingParams


@dataclass(frozen=True)
class ChaosResult:
    tokens: list[int]
    events: list[FailoverEvent]
    killed_at: int | None  # tokens produced before the kill
    token_times: list[float]  # when each token reached the client (perf_counter)

    @property
    def longest_gap_s(self) -> float:
        """The longest wait between two tokens: with a kill, the stall the user sees."""
        return max((b - a for a, b in itertools.pairwise(self.token_times)), default=0.0)


class ChaosRunner:
    """`head`: the client embeds and samples with it; None: generations run as rings."""

    def __init__(self, swarm: LocalSwarm, client: SwarmClient, head: ClientHead | None, *, seed: int = 1234,
                 speculate: int = 0) -> None:
        self.speculate = speculate  # a ring's draft length limit (node.net.protocol: speculation)
        self.swarm, self.client, self.head = swarm, client, head
        self.rng = random.Random(seed)
        self.peer_to_index = {swarm.peer_id(i): i for i in range(len(swarm.processes))}
        self._respawns: list[asyncio.Task] = []

    async def wait_for_replicas(self, ranges: Sequence[tuple[int, int]], at_least: int, timeout_s: float = 120) -> None:
        """Until every range has `at_least` live nodes (killed ones' records may linger until they expire)."""
        respawns, self._respawns = self._respawns, []
        await asyncio.gather(*respawns)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            live = [r for r in await self.client.servers() if r.peer_id not in self.swarm.dead_peers]
            counts = Counter((r.start, r.end) for r in live)
            if all(counts[span] >= at_least for span in ranges):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("replacement nodes did not come online")

    async def generate(self, prompt_ids: list[int], params: SamplingParams, kill_at: int | None) -> ChaosResult:
        """After `kill_at` tokens a random stage of the current chain is killed and respawned."""
        session = ResilientSession(self.client, max_length=len(prompt_ids) + params.max_new_tokens, step_timeout_s=20,
                                   speculate=self.speculate)
        tokens: list[int] = []
        times: list[float] = []
        try:
            async for token in session.generate(prompt_ids, params, self.head):
                tokens.append(token)
                times.append(time.perf_counter())
                if len(tokens) == kill_at:
                    await self._kill_a_stage(session)
        finally:
            await session.close()
        return ChaosResult(tokens, session.events, kill_at, times)

    async def _kill_a_stage(self, session: ResilientSession) -> None:
        victim = self.peer_to_index[self.rng.choice(session.session.chain).node_id]
        await asyncio.to_thread(self.swarm.kill, victim)
        self.swarm.respawn(victim)
        # The new node's peer id is known once it serves, seconds from now: learnt in the background, so the
        # generation (and the stall it measures) goes on meanwhile; wait_for_replicas waits for it.
        self._respawns.append(asyncio.create_task(self._learn_peer_id(victim)))

    async def _learn_peer_id(self, index: int) -> None:
        self.peer_to_index[await asyncio.to_thread(self.swarm.peer_id, index)] = index
