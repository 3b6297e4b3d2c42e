"""Chaos: stages SIGKILLed mid-answer; every answer completes, identical to the undisturbed one."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from hivemind.proto import runtime_pb2

from node.app.chaos import ChaosRunner
from node.app.local_swarm import LocalSwarm
from node.client.failover import STALLED_AVOID_S, ResilientSession
from node.client.session import NoChainError, StageFailure, connect
from node.model.checkpoint import resolve_model
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.net.membership import open_dht
from node.net.protocol import INFERENCE_HANDLER
from swarm.types import Hop

pytestmark = pytest.mark.timeout(900)

# Kills per test: enough to hit each stage of the chain at several points of an answer. The 20-kill figures
# come from `python benchmarks/failover.py --generations 20`, which runs the same ChaosRunner (node/app/chaos.py).
GENERATIONS = 6
RING_GENERATIONS = 4
NEW_TOKENS = 20
REPLICAS = 3  # nodes per layer range; one is killed per generation and a fresh one started in its place


async def _chaos(swarm: LocalSwarm, ranges, prompt_ids: list[int], params: SamplingParams, *, ring: bool,
                 generations: int, speculate: int = 0):
    source = swarm.source
    async with connect(swarm.initial_peers, source) as client:
        runner = ChaosRunner(swarm, client, None if ring else ClientHead(source), speculate=speculate)
        undisturbed = await runner.generate(prompt_ids, params, kill_at=None)
        assert not undisturbed.events and len(undisturbed.tokens) == NEW_TOKENS
        results = []
        for _ in range(generations):
            await runner.wait_for_replicas(ranges, at_least=2)
            # A ring runs ahead of the client by the tokens in flight: kill while several are still to come.
            kill_at = runner.rng.randrange(1, NEW_TOKENS - (5 if ring else 1))
            results.append(await runner.generate(prompt_ids, params, kill_at=kill_at))
        return undisturbed.tokens, [(r.tokens, r.events) for r in results]


@pytest.mark.parametrize("ring", [False, True], ids=["client-samples", "ring"])
def test_generations_survive_a_killed_stage(tiny_checkpoint, ring):
    path = tiny_checkpoint("llama", num_layers=6)
    source = resolve_model(str(path))
    ranges = [(0, 2), (2, 4), (4, 6)]
    prompt_ids = list(range(5, 30))
    # Sampled, not greedy: after a failover the new chain must draw exactly what the old one would have.
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, seed=5)
    # The ring's nodes are slowed (10 ms a step) so that a kill lands while the answer is still being made.
    node_args = ["--test-slowdown-ms", "10"] if ring else []
    with LocalSwarm(str(path), ranges * REPLICAS, threads_per_node=1, node_args=node_args) as swarm:
        undisturbed, results = asyncio.run(_chaos(swarm, ranges, prompt_ids, params, ring=ring,
                                                  generations=RING_GENERATIONS if ring else GENERATIONS))
    assert source.num_layers == 6
    for tokens, events in results:
        assert tokens == undisturbed
        assert len(events) >= 1, "the kill must have forced a failover"
    recoveries = sorted(e.recovery_s for _, events in results for e in events)
    print(f"recovery s: median {recoveries[len(recoveries) // 2]:.3f}, max {recoveries[-1]:.3f}")


def test_a_speculating_ring_survives_a_killed_stage(tiny_checkpoint):
    """Greedy, as a speculating ring's sampled tokens depend on the drafts proposed (distributed as without, not
    drawn identically), and a new ring drafts afresh. The prompt repeats itself so that drafts are made."""
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [(0, 2), (2, 4), (4, 6)]
    prompt_ids = list(range(5, 17)) * 2
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    with LocalSwarm(str(path), ranges * REPLICAS, threads_per_node=1, node_args=["--test-slowdown-ms", "10"]) as swarm:
        undisturbed, results = asyncio.run(_chaos(swarm, ranges, prompt_ids, params, ring=True, generations=4,
                                                  speculate=6))
    for tokens, events in results:
        assert tokens == undisturbed
        assert len(events) >= 1, "the kill must have forced a failover"


def test_a_stage_that_never_answers_the_opening_fails_the_open_in_time(tiny_checkpoint):
    """A peer that takes the inference stream and says nothing (a stage killed or stalled mid-handshake): the
    open ends in a timeout StageFailure naming it, so failover and checks move on (a check that waited on such
    an open once hung every client of the churn soak for good)."""
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=4)))

    async def silent(requests, _context):
        async for _ in requests:
            await asyncio.sleep(3600)  # takes the opening, never answers
        yield  # an async generator handler, never reached

    async def main() -> StageFailure:
        silent_peer = await asyncio.to_thread(open_dht, [], ["/ip4/127.0.0.1/tcp/0"])
        p2p = await silent_peer.dht.replicate_p2p()
        try:
            await p2p.add_protobuf_handler(INFERENCE_HANDLER, silent, runtime_pb2.ExpertRequest,
                                           stream_input=True, stream_output=True)
            async with connect([str(a) for a in silent_peer.visible_maddrs], source) as client:
                with pytest.raises(StageFailure) as failed:
                    await asyncio.wait_for(client.open_session([Hop(str(p2p.peer_id), 0, 4)], max_length=16,
                                                               step_timeout_s=3), 60)
                return failed.value
        finally:
            await p2p.shutdown()
            silent_peer.shutdown()

    failure = asyncio.run(main())
    assert failure.code == "timeout" and "opening" in str(failure)


def test_an_answer_begun_in_a_gap_waits_for_the_swarm_to_re_form(tiny_checkpoint):
    """Churn leaves a range with no node for a few seconds (a killed node restarting): an answer begun then waits
    for the gap to close and completes with the undisturbed tokens, where it used to fail at once (the churn
    soak's only failed answers); without the wait (`cover_wait_s=0`) the same gap fails it."""
    path = tiny_checkpoint("llama", num_layers=4)
    source = resolve_model(str(path))
    prompt_ids = list(range(5, 20))
    params = SamplingParams(max_new_tokens=8)

    async def answer(client, cover_wait_s: float) -> list[int]:
        session = ResilientSession(client, max_length=len(prompt_ids) + 8, cover_wait_s=cover_wait_s)
        try:
            return [t async for t in session.generate(prompt_ids, params, None)]
        finally:
            await session.close()

    async def main(swarm: LocalSwarm) -> tuple[list[int], list[int]]:
        async with connect(swarm.initial_peers, source) as client:
            undisturbed = await answer(client, cover_wait_s=0)
            swarm.kill(1)  # layers 2:4 now have no node
            client.ban(swarm.peer_id(1))  # as a failed open would: the dead node's record outlives it
            with pytest.raises(NoChainError) as gap:
                await answer(client, cover_wait_s=0)
            assert gap.value.uncovered_layers == (2, 3)
            restart = asyncio.get_running_loop().call_later(1.0, swarm.respawn, 1)
            try:
                return undisturbed, await answer(client, cover_wait_s=120)
            finally:
                restart.cancel()

    with LocalSwarm(str(path), [(0, 2), (2, 4)], threads_per_node=1) as swarm:
        undisturbed, waited = asyncio.run(main(swarm))
    assert waited == undisturbed and len(undisturbed) == 8


def test_a_stage_stalled_once_is_avoided_briefly_a_repeat_staller_or_a_frozen_one_banned(tiny_checkpoint):
    """A stage that times out is probed: one that still answers (alive, only stalled for this session) is avoided
    for STALLED_AVOID_S, so an answer whose only node of a range stalled once can resume on it within the cover
    wait; but stalling again soon after gets it the usual 120 s ban (a node answering probes and no steps would
    else hold an answer every few seconds). One that does not answer (here frozen by SIGSTOP, with its p2p daemon)
    is banned at once."""
    path = tiny_checkpoint("llama", num_layers=4)
    source = resolve_model(str(path))

    async def ban_left_after_timeouts(swarm: LocalSwarm, answers: int) -> list[float]:
        bans = []
        async with connect(swarm.initial_peers, source) as client:
            for answer in range(answers):
                if answer:
                    await asyncio.sleep(max(0.0, bans[-1]) + 0.5)  # the node is out of the avoid: picked again
                session = ResilientSession(client, max_length=24, step_timeout_s=1.5, cover_wait_s=0, verify=False)
                try:
                    with pytest.raises(NoChainError):  # its one node of layers 2:4 is out of its chains
                        async for _ in session.generate(list(range(5, 15)), SamplingParams(max_new_tokens=4), None):
                            pass
                finally:
                    await session.close()
                bans.append(client._banned_until[swarm.peer_id(1)] - time.monotonic())
        return bans

    # Every step of the node of 2:4 sleeps 4 s: it times out, but answers the probe of its info at once.
    with LocalSwarm(str(path), [(0, 2), (2, 4)], threads_per_node=1,
                    per_node_args={1: ["--test-slowdown-ms", "4000"]}) as swarm:
        first_ban, second_ban = asyncio.run(ban_left_after_timeouts(swarm, answers=2))
    with LocalSwarm(str(path), [(0, 2), (2, 4)], threads_per_node=1) as swarm:
        frozen_group = swarm.processes[1].pid
        swarm.peer_id(1)  # known before it freezes
        os.killpg(frozen_group, signal.SIGSTOP)
        try:
            [frozen] = asyncio.run(ban_left_after_timeouts(swarm, answers=1))
        finally:
            os.killpg(frozen_group, signal.SIGCONT)
    assert 0 < first_ban <= STALLED_AVOID_S
    assert second_ban > 100
    assert frozen > 100
