"""The tokens a speculating ring's last stage keeps are checked (node.client.verify `Auditor._sampled_token`,
node.client.replay `Replay._kept`): the verifier re-runs the step with its draft and keeps what the model keeps. With
real nodes: an honest speculating ring passes every such check with its text unchanged, and a last stage that keeps
draft tokens the model rejects is outvoted, banned, and the answer rebuilt to the honest one."""

from __future__ import annotations

import asyncio
import random

import pytest

from node.app.local_swarm import LocalSwarm
from node.client.failover import ResilientSession
from node.client.verify import Auditor
from node.net.membership import open_dht
from tests.node.test_verify import HONEST, PreferringClient, _long_bans, _ring, _wait_for_nodes, adversary_args

pytestmark = pytest.mark.timeout(900)

OVERKEEPER = 4  # node index: at layers 3:6 (the ring's last stage), it keeps every draft token
PROMPT = [5, 6, 7, 8] * 5  # a repeating prompt: the first stage's drafts continue it


def _draft_checks(auditor: Auditor, session: ResilientSession, last_stage: set[str]) -> list[str]:
    """Verdicts of the checks of a last stage's step that ran a draft (its kept tokens re-derived)."""
    drafts = session.ledger.drafts if session.ledger is not None else {}
    return [r.verdict for r in auditor.reports if r.peer in last_stage and r.position in drafts]


async def _scenario(swarm: LocalSwarm) -> None:
    honest = {swarm.peer_id(i) for i in HONEST}
    liar = swarm.peer_id(OVERKEEPER)
    last_stage = {swarm.peer_id(i) for i, (start, _) in HONEST.items() if start > 0} | {liar}
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        client = PreferringClient(peer, swarm.source)
        await _wait_for_nodes(client, len(honest) + 1)
        client.ban(liar, for_s=1e6)
        reference, _, _ = await _ring(client, PROMPT, verify=False)

        # An honest speculating ring, every step checked: the kept tokens are re-derived, and agree.
        auditor = Auditor(client, 1.0, rng=random.Random(5))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor, speculate=4)
        verdicts = _draft_checks(auditor, session, last_stage)
        print("honest: drafts", len(session.ledger.drafts), "checks of a draft step at the last stage", verdicts,
              "all", {r.verdict for r in auditor.reports})
        assert tokens == reference and not revisions and session.ledger.drafts
        assert verdicts and set(verdicts) == {"honest"}
        assert {r.verdict for r in auditor.reports} <= {"honest", "unchecked"}

        # The last stage keeps draft tokens the model rejects: outvoted on its tokens, banned, the answer rebuilt.
        client._banned_until.clear()
        client.prefer = liar
        auditor = Auditor(client, 1.0, rng=random.Random(6))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor, speculate=4)
        caught = [r for r in auditor.reports if r.verdict == "liar"]
        print("overkeeper:", [(r.peer[-6:], r.position, r.verdict) for r in auditor.reports])
        assert session.chains[0][-1].node_id == liar
        assert caught and {r.peer for r in caught} == {liar}
        assert tokens == reference and revisions
        assert liar in _long_bans(client) and not _long_bans(client) & honest
    finally:
        peer.shutdown()


def test_a_speculating_rings_kept_tokens_are_checked(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [*HONEST.values(), (3, 6)]
    with LocalSwarm(str(path), ranges, threads_per_node=1,
                    per_node_args={OVERKEEPER: adversary_args("overkeeper")}) as swarm:
        asyncio.run(_scenario(swarm))
