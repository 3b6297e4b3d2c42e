"""Chaos: stages SIGKILLed mid-answer; every answer completes, identical to the undisturbed one."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from node.checkpoint import resolve_model
from node.client import SwarmClient
from node.failover import ResilientSession
from node.generate import SamplingParams, generate
from node.head import ClientHead
from node.local_swarm import LocalSwarm
from node.node import start_dht

pytestmark = pytest.mark.timeout(900)

GENERATIONS = 20
NEW_TOKENS = 20
REPLICAS = 3  # nodes per layer range; one is killed per generation and a fresh one started in its place


async def _wait_for_replicas(client: SwarmClient, swarm: LocalSwarm, ranges, at_least: int) -> None:
    for _ in range(600):
        live = [r for r in await client.servers() if r.peer_id not in swarm.dead_peers]
        counts = Counter((r.start, r.end) for r in live)
        if all(counts[rng] >= at_least for rng in ranges):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("replacement nodes did not come online")


async def _chaos(swarm: LocalSwarm, ranges, prompt_ids: list[int]):
    source = swarm.source
    dht = start_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    rng = random.Random(1234)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    head = ClientHead(source)
    try:
        client = SwarmClient(dht, source.name, source.num_layers)
        peer_to_index = {swarm.peer_id(i): i for i in range(len(swarm.processes))}

        async def run(kill_at: int | None):
            session = ResilientSession(client, max_length=len(prompt_ids) + NEW_TOKENS, step_timeout_s=20)
            await session.open()
            tokens = []
            try:
                async for token in generate(session, head, prompt_ids, params):
                    tokens.append(token)
                    if len(tokens) == kill_at:
                        victim = peer_to_index[rng.choice(session.session.chain).node_id]
                        await asyncio.to_thread(swarm.kill, victim)
                        swarm.respawn(victim)
                        peer_to_index[await asyncio.to_thread(swarm.peer_id, victim)] = victim
            finally:
                await session.close()
            return tokens, session.events

        undisturbed, events = await run(kill_at=None)
        assert not events and len(undisturbed) == NEW_TOKENS
        results = []
        for _ in range(GENERATIONS):
            await _wait_for_replicas(client, swarm, ranges, at_least=2)
            tokens, events = await run(kill_at=rng.randrange(1, NEW_TOKENS - 1))
            results.append((tokens, events))
        return undisturbed, results
    finally:
        dht.shutdown()


def test_twenty_generations_survive_a_killed_stage(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=6)
    source = resolve_model(str(path))
    ranges = [(0, 2), (2, 4), (4, 6)]
    prompt_ids = list(range(5, 30))
    with LocalSwarm(str(path), ranges * REPLICAS, threads_per_node=1) as swarm:
        undisturbed, results = asyncio.run(_chaos(swarm, ranges, prompt_ids))
    assert source.num_layers == 6
    for tokens, events in results:
        assert tokens == undisturbed
        assert len(events) >= 1, "the kill must have forced a failover"
    recoveries = sorted(e.recovery_s for _, events in results for e in events)
    print(f"recovery s: median {recoveries[len(recoveries) // 2]:.3f}, max {recoveries[-1]:.3f}")
