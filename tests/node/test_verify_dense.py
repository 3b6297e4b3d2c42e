"""A check compares every position its verifier replays, not only the sampled step (node.client.verify
`Auditor._replayed_lie`), and an answer's end checks each stage's last step (node.client.failover
`_check_ring_tail`): with real nodes, a stage that lies on one step only, a step no sampled check picks, is caught
with evidence through a replayed position, and the answer is rebuilt to the honest one."""

from __future__ import annotations

import asyncio
import random

import pytest

from node.app.local_swarm import LocalSwarm
from node.client.verify import Auditor
from node.net.evidence import verify_proof
from node.net.membership import open_dht
from node.serve.adversary import ONCE_AT_STEP
from tests.node.test_verify import HONEST, NEW_TOKENS, _long_bans, _ring, _wait_for_nodes, adversary_args
from tests.node.test_verify_replay import ProofBlindClient

pytestmark = pytest.mark.timeout(900)

ONCE_LIAR = 4  # node index: at layers 0:3, lies on the ONCE_AT_STEP-th step of each session only
PROMPT = list(range(5, 25))
CHECKED_TOKEN = 9  # the one sampled check: the ring step that made the answer's 9th token, well after the lie


class ForcedAuditor(Auditor):
    """Samples exactly the ring steps that made the answer's tokens numbered in `at` (none: only the answer's end
    is checked), always at the first stage."""

    def __init__(self, *args, at: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.calls = at, 0

    def sample(self) -> bool:
        self.calls += 1
        return self.calls in self.at

    def pick_stage(self, session) -> int:
        return 0


async def _scenario(swarm: LocalSwarm) -> None:
    honest = {swarm.peer_id(i) for i in HONEST}
    liar = swarm.peer_id(ONCE_LIAR)
    lie_at = len(PROMPT) + ONCE_AT_STEP - 2  # its 1st step is the prompt's, the 2nd runs the 1st token, ...
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        client = ProofBlindClient(peer, swarm.source)
        await _wait_for_nodes(client, len(honest) + 1)
        client.ban(liar, for_s=1e6)
        reference, _, _ = await _ring(client, PROMPT, verify=False)

        # One sampled check, at a step after the lie: its verifier replays the positions before it, the lie's too.
        client._banned_until.clear()
        client.prefer = liar
        auditor = ForcedAuditor(client, 1.0, rng=random.Random(3), at=(CHECKED_TOKEN,))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor)
        caught = [r for r in auditor.reports if r.verdict == "liar"]
        print("sampled check:", [(r.position, r.found_at, r.verdict) for r in auditor.reports],
              "positions compared", auditor.positions_compared, "rows returned", auditor.rows_returned)
        assert session.chains[0][0].node_id == liar
        assert caught and caught[0].peer == liar and caught[0].position == lie_at
        assert caught[0].found_at == len(PROMPT) + CHECKED_TOKEN - 2  # found by the check of the 9th token's step
        assert tokens == reference and revisions
        assert liar in _long_bans(client) and not _long_bans(client) & honest
        assert auditor.published and verify_proof(auditor.published[0], model=swarm.source.name) == liar
        assert not any(r.verdict == "liar" and r.peer in honest for r in auditor.reports)

        # No sampled check at all: the answer's end checks each stage's last step, which replays the lie's.
        client._banned_until.clear()
        auditor = ForcedAuditor(client, 1.0, rng=random.Random(4))
        tokens, session, revisions = await _ring(client, PROMPT, auditor=auditor)
        print("the answer's end:", [(r.peer[-6:], r.position, r.found_at, r.verdict) for r in auditor.reports])
        assert session.chains[0][0].node_id == liar
        assert any(r.verdict == "liar" and r.peer == liar and r.position == lie_at for r in auditor.reports)
        assert tokens == reference and revisions
        assert liar in _long_bans(client) and not _long_bans(client) & honest
        # The rebuilt chain's end is checked too, and honest.
        last_chain = set(hop.node_id for hop in session.chains[-1])
        assert any(r.verdict == "honest" and r.peer in last_chain for r in auditor.reports)
    finally:
        peer.shutdown()


def test_a_lie_on_one_unsampled_step_is_caught_through_a_replayed_position(tiny_checkpoint):
    assert NEW_TOKENS > CHECKED_TOKEN > ONCE_AT_STEP
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [*HONEST.values(), (0, 3)]
    with LocalSwarm(str(path), ranges, threads_per_node=1,
                    per_node_args={ONCE_LIAR: adversary_args("once")}) as swarm:
        asyncio.run(_scenario(swarm))
