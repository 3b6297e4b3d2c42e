"""A heterogeneous swarm on loopback: chains avoid the slow node and the slow link.

Five real node processes: two replicas of each half of the model plus one node holding
everything. One replica is slowed down (a slower GPU: extra time per step), one sits
behind a slow link (60 ms one way, 20 Mbit/s: everything it sends queues for it, pings
included), and the
whole-model node sits behind one too. After the nodes have served a few steps (so their
announced per-layer latency is measured) the client's DP router must pick the two fast
nodes, and the answer must still equal single-process generation.
"""

from __future__ import annotations

import asyncio

import pytest

from node.app.local_swarm import LocalSwarm
from node.client.generate import generate
from node.client.session import SwarmClient, connect
from node.model.checkpoint import resolve_model
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from swarm.types import Hop

pytestmark = pytest.mark.timeout(300)

RANGES = [(0, 3), (0, 3), (3, 6), (3, 6), (0, 6)]
FAST_FIRST, SLOW_LINK, FAST_SECOND, SLOW_GPU, FAR_WHOLE = range(5)
SLOW = {
    SLOW_LINK: ["--emulate-delay-ms", "60", "--emulate-bandwidth-mbps", "20"],
    SLOW_GPU: ["--test-slowdown-ms", "60"],
    FAR_WHOLE: ["--emulate-delay-ms", "60"],
}


async def _warm_up(client: SwarmClient, chain: list[Hop]) -> None:
    """A few steps through `chain`, so its nodes measure and announce their per-layer latency."""
    import torch

    session = await client.open_session(chain, max_length=8)
    try:
        for position in range(4):
            await session.step(torch.zeros(1, 1, client.spec.hidden_size), position)
    finally:
        await session.close()


async def _scenario(swarm: LocalSwarm, prompt_ids: list[int]):
    source = swarm.source
    async with connect(swarm.initial_peers, source) as client:
        peers = [swarm.peer_id(i) for i in range(len(RANGES))]
        for first, second in ((FAST_FIRST, FAST_SECOND), (SLOW_LINK, SLOW_GPU)):
            await _warm_up(client, [Hop(peers[first], 0, 3), Hop(peers[second], 3, 6)])
        await _warm_up(client, [Hop(peers[FAR_WHOLE], 0, 6)])
        for _ in range(100):  # until the next heartbeats carry the measured latencies
            records = {r.peer_id: r for r in await client.servers()}
            if all(records.get(p) and records[p].layer_latency_s > 0 for p in peers):
                break
            await asyncio.sleep(0.2)
        chain = await client.choose_chain(session_tokens=64)
        session = await client.open_session(chain, max_length=len(prompt_ids) + 12)
        try:
            tokens = [t async for t in generate(session, ClientHead(source), prompt_ids,
                                                SamplingParams(max_new_tokens=12))]
        finally:
            await session.close()
        return [peers.index(hop.node_id) for hop in chain], records, peers, tokens


def test_chains_avoid_the_slow_node_and_the_slow_link(tiny_checkpoint):
    from tests.node.test_pipeline import reference_generate

    path = tiny_checkpoint("llama", num_layers=6)
    prompt_ids = list(range(4, 30))
    with LocalSwarm(str(path), RANGES, threads_per_node=1, per_node_args=SLOW, node_args=["--ttl", "3"]) as swarm:
        chosen, records, peers, tokens = asyncio.run(_scenario(swarm, prompt_ids))
    slow_gpu, fast = records[peers[SLOW_GPU]], records[peers[FAST_SECOND]]
    assert slow_gpu.layer_latency_s > 5 * fast.layer_latency_s  # the slow-down shows in what it announces
    assert chosen == [FAST_FIRST, FAST_SECOND]
    assert tokens == reference_generate(resolve_model(str(path)), prompt_ids, 12, ())
