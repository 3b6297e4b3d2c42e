"""Spot checks: a node that perturbs its outputs is caught and routed around; honest nodes pass."""

from __future__ import annotations

import asyncio
import random
import subprocess

import pytest
import torch

from node.app.local_swarm import LocalSwarm
from node.client.failover import ResilientSession
from node.client.generate import generate
from node.client.session import SwarmClient
from node.client.verify import Auditor, EchoRecorder, relative_error, tolerance_for
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.net.membership import open_dht
from node.net.protocol import ProtocolError, pack, pack_response, parse_open

pytestmark = pytest.mark.timeout(300)

RANGES = [(0, 3), (3, 6)]
LIAR = 0  # node index; it serves 0:3 next to two honest replicas
PERTURB = 0.05  # noise of 5% of the output's RMS: far above fp32 rounding, small enough to look plausible
NEW_TOKENS = 12


class SwarmWithLiar(LocalSwarm):
    """A local swarm whose node `liar` adds noise to its outputs (the hidden `--test-perturb` aid)."""

    def __init__(self, *args, liar: int, scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.liar, self.scale = liar, scale

    def _spawn_node(self, index: int, *layers) -> subprocess.Popen:
        if index != self.liar:
            return super()._spawn_node(index, *layers)
        honest_args = self.node_args
        self.node_args = [*honest_args, "--test-perturb", str(self.scale)]
        try:
            return super()._spawn_node(index, *layers)
        finally:
            self.node_args = honest_args


def test_tolerance_and_relative_error():
    reference = torch.randn(1, 4, 64)
    assert relative_error(reference.clone(), reference) == 0.0
    noisy = reference + 0.05 * reference.pow(2).mean().sqrt() * torch.randn_like(reference)
    assert 0.02 < relative_error(noisy, reference) < 0.2  # ~ the noise scale, whatever the layer's magnitude
    assert relative_error(reference[:, :3], reference) == float("inf")
    assert tolerance_for(torch.float32) < tolerance_for(torch.float32, "fp16") <= tolerance_for(torch.bfloat16)


def test_audit_flag_is_validated():
    opening = {"session_id": "s", "start": 0, "end": 1, "max_length": 8}
    assert parse_open(pack({"open": opening}), max_length_limit=64).audit is False
    assert parse_open(pack({"open": {**opening, "audit": True}}), max_length_limit=64).audit is True
    with pytest.raises(ProtocolError):
        parse_open(pack({"open": {**opening, "audit": "yes"}}), max_length_limit=64)


def test_recorder_diverts_echoes_and_keeps_answers():
    async def run():
        recorder = EchoRecorder()
        first, second = torch.randn(1, 3, 8), torch.randn(1, 1, 8)
        recorder.put_nowait((0, pack_response({"echo": 0}, [first])))
        recorder.put_nowait((0, pack_response({"echo": 3}, [second])))
        recorder.put_nowait((1, pack_response({"position": 0}, [first])))
        assert recorder.qsize() == 1  # only the answer reaches the session
        assert torch.equal(recorder.inputs(0, 4), torch.cat([first, second], dim=1))
        assert recorder.inputs(0, 5) is None and recorder.inputs(1, 2) is not None
        assert torch.equal(await recorder.output(0, 3, timeout_s=0.1), second)
        with pytest.raises(TimeoutError):
            await recorder.output(1, 3, timeout_s=0.05)

    asyncio.run(run())


async def _generate(client: SwarmClient, head: ClientHead, prompt_ids: list[int], auditor: Auditor | None):
    session = ResilientSession(client, max_length=len(prompt_ids) + NEW_TOKENS, step_timeout_s=20, auditor=auditor)
    await session.open()
    try:
        tokens = [t async for t in generate(session, head, prompt_ids, SamplingParams(max_new_tokens=NEW_TOKENS))]
    finally:
        chain = [hop.node_id for hop in session.session.chain] if session.session else []
        await session.close()
    return tokens, chain, session


async def _scenario(swarm: SwarmWithLiar, prompt_ids: list[int]) -> None:
    source = swarm.source
    liar = swarm.peer_id(LIAR)
    head = ClientHead(source)
    peer = open_dht(swarm.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        # The honest answer, with the liar kept out; p = 0 opens no audit (no echo traffic).
        honest_client = SwarmClient(peer, source)
        honest_client.ban(liar, for_s=3600)
        reference, _, plain = await _generate(honest_client, head, prompt_ids, Auditor(honest_client, 0.0))
        assert plain.recorder is None and len(reference) == NEW_TOKENS

        # Honest nodes audited at every step are never flagged (fp32 nodes, fp32 tolerance).
        auditor = Auditor(honest_client, 1.0, compute_dtype=torch.float32, rng=random.Random(1))
        tokens, _, _ = await _generate(honest_client, head, prompt_ids, auditor)
        assert tokens == reference
        assert len(auditor.reports) == NEW_TOKENS and {r.verdict for r in auditor.reports} == {"honest"}
        assert max(r.error for r in auditor.reports) < auditor.tolerance / 10

        # With the liar routable, audits catch it whenever it serves, ban it, and the answer goes on without it.
        client = SwarmClient(peer, source)
        detected = None
        for attempt in range(6):
            auditor = Auditor(client, 1.0, compute_dtype=torch.float32, rng=random.Random(attempt))
            tokens, chain, session = await _generate(client, head, prompt_ids, auditor)
            flagged = [r for r in auditor.reports if r.verdict != "honest"]
            # The liar is caught as an audited stage, or as a verifier that a third node outvotes.
            assert all((r.verdict, r.peer) == ("liar", liar) or (r.verdict, r.verifier) == ("verifier_lied", liar)
                       for r in flagged), flagged
            assert all(r.tiebreaker is not None and r.error > 10 * auditor.tolerance for r in flagged)
            assert len(tokens) == NEW_TOKENS and liar not in chain
            if flagged:
                detected = flagged[0]
                failed_over = [e.code for e in session.events]
                assert failed_over == (["failed_verification"] if detected.verdict == "liar" else [])
                break
        assert detected is not None, "the liar was never caught"
        print(f"caught on attempt {attempt}: {detected}")
        assert liar in client.banned
        # Caught at the prompt, the answer is the honest one; caught later, it is honest from there on.
        if detected.position == 0 and detected.verdict == "liar":
            assert tokens == reference
        tokens, chain, _ = await _generate(client, head, prompt_ids, Auditor(client, 1.0, compute_dtype=torch.float32))
        assert tokens == reference and liar not in chain
    finally:
        peer.shutdown()


def test_liar_is_caught_and_routed_around_honest_nodes_pass(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=6)
    ranges = [RANGES[0], RANGES[0], RANGES[0], RANGES[1], RANGES[1]]
    with SwarmWithLiar(str(path), ranges, threads_per_node=1, liar=LIAR, scale=PERTURB) as swarm:
        asyncio.run(_scenario(swarm, list(range(5, 25))))
