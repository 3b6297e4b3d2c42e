"""Checks re-run on verifier sessions kept between the checks of one session (node.client.replay): each position is
computed once per verifier, counted on the verifiers' side; the sessions end with the checked one; and a liar is
still caught, outvoted and proven when its check runs on a verifier session kept warm by earlier checks; and a chain
that dies with checks pending is replaced at once, its tokens withdrawn when those checks later find a lie."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from node.app.local_swarm import LocalSwarm
from node.client.failover import ResilientSession, Revision
from node.client.session import SwarmClient
from node.client.verify import Auditor
from node.model.sampling import SamplingParams
from node.net.evidence import verify_proof
from node.net.membership import open_dht
from node.serve.adversary import LATE_FROM_STEP
from tests.node.test_verify import (
    HONEST,
    NEW_TOKENS,
    PreferringClient,
    _long_bans,
    _ring,
    _wait_for_nodes,
    adversary_args,
)

pytestmark = pytest.mark.timeout(900)

LATE_LIAR = 4  # node index: a liar from its LATE_FROM_STEP-th step of each session on, at layers 0:3
PROMPT = list(range(5, 25))
CHECK_HOLD_S = 60.0  # at most: checks start once the liar is dead and the next chain has answered


async def _served(client: SwarmClient, peers: list[str]) -> dict[str, int]:
    """Tokens each node has computed, as it says."""
    return {peer: (await client.node_info(peer))["tokens_served"] for peer in peers}


async def _sessions_end(client: SwarmClient, peers: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any([(await client.node_info(peer))["sessions"] for peer in peers]):
        assert time.monotonic() < deadline, "verifier sessions outlived the checked session"
        await asyncio.sleep(0.5)


def _fresh_cost(auditor: Auditor) -> int:
    """Positions the checks would have sent to verifiers opening a fresh session each time: every check replays
    its whole prefix (the prompt's step is the prompt; a decode step one token)."""
    return sum(r.position + (len(PROMPT) if r.position == 0 else 1) for r in auditor.reports if r.verifier)


async def _scenario(swarm: LocalSwarm) -> None:
    honest = [swarm.peer_id(i) for i in HONEST]
    liar = swarm.peer_id(LATE_LIAR)
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        client = PreferringClient(peer, swarm.source)
        await _wait_for_nodes(client, len(honest) + 1)
        client.ban(liar, for_s=1e6)
        reference, _, _ = await _ring(client, PROMPT, verify=False)  # (also measures every node's speed)

        # Every step checked, on an honest chain: each stage's one other replica verifies it, in one kept session.
        before = await _served(client, honest)
        auditor = Auditor(client, 1.0, rng=random.Random(7))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor)
        assert tokens == reference and not revisions and {r.verdict for r in auditor.reports} == {"honest"}
        assert len(auditor.reports) >= NEW_TOKENS - 1
        verifiers = sorted(set(honest) - set(hop.node_id for hop in session.chains[0]))
        assert {r.verifier for r in auditor.reports} == set(verifiers)
        after = await _served(client, honest)
        computed = {peer: after[peer] - before[peer] for peer in verifiers}
        print("verifiers computed", computed, "client counted", auditor.positions_run, "fresh sessions would have",
              _fresh_cost(auditor))
        # Each position at most once per verifier (its stage's inputs through the last checked step) ...
        assert all(0 < n <= len(PROMPT) + NEW_TOKENS for n in computed.values()), computed
        assert sum(computed.values()) == auditor.positions_run
        # ... where a fresh session per check replays every prefix again.
        assert 3 * auditor.positions_run < _fresh_cost(auditor)
        await _sessions_end(client, verifiers)  # closed with the answer's session

        # A speculating ring: rejected drafts replace inputs a kept session ran; it is never checked against them.
        repeating = [5, 6, 7, 8] * 5
        expected, _, _ = await _ring(client, repeating, verify=False)
        auditor = Auditor(client, 1.0, rng=random.Random(9))
        session = ResilientSession(client, max_length=len(repeating) + NEW_TOKENS, step_timeout_s=30, auditor=auditor,
                                   speculate=4)
        try:
            tokens = [t async for t in session.generate(repeating, SamplingParams(max_new_tokens=NEW_TOKENS))]
        finally:
            await session.close()
        print("speculating", len(session.ledger.drafts), "drafts,", [r.verdict for r in auditor.reports])
        assert tokens == expected and session.ledger.drafts
        # (a check is "unchecked" only when a step's echo or verifiers do not come in time)
        verdicts = [r.verdict for r in auditor.reports]
        assert verdicts.count("honest") >= NEW_TOKENS // 2 and set(verdicts) <= {"honest", "unchecked"}

        # A liar whose first checks pass (kept sessions run its honest steps), then lies: still outvoted by two
        # honest replicas on the kept sessions, proven, and the answer rebuilt to the honest one.
        client._banned_until.clear()
        client.prefer = liar
        auditor = Auditor(client, 1.0, rng=random.Random(8))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor)
        on_liar = [r.verdict for r in auditor.reports if r.peer == liar]
        print("checks of the liar", on_liar, "client counted", auditor.positions_run, "fresh sessions would have",
              _fresh_cost(auditor))
        assert session.chains[0][0].node_id == liar
        assert tokens == reference and revisions
        assert "liar" in on_liar and on_liar.index("liar") >= 1 and set(on_liar[:on_liar.index("liar")]) == {"honest"}
        assert liar in _long_bans(client) and not _long_bans(client) & set(honest)
        assert auditor.published and verify_proof(auditor.published[0], model=swarm.source.name) == liar
        assert 2 * auditor.positions_run < _fresh_cost(auditor)

        # The liar lies, then its machine dies before its checks are in: the next chain opens and answers at once
        # while the dead chain's checks run, and when they find the lie the answer is revised to the honest one.
        blind = ProofBlindClient(peer, swarm.source)
        blind.prefer = liar
        auditor = SlowAuditor(blind, 1.0, rng=random.Random(10))
        session = ResilientSession(blind, max_length=len(PROMPT) + NEW_TOKENS, step_timeout_s=30, auditor=auditor)
        tokens, revised_at, killed_at = [], [], None
        try:
            async for item in session.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS)):
                if isinstance(item, Revision):
                    revised_at.append(len(tokens))
                    del tokens[item.keep:]
                    continue
                tokens.append(item)
                if len(tokens) == LATE_FROM_STEP + 2 and session.chains[-1][0].node_id == liar:
                    swarm.kill(LATE_LIAR)
                    killed_at = len(tokens)
                if killed_at is not None and len(tokens) >= killed_at + 3:  # the next chain has answered
                    auditor.released.set()
        finally:
            await session.close()
        print("after the crash", [e.code for e in session.events], "revised at", revised_at)
        assert session.chains[0][0].node_id == liar and len(session.chains) >= 3
        assert tokens == reference and revised_at and revised_at[0] > LATE_FROM_STEP + 2  # the next chain went on
        assert any(r.verdict == "liar" and r.peer == liar for r in auditor.reports)
    finally:
        peer.shutdown()


class ProofBlindClient(PreferringClient):
    """A client that has not read the liar's published proof (it was caught above)."""

    async def servers(self):
        return await self.peer.list_servers(self.model, num_layers=self.num_layers)


class SlowAuditor(Auditor):
    """Checks that start only once `released` is set (or after CHECK_HOLD_S), as checks lag on a loaded machine: the
    chain dies, and the next one answers, before they are in. (A fixed 3 s delay let a slow ring's checks come in
    before the kill once, in the loaded suite.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.released = asyncio.Event()

    async def check(self, *args, **kwargs):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.released.wait(), CHECK_HOLD_S)
        return await super().check(*args, **kwargs)


def test_checks_replay_each_position_once_per_verifier_and_still_catch_a_late_liar(tiny_checkpoint):
    assert NEW_TOKENS > LATE_FROM_STEP + 2  # the late liar lies on a few of the answer's steps
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [*HONEST.values(), (0, 3)]
    with LocalSwarm(str(path), ranges, threads_per_node=1,
                    per_node_args={LATE_LIAR: adversary_args("late")}) as swarm:
        asyncio.run(_scenario(swarm))
