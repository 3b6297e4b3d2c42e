"""Chaos runs on a local swarm: generations during which a stage of the chain is SIGKILLed.

Shared by the failover test and `benchmarks/failover.py`, so both exercise the same thing:
a real node process group killed mid-answer, a fresh node started in its place.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from node.client import SwarmClient
from node.failover import FailoverEvent, ResilientSession
from node.head import ClientHead
from node.local_swarm import LocalSwarm
from node.sampling import SamplingParams


@dataclass(frozen=True)
class ChaosResult:
    tokens: list[int]
    events: list[FailoverEvent]
    killed_at: int | None  # tokens produced before the kill


class ChaosRunner:
    """`head`: the client embeds and samples with it; None: generations run as rings."""

    def __init__(self, swarm: LocalSwarm, client: SwarmClient, head: ClientHead | None, *, seed: int = 1234) -> None:
        self.swarm, self.client, self.head = swarm, client, head
        self.rng = random.Random(seed)
        self.peer_to_index = {swarm.peer_id(i): i for i in range(len(swarm.processes))}

    async def wait_for_replicas(self, ranges: Sequence[tuple[int, int]], at_least: int, timeout_s: float = 120) -> None:
        """Until every range has `at_least` live nodes (killed ones' records may linger until they expire)."""
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
        """Greedy generation; after `kill_at` tokens a random stage of the current chain is killed and respawned."""
        session = ResilientSession(self.client, max_length=len(prompt_ids) + params.max_new_tokens, step_timeout_s=20)
        tokens: list[int] = []
        try:
            async for token in session.generate(prompt_ids, params, self.head):
                tokens.append(token)
                if len(tokens) == kill_at:
                    await self._kill_a_stage(session)
        finally:
            await session.close()
        return ChaosResult(tokens, session.events, kill_at)

    async def _kill_a_stage(self, session: ResilientSession) -> None:
        victim = self.peer_to_index[self.rng.choice(session.session.chain).node_id]
        await asyncio.to_thread(self.swarm.kill, victim)
        self.swarm.respawn(victim)
        self.peer_to_index[await asyncio.to_thread(self.swarm.peer_id, victim)] = victim
