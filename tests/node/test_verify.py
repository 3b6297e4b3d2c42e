"""Checks of volunteers' work (node.client.verify, docs/trust.md): receipts bind what was forwarded, a sample
of steps is re-run elsewhere, and each hostile node (node.serve.adversary) is caught or defeated in a real
local swarm, the answer ending equal to the honest one."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.app.local_swarm import LocalSwarm
from node.client.failover import ResilientSession, Revision
from node.client.session import StageFailure, SwarmClient
from node.client.verify import PROVEN_BAN_S, Auditor, Ledger, Recomputed, relative_error, tolerance_for
from node.model.sampling import SamplingParams
from node.net.evidence import endorsed_peer, verify_proof
from node.net.membership import open_dht
from node.net.proofbook import proof_entries, proof_subkey, proofs_key
from node.net.protocol import digest, pack_response, token_digest

pytestmark = pytest.mark.timeout(900)

NEW_TOKENS = 12
PERTURB = 0.01  # noise of 1% of the output's RMS: 100x the fp32 tolerance, small enough to look plausible
# Nodes of the test swarm (a 6-layer tiny llama): two honest replicas of each half, and one of each adversary.
HONEST = {0: (0, 3), 1: (0, 3), 2: (3, 6), 3: (3, 6)}
ADVERSARIES = {4: ((0, 3), "liar"), 5: ((0, 3), "equivocator"), 6: ((0, 3), "blamer"), 7: ((3, 6), "sly"),
               8: ((3, 6), "missampler"), 9: ((3, 6), "forker")}


class PreferringClient(SwarmClient):
    """Routes through `prefer` whenever it is not banned, so a scenario always meets its adversary."""

    prefer: str = ""

    async def choose_chain(self, **kwargs):
        chain = await super().choose_chain(**kwargs)
        if not self.prefer or self.prefer in self.banned:
            return chain
        record = next(r for r in await self.servers() if r.peer_id == self.prefer)
        return [type(hop)(self.prefer, hop.start, hop.end) if (record.start, record.end) == (hop.start, hop.end)
                else hop for hop in chain]


def adversary_args(kind: str, scale: float = PERTURB) -> list[str]:
    return ["--test-perturb", str(scale), "--test-adversary", kind]


def test_tolerance_and_relative_error():
    reference = torch.randn(1, 4, 64)
    assert relative_error(reference.clone(), reference) == 0.0
    noisy = reference + 0.05 * reference.pow(2).mean().sqrt() * torch.randn_like(reference)
    assert 0.02 < relative_error(noisy, reference) < 0.2  # ~ the noise scale, whatever the layer's magnitude
    assert relative_error(reference[:, :3], reference) == float("inf")
    assert tolerance_for(torch.float32) < tolerance_for(torch.float32, "fp16") <= tolerance_for(torch.bfloat16)


def test_ledger_binds_what_a_stage_sent_to_what_its_neighbour_received():
    async def run():
        ledger = Ledger(["A", "B"])
        honest, other = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
        ledger.put_nowait((0, pack_response({"echo": 5, "in": token_digest([7])}, [honest])))
        ledger.feed_tokens(5, [7])
        ledger.put_nowait((1, pack_response({"position": 5, "in": digest(honest)}, [other])))
        assert ledger.qsize() == 1 and not ledger.equivocations  # the answer passes; the echo is kept
        assert torch.equal(await ledger.output(0, 5, timeout_s=0.1), honest) and ledger.inputs(0, 6) is None
        # B says it received something else at position 6 than A echoed: one of the two lies.
        ledger.put_nowait((0, pack_response({"echo": 6, "in": token_digest([9])}, [honest])))
        ledger.put_nowait((1, pack_response({"position": 6, "in": digest(other)}, [other])))
        assert ledger.equivocations == [(1, 6)]
        events = [ledger.get_nowait() for _ in range(ledger.qsize())]
        failure = next(item for _, item in events if isinstance(item, StageFailure))
        assert (failure.code, failure.peer, failure.reporter) == ("equivocation", "B", "A") and failure.accusation
        # A ring's first stage must run the token the last stage announced (sender 1), not another.
        ledger.feed_tokens(6, [9], sender=1)
        assert ledger.equivocations == [(1, 6)]
        ledger.feed_tokens(7, [3], sender=1)
        ledger.put_nowait((0, pack_response({"echo": 7, "in": token_digest([4])}, [honest])))
        assert ledger.equivocations == [(1, 6), (0, 7)]
        # A speculating first stage's receipt names the token it was fed; its echo carries the draft it ran after
        # it (kept for re-running the step), and a malformed draft is not kept.
        ledger.feed_tokens(8, [5], sender=1)
        ledger.put_nowait((0, pack_response({"echo": 8, "in": token_digest([5]), "draft": [6, 7]}, [honest])))
        ledger.put_nowait((0, pack_response({"echo": 9, "in": token_digest([5]), "draft": [-1]}, [honest])))
        assert ledger.equivocations == [(1, 6), (0, 7)] and ledger.drafts == {8: [6, 7]}
        # After a rejected draft the next step starts inside the last one's rows: those rows are replaced.
        ledger = Ledger(["A", "B"])
        prompt, drafted, after = torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.randn(1, 2, 8)
        for position, rows in ((0, prompt), (2, drafted), (3, after)):
            ledger.put_nowait((0, pack_response({"echo": position}, [rows])))
        assert torch.equal(ledger.inputs(0, 5), torch.cat([prompt, drafted[:, :1], after], dim=1))
        assert ledger.inputs(0, 6) is None

    asyncio.run(run())


def test_sampled_checks_take_the_chain_s_stages_in_turn_from_a_random_one():
    class Session:
        chain = ["A", "B", "C"]

    starts = set()
    for seed in range(20):
        session, auditor = Session(), Auditor(None, rng=random.Random(seed))
        session.ledger = Ledger(["A", "B", "C"])
        picks = [auditor.pick_stage(session) for _ in range(7)]
        assert picks == [(picks[0] + i) % 3 for i in range(7)]
        starts.add(picks[0])
    assert starts == {0, 1, 2}


def test_an_accusation_is_not_evidence():
    failure = StageFailure("B", "push failed", code="push_failed", reporter="A")
    assert failure.accusation and StageFailure("B", "timeout").reporter == "B"


async def _ring(client: SwarmClient, prompt_ids: list[int], *, auditor: Auditor | None = None,
                verify: bool = True, speculate: int = 0) -> tuple[list[int], ResilientSession, list[Revision]]:
    session = ResilientSession(client, max_length=len(prompt_ids) + NEW_TOKENS, step_timeout_s=30,
                               auditor=auditor, verify=verify, speculate=speculate)
    tokens, revisions = [], []
    try:
        async for item in session.generate(prompt_ids, SamplingParams(max_new_tokens=NEW_TOKENS)):
            if isinstance(item, Revision):
                revisions.append(item)
                del tokens[item.keep:]
            else:
                tokens.append(item)
    finally:
        await session.close()
    return tokens, session, revisions


async def _wait_for_nodes(client: SwarmClient, count: int, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len({r.peer_id for r in await client.servers() if r.state == "online"}) < count:
        assert time.monotonic() < deadline, "the swarm's nodes did not all come online"
        await asyncio.sleep(1.0)


def _long_bans(client: SwarmClient) -> set[str]:
    """Peers banned as proven liars (not merely avoided for a while)."""
    now = time.monotonic()
    return {peer for peer, until in client._banned_until.items() if until - now > PROVEN_BAN_S / 2}


async def _scenarios(swarm: LocalSwarm, prompt_ids: list[int]) -> None:
    peers = {index: swarm.peer_id(index) for index in (*HONEST, *ADVERSARIES)}
    honest = {peers[i] for i in HONEST}
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        def client_facing(index: int | None) -> PreferringClient:
            client = PreferringClient(peer, swarm.source)
            for other in ADVERSARIES:
                if other != index:
                    client.ban(peers[other], for_s=1e6)
            client.prefer = peers[index] if index is not None else ""
            return client

        # The honest answer, checks off; then with every step checked, honest nodes are never flagged.
        plain = client_facing(None)
        await _wait_for_nodes(plain, len(peers))
        reference, _, _ = await _ring(plain, prompt_ids, verify=False)
        assert len(reference) == NEW_TOKENS
        auditor = Auditor(plain, 1.0, rng=random.Random(1))
        tokens, _, revisions = await _ring(plain, prompt_ids, auditor=auditor)
        verdicts = {r.verdict for r in auditor.reports}
        assert tokens == reference and not revisions and verdicts == {"honest"}, auditor.reports
        assert max(r.error for r in auditor.reports) < 1e-4

        for index, (_, kind) in ADVERSARIES.items():
            client = client_facing(index)
            auditor = Auditor(client, 1.0, rng=random.Random(index))
            tokens, session, revisions = await _ring(client, prompt_ids, auditor=auditor)
            adversary = peers[index]
            print(kind, [(r.peer[-6:], r.verdict, f"{r.error:.1e}") for r in auditor.reports if r.verdict != "honest"],
                  [e.code for e in session.events], revisions)
            assert tokens == reference, kind  # whatever it did, the user reads the honest answer
            assert not _long_bans(client) & honest, kind  # and no honest node is banned for it
            assert adversary in client.banned, kind  # the adversary is out of this client's chains
            if kind in ("liar", "sly", "missampler"):
                assert adversary in _long_bans(client)  # outvoted by two honest replicas: proven
                assert any(r.verdict == "liar" and r.peer == adversary for r in auditor.reports)
                assert revisions  # tokens made through it were withdrawn
            if kind in ("equivocator", "forker"):  # convicted by its own two signatures, the proof published
                assert "equivocated" in [e.code for e in session.events] and adversary in _long_bans(client)
                proof = client.peer.proof_book(swarm.source.name).proven[adversary]
                assert proof["kind"] == {"equivocator": "equivocation", "forker": "token_equivocation"}[kind]
            if kind == "blamer":
                assert [e.code for e in session.events] == ["push_failed"] and not revisions
    finally:
        peer.shutdown()


def test_every_adversary_is_caught_or_defeated_and_the_answer_is_the_honest_one(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [*HONEST.values(), *(layers for layers, _ in ADVERSARIES.values())]
    per_node = {index: adversary_args(kind) for index, (_, kind) in ADVERSARIES.items()}
    with LocalSwarm(str(path), ranges, threads_per_node=1, per_node_args=per_node) as swarm:
        asyncio.run(_scenarios(swarm, list(range(5, 25))))


class _Letters:
    """A tokenizer whose token i is the letter chr(97 + i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


def test_a_revision_rewinds_the_streamed_text_to_what_stands():
    from node.app.api import Generation
    from node.client.chat import TextRevision

    class Engine:
        tokenizer = _Letters()

        async def stream_tokens(self, prompt_ids, params):
            for item in (0, 1, 2, Revision(1), 3, 4, Revision(2), 5):
                yield item

    async def run(stops):
        generation = Generation(Engine(), [0], SamplingParams(max_new_tokens=8), stops)
        await generation.start()
        deltas = [d async for d in generation.deltas()]
        generation = Generation(Engine(), [0], SamplingParams(max_new_tokens=8), stops)
        await generation.start()
        return deltas, await generation.text(), generation

    deltas, text, generation = asyncio.run(run([]))
    assert deltas == ["a", "b", "c", TextRevision(1), "d", "e", TextRevision(2), "f"]
    assert text == "adf" and generation.completion_tokens == 3
    # Held back behind a possible stop sequence, text that is revised was never streamed: no revision is sent.
    deltas, text, _ = asyncio.run(run(["bcd", "xyz"]))
    assert text == "adf" and "".join(d for d in deltas if isinstance(d, str))[-1] == "f"


async def _proof_scenario(swarm: LocalSwarm, prompt_ids: list[int], liar: str, honest: list[str], kind: str
                          ) -> None:
    peers = []

    def fresh_client() -> PreferringClient:  # a new DHT peer: no bans, nothing learned
        peers.append(open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True))
        return PreferringClient(peers[-1], swarm.source)

    try:
        catcher = fresh_client()
        await _wait_for_nodes(catcher, len(honest) + 1)
        catcher.ban(liar, for_s=1e6)  # the reference answer runs on honest nodes only
        reference, _, _ = await _ring(catcher, prompt_ids, verify=False)
        # A catches the liar (every step checked) and publishes the proof.
        catcher._banned_until.clear()
        catcher.prefer = liar
        auditor = Auditor(catcher, 1.0, rng=random.Random(3))
        tokens, _, _ = await _ring(catcher, prompt_ids, auditor=auditor)
        assert tokens == reference and auditor.published, auditor.reports
        proof = auditor.published[0]
        assert verify_proof(proof, model=swarm.source.name) == liar
        # A missampler's output is honest: its proof is the token it signed against two others' signed tokens.
        assert proof.get("kind") == ("token" if kind == "missampler" else None)

        # B, fresh, never routes through the liar, nor checks with it: the proof is enough. Its answer, unchecked,
        # is the honest one.
        reader = fresh_client()
        deadline = time.monotonic() + 120
        while liar in {r.peer_id for r in await reader.servers()}:
            assert time.monotonic() < deadline, "the published proof never reached a fresh client"
            reader.peer.proof_book(swarm.source.name)._read_at.clear()
            await asyncio.sleep(2.0)
        assert {r.peer_id for r in await reader.servers()} == set(honest)
        for _ in range(5):
            assert liar not in {hop.node_id for hop in await reader.choose_chain()}
        tokens, _, _ = await _ring(reader, prompt_ids, verify=False)
        assert tokens == reference

        # A forged proof against an honest node (the real proof's witnesses reordered to accuse a verifier, and
        # junk) is stored on the DHT beside it; a fresh client reads and refuses both, and routes as before.
        victim = endorsed_peer(proof["witnesses"][1]["endorsement"])
        forged = copy.deepcopy(proof)
        forged["accused"], forged["witnesses"][:2] = victim, forged["witnesses"][1::-1]
        junk = {"v": 1, "model": swarm.source.name, "accused": victim, "witnesses": ["x"] * 3}
        for value in (*proof_entries(forged), *proof_entries(junk)):
            subkey = proof_subkey(MSGPackSerializer.dumps(value))
            assert await peers[0].dht.store(proofs_key(swarm.source.name, victim), subkey=subkey, value=value,
                                            expiration_time=get_dht_time() + 600, return_future=True)
        skeptic = fresh_client()
        book = skeptic.peer.proof_book(swarm.source.name)
        assert {r.peer_id for r in await skeptic.servers()} == set(honest)
        assert book.refused == 2 and victim not in book.proven and liar in book.proven

        # Credit for checked work: A's checks vouched for honest nodes' tokens, and for none of the liar's.
        credit = await skeptic.peer.read_credit(swarm.source.name)
        assert liar not in credit and credit and set(credit) <= set(honest), credit
        assert all(c.clients == 1 and c.tokens >= len(prompt_ids) for c in credit.values())
    finally:
        for peer in peers:
            peer.shutdown()


@pytest.mark.parametrize("kind, layers", [("liar", (0, 3)), ("missampler", (3, 6))])
def test_a_published_proof_keeps_every_client_off_the_liar_and_a_forged_one_changes_nothing(tiny_checkpoint, kind,
                                                                                             layers):
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [*HONEST.values(), layers]
    with LocalSwarm(str(path), ranges, threads_per_node=1, per_node_args={4: adversary_args(kind)}) as swarm:
        liar, honest = swarm.peer_id(4), [swarm.peer_id(i) for i in HONEST]
        asyncio.run(_proof_scenario(swarm, list(range(5, 25)), liar, honest, kind))
        # `layerhive status` leaves the proven liar out, names it, and shows each node's checked credit.
        env = {**os.environ, "LAYERHIVE_INITIAL_PEERS": ",".join(swarm.initial_peers)}
        shown = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--json", "--model", str(path)],
                               capture_output=True, text=True, timeout=120, env=env)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["proven_liars"] == [liar] and {n["peer_id"] for n in status["nodes"]} == set(honest)
        assert any(n["checked_tokens"] > 0 and n["checked_by"] == 1 for n in status["nodes"]), status["nodes"]


class _StoodLedger:
    """The stage's echoed outputs as they stand (`Ledger.inputs`, `Ledger.outputs`): one-position steps."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.outputs = rows, {0: {p: rows[:, p:p + 1] for p in range(rows.shape[1])}}

    def inputs(self, index: int, end: int) -> torch.Tensor:
        return self.rows[:, :end]


def test_a_verifier_s_replayed_rows_of_the_wrong_count_dispute_no_step():
    """A verifier's rows are a peer's input: one that sends back one row for a four-position catch-up must not
    have that row broadcast against every position and put the stage's honest steps in dispute."""
    torch.manual_seed(0)
    honest = torch.randn(1, 4, 8)
    lied = honest.clone()
    lied[:, 2] += 1.0
    auditor = Auditor(None, 1.0)
    found = Recomputed(honest[:, 3:], "verifier", torch.float32, None, replayed=honest[:, :3].clone(), since=0)
    assert auditor._replayed_lie(_StoodLedger(honest), 0, found, 3, 1e-4) is None
    assert auditor._replayed_lie(_StoodLedger(lied), 0, found, 3, 1e-4) == (2, 3, True)
    one_row = replace(found, replayed=honest[:, :1].clone())
    assert auditor._replayed_lie(_StoodLedger(honest), 0, one_row, 3, 1e-4) is None
