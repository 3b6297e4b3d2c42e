"""The hostile-peer suite: real node processes attacked by real hostile processes (`tests.node.hostile_peers`).

Every attack gets a bound, a check before work, and here a test that the bound holds while honest users are
still served.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from node.app.local_swarm import LocalSwarm
from node.client.routing import believed, plan_chains
from node.client.session import connect
from node.model.checkpoint import resolve_model
from node.model.sampling import SamplingParams
from node.net.credit import credit_key
from node.net.dhtbounds import MAX_SUBKEYS
from node.net.dhtkeys import servers_key
from node.net.protocol import (
    INFERENCE_HANDLER,
    MAX_ERROR_CHARS,
    ProtocolError,
    pack,
    parse_open,
    parse_step,
    unpack_metadata,
)
from node.serve.assignment import EpochTracker, check_records, model_spec, plan
from swarm.records import (
    MAX_EPOCH,
    MAX_MEMORY_BYTES,
    MIN_LAYER_LATENCY_S,
    UNKNOWN_LAYER_LATENCY_S,
    RecordError,
    ServerRecord,
    node_spec,
)
from swarm.types import Hop, ModelSpec
from tests.node.hostile_peers import RssPeak, hostile

pytestmark = pytest.mark.timeout(600)


# --- records ---------------------------------------------------------------------------------------------


def _record(**fields) -> ServerRecord:
    return ServerRecord(**{**dict(peer_id="p", model="tiny", start=0, end=2, state="online"), **fields})


def test_epochs_are_bounded_and_the_plan_saturates_at_the_bound(tiny_checkpoint):
    for epoch in (2**64 - 1, 2**53, -1):
        with pytest.raises(RecordError, match="epoch"):
            ServerRecord.from_dict(_record(epoch=epoch).to_dict())
    for name in ("free_kv_tokens", "queue_len", "sessions"):
        with pytest.raises(RecordError, match=name):
            ServerRecord.from_dict(_record(**{name: 2**40}).to_dict())
    at_bound = ServerRecord.from_dict(_record(epoch=MAX_EPOCH).to_dict())
    spec = model_spec(resolve_model(str(tiny_checkpoint("llama", num_layers=4))))
    joiner = _record(peer_id="q", state="joining", start=0, end=1, memory_bytes=1e9)
    records = [ServerRecord(**{**at_bound.to_dict(), "model": spec.name, "end": spec.num_layers}),
               ServerRecord(**{**joiner.to_dict(), "model": spec.name})]
    result = plan(spec, check_records(spec, records))
    assert result.range_of("q") is not None and result.epoch == MAX_EPOCH  # planned, and announceable
    ServerRecord(**{**records[1].to_dict(), "epoch": result.epoch}).validate(spec.num_layers)


def test_epochs_are_monotone_per_peer_and_the_tracker_is_bounded():
    tracker = EpochTracker(max_peers=3)
    assert tracker.admit(_record(epoch=5)) and not tracker.admit(_record(epoch=4)) and tracker.admit(_record(epoch=5))
    for i in range(10):  # fresh peer ids do not grow it
        tracker.admit(_record(peer_id=f"fresh{i}", epoch=1))
    assert len(tracker.newest) == 3


def test_claims_beyond_hardware_are_taken_at_plausible_bounds():
    liar = node_spec(_record(layer_latency_s=1e-7, prefill_s_per_token_per_layer=1e-12, memory_bytes=5e13,
                             uplink_bps=1e15))
    assert liar.layer_latency_s == MIN_LAYER_LATENCY_S and liar.memory_bytes == MAX_MEMORY_BYTES
    assert liar.uplink_bps <= 100e9 and liar.prefill_s_per_token_per_layer > 1e-12
    # What the client believes: never faster than it measured, nor (unmeasured) than the neutral guess.
    assert believed(_record(layer_latency_s=1e-7), 0.02).layer_latency_s == 0.02
    assert believed(_record(layer_latency_s=1e-7), None).layer_latency_s == UNKNOWN_LAYER_LATENCY_S
    assert believed(_record(layer_latency_s=0.03), 0.001).layer_latency_s == 0.03  # an honest, busy node's own


def test_joiners_that_claim_the_moon_and_never_serve_open_no_hole():
    """200 random swarms of a 30-layer model (2-5 serving ranges, some copied) that one or two joiners claiming
    up to 50 TB and 10 us a layer have joined and never leave "joining": the plan may place them, but no layer
    served now is left to them alone (before the fix, 9 of these 200 swarms lost layers to such joiners)."""
    model = ModelSpec("m", 30, 576, layer_bytes=14e6, kv_bytes_per_token_per_layer=1e3)
    rng = random.Random(0)

    def record(peer: str, start: int, end: int, memory_bytes: float, layer_latency_s: float,
               state: str = "online") -> ServerRecord:
        return ServerRecord(peer_id=peer, model="m", start=start, end=end, state=state, epoch=3, uplink_bps=1e8,
                            memory_bytes=memory_bytes, layer_latency_s=layer_latency_s)

    holes = []
    for _ in range(200):
        cuts = [0, *sorted(rng.sample(range(1, 30), rng.randint(1, 4))), 30]
        serving = [record(f"o{i}", start, end, rng.choice([0.3e9, 0.6e9, 1e9]), rng.choice([0.002, 0.005, 0.01]))
                   for i, (start, end) in enumerate(itertools.pairwise(cuts))]
        serving += [record(f"d{r.peer_id}", r.start, r.end, r.memory_bytes, 0.005)
                    for r in serving if rng.random() < 0.5]
        liars = [record(f"j{k}", 0, 1, rng.choice([2e9, 1e12, 5e13]), rng.choice([1e-5, 1e-3]), "joining")
                 for k in range(rng.randint(1, 2))]
        records = check_records(model, serving + liars)
        ranges = plan(model, records).assignment.ranges
        online = [r for r in records if r.state == "online"]
        served = {layer for r in online for layer in range(r.start, r.end)}
        kept = {layer for r in online if r.peer_id in ranges for layer in range(ranges[r.peer_id].start,
                                                                                 ranges[r.peer_id].end)}
        holes += [sorted(served - kept)] if served - kept else []
    assert holes == []


def test_a_record_claiming_absurd_speed_does_not_take_the_chains(tiny_checkpoint, tmp_path):
    """Two honest nodes serve 0:2 and 2:4; a hostile process serves 0:2 too, 200 ms a step, while its record claims
    0.1 us a layer, 50 TB and the largest epoch. Taken at its word it would carry every chain; the client measures
    it and routes around it. A node joining afterwards still gets layers and goes online."""
    model = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(model, [(0, 2), (2, 4)], threads_per_node=1, log_dir=str(tmp_path)) as swarm, \
            hostile("lying-record", swarm.initial_peers, model, "--layers", "0:2", "--slowdown-ms", "200",
                    "--ttl", "6") as liar:
        liar_id = liar.value("peer ")
        honest_first = swarm.peer_id(0)

        async def chains() -> tuple[list, list]:
            async with connect(swarm.initial_peers, swarm.source) as client:
                deadline = time.monotonic() + 60
                while liar_id not in {r.peer_id for r in await client.servers()}:
                    assert time.monotonic() < deadline, "the liar's record never showed"
                    await asyncio.sleep(0.5)
                records = await client.servers()
                naive = plan_chains(client.spec, records, {})[0]  # the records taken at their word
                chosen = [await client.choose_chain() for _ in range(5)]
                return naive, chosen

        naive, chosen = asyncio.run(chains())
        assert naive[0].node_id == liar_id  # the attack is real: believed, it takes the chain
        assert all(chain[0].node_id == honest_first for chain in chosen), chosen

        joiner = subprocess.Popen(
            [sys.executable, "-m", "node.app.cli", "node", "--model", model, "--initial-peers", *swarm.initial_peers,
             "--quick-measure", "--max-memory-gb", "0.05", "--ttl", "6", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out = []
            for line in joiner.stdout:
                out.append(line)
                if line.startswith("serving "):
                    break
            assert out and out[-1].startswith("serving "), "".join(out[-20:])
        finally:
            joiner.terminate()
            joiner.wait(timeout=60)


# --- the server: a live swarm of two nodes, attacked at its first stage -------------------------------------

KV_BUDGET_MB = 4  # layers 0:2 of the tiny model: 512 B a token, so 32 sessions of 256 tokens
PROMPT = [5, 17, 3, 99, 42]


async def honest_answer(swarm: LocalSwarm, sessions: int = 1) -> list[list[int]]:
    """Greedy ring answers to PROMPT from a fresh client (a newcomer to every node)."""
    async with connect(swarm.initial_peers, swarm.source) as client:
        chain = [Hop(swarm.peer_id(0), 0, 2), Hop(swarm.peer_id(1), 2, 4)]
        params = SamplingParams(max_new_tokens=8)
        answers = []
        for _ in range(sessions):
            session = await client.open_session(chain, max_length=64, sampling=params)
            try:
                answers.append([t async for t in session.tokens(PROMPT, 0)])
            finally:
                await session.close()
        return answers


async def node_info(swarm: LocalSwarm, index: int) -> dict:
    async with connect(swarm.initial_peers, swarm.source) as client:
        return await client.node_info(swarm.peer_id(index))


@pytest.fixture(scope="module")
def swarm(tiny_checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    model = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(model, [(0, 2), (2, 4)], threads_per_node=1, node_args=["--kv-budget-mb", str(KV_BUDGET_MB)],
                    log_dir=str(tmp_path_factory.mktemp("hostile-swarm"))) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def reference(swarm) -> list[int]:
    return asyncio.run(honest_answer(swarm))[0]


def attack_args(swarm: LocalSwarm, *args: str) -> tuple:
    return (swarm.initial_peers, str(swarm.source.root), "--target", swarm.peer_id(0), "--layers", "0:2", *args)


def test_oversized_messages_are_refused_before_they_are_read(swarm, reference):
    """Four streams announcing 64 MB messages (two as a session's opening, two after it): each is refused by its
    header and its stream ended after at most a few hundred KB were read (into nothing), so the node never holds
    the 256 MB. The refusal reaches a sender that stops to listen; one still writing sees its stream reset."""
    with RssPeak(swarm.processes[0].pid) as rss, \
            hostile("oversized", *attack_args(swarm, "--count", "4", "--size-mb", "64")) as attack:
        result = attack.result()
    assert set(result["codes"]) <= {"too_large", "closed"} and result["max_sent_mb"] <= 8, result
    assert rss.growth_mb < 64, f"the node grew by {rss.growth_mb:.0f} MB"
    assert asyncio.run(honest_answer(swarm)) == [reference]
    assert swarm.processes[0].poll() is None


def test_a_client_that_never_reads_its_replies_is_dropped(swarm, reference):
    """Two sessions send refused steps carrying a 256 KB field as fast as the rate limit lets them and read
    nothing: the errors are short, the outbox is bounded, the session is dropped, and memory stays bounded."""
    with RssPeak(swarm.processes[0].pid) as rss, \
            hostile("never-read", *attack_args(swarm, "--count", "2", "--duration", "12")) as attack:
        assert asyncio.run(honest_answer(swarm)) == [reference]  # served during the attack
        attack.result()
    assert rss.growth_mb < 100, f"the node grew by {rss.growth_mb:.0f} MB"
    deadline = time.monotonic() + 30
    while asyncio.run(node_info(swarm, 0))["sessions"] and time.monotonic() < deadline:
        time.sleep(1)
    assert asyncio.run(node_info(swarm, 0))["sessions"] == 0  # dropped, its memory returned


def test_error_texts_never_echo_unbounded_input():
    huge = "x" * (1 << 20)
    with pytest.raises(ProtocolError) as caught:
        parse_step(pack({"position": huge}), hidden_size=64, expected_position=0, max_length=8)
    assert len(str(caught.value)) <= MAX_ERROR_CHARS
    with pytest.raises(ProtocolError) as caught:
        parse_open(pack({"open": {"session_id": "s", "start": 0, "end": 1, "max_length": 8,
                                  "sampling": {"max_new_tokens": 1, "temperature": huge, "top_p": 1, "seed": None,
                                               "stop": []}}}), max_length_limit=8)
    assert len(str(caught.value)) <= MAX_ERROR_CHARS


def test_a_push_flood_is_capped_per_peer_and_waits_without_polling(swarm, reference):
    """64 push streams naming sessions that do not exist: 16 may wait (on an event, for at most 10 s), the rest are
    refused at once; honest sessions are served meanwhile."""
    with hostile("push-flood", *attack_args(swarm, "--count", "64", "--duration", "15")) as attack:
        assert asyncio.run(honest_answer(swarm)) == [reference]
        result = attack.result()
    assert result["codes"].get("busy", 0) >= 64 - 16 and set(result["codes"]) <= {"busy", "bad_request"}, result
    assert result["held_s"] < 30


def test_an_honest_newcomer_is_admitted_while_idle_hoarders_hold_their_shares(swarm, reference):
    """Two fresh peer ids each try to open 64 sessions of 256 tokens (the node's budget holds 32) and never step:
    each holds at most its newcomer share (2 sessions), and a fresh honest client still opens and generates."""
    with hostile("idle-hoard", *attack_args(swarm, "--count", "64", "--peers", "2", "--max-length", "256",
                                            "--duration", "15")) as attack:
        answers = asyncio.run(honest_answer(swarm, sessions=3))
        info = asyncio.run(node_info(swarm, 0))
        codes = attack.result()["codes"]
    assert answers == [reference] * 3
    assert info["sessions"] <= 2 * 2 and codes.get("ok", 0) <= 2 * 2, (info, codes)  # 1/16 of the budget each
    assert set(codes) <= {"ok", "no_capacity"}, codes


def test_bad_direct_offers_make_no_one_a_port_scanner_or_a_blind_writer(swarm, reference):
    """As a session's next stage, the attacker offers a third party's port (127.0.0.2) or a port of its own that
    cannot prove the offer's key: the node dials no third party and never sends a ticket to the fake."""
    with hostile("bad-offer", *attack_args(swarm, "--count", "4", "--duration", "8", "--max-length", "16")) as attack:
        result = attack.result()
    assert result["opened"] == 4 and result["offers"] == 4, result
    assert result["victim_connections"] == 0 and result["tickets_leaked"] == 0, result
    assert asyncio.run(honest_answer(swarm)) == [reference]


def test_idle_connections_at_the_direct_port_do_not_break_honest_links(swarm, reference):
    """70 connections from another address that never present a ticket: at most a few are held, and the honest
    previous stage (on 127.0.0.1) still links directly, without anyone being blamed."""
    before = asyncio.run(node_info(swarm, 0))["direct_links"]
    with hostile("direct-squat", *attack_args(swarm, "--count", "70", "--duration", "15", "--max-length", "16")) \
            as attack:
        assert asyncio.run(honest_answer(swarm, sessions=2)) == [reference] * 2
        after = asyncio.run(node_info(swarm, 0))["direct_links"]
        result = attack.result()
    assert result["most_held"] <= 4 and result["refused"] >= 66, result
    assert after >= before + 2  # the ring's last stage pushed to the first over a direct link, each time


def test_forged_pushes_are_refused_before_any_compute(swarm, reference):
    """A pusher whose receipts are forged (no endorsed session key, a zero signature) gets `bad_receipt` for every
    step, and the stage computes none of them: a receipt is checked before its step runs. (Checked on a second
    thread while the step ran instead, the verify held the GIL: cryptography's Ed25519 does not release it, so
    the step waited for it all the same.)"""
    before = asyncio.run(node_info(swarm, 0))["steps_served"]
    with hostile("forged-pushes", *attack_args(swarm, "--count", "12", "--max-length", "16")) as attack:
        result = attack.result()
    computed = asyncio.run(node_info(swarm, 0))["steps_served"] - before
    assert result["opened"] == "ok" and result["codes"] == {"bad_receipt": 12}, result
    assert computed == 0, f"{computed} forged steps were computed"
    assert asyncio.run(honest_answer(swarm)) == [reference]


def test_session_ids_are_scoped_to_the_client_that_opened_them(swarm):
    """A chain member that learns a session id cannot squat it: another client opening the same id gets its own."""

    async def main() -> list[str]:
        async with connect(swarm.initial_peers, swarm.source) as squatter, \
                connect(swarm.initial_peers, swarm.source) as victim:
            codes, held = [], []
            for client in (squatter, victim):
                p2p = await client.p2p()
                _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(swarm.peer_id(0)),
                                                                         INFERENCE_HANDLER)
                held.append(writer)  # the squatter's session stays open while the victim opens
                await P2P.send_protobuf(pack({"open": {"session_id": "known-id", "start": 0, "end": 2,
                                                       "max_length": 16}}), writer)
                response, _ = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                codes.append(unpack_metadata(response).get("error", {}).get("code", "opened"))
            for writer in held:
                writer.close()
            return codes

    assert asyncio.run(main()) == ["opened", "opened"]


# --- the DHT: junk under our keys ---------------------------------------------------------------------------


async def _count_validations(_dht, node) -> None:
    """Runs in a reader's DHT process: from now on, counts the records its validators check."""
    validator, node.validations = node.protocol.record_validator, 0
    check = validator.validate

    def counted(record) -> bool:
        node.validations += 1
        return check(record)

    validator.validate = counted


async def _validations(_dht, node) -> int:
    return node.validations


async def _subkeys_held(key_name: str, _dht, node) -> int:
    """Runs in a DHT process: how many subkeys its own storage holds under `key_name`."""
    held = node.protocol.storage.get(DHTID.generate(source=key_name))
    return len(held.value) if held is not None and isinstance(held.value, DictionaryDHTValue) else 0


def test_junk_under_our_dht_keys_is_refused_and_a_reader_checks_a_bounded_number(swarm, reference):
    """A hostile DHT peer keeps, and offers to every peer, a 1 MB server record, 2,000 copies of its signed record
    under distinct subkeys (its owner key with a comment added; more would not fit one answer, which hivemind caps at
    4 MB), and values of no kind or of another kind than their key's. No honest peer stores any; a fresh reader
    offered the 2,000 refuses that answer before checking them, lists the honest servers only, and its DHT process
    lives on; the swarm keeps routing and answering."""
    name = swarm.source.name
    with RssPeak(swarm.processes[0].pid) as rss, \
            hostile("dht-junk", swarm.initial_peers, str(swarm.source.root), "--count", "2000", "--duration", "120",
                    ready_timeout_s=300) as attack:
        accepted = json.loads(attack.value("accepted "))
        held = [swarm.bootstrap.dht.run_coroutine(functools.partial(_subkeys_held, key)) for key in
                (servers_key(name), credit_key(name))]

        async def read() -> tuple[set[str], int, list[Hop], bool]:
            async with connect(swarm.initial_peers, swarm.source) as client:
                await client.peer.dht.run_coroutine(_count_validations, return_future=True)
                listed = {r.peer_id for r in await client.servers()}
                checked = await client.peer.dht.run_coroutine(_validations, return_future=True)
                return listed, checked, await client.choose_chain(), client.peer.dht.is_alive()

        listed, checked, chain, alive = asyncio.run(read())
        answers = asyncio.run(honest_answer(swarm))
    assert accepted == {"huge": 0, "many": 0, "no_kind": 0, "wrong_key": 0}, accepted
    assert held == [2, 0], held  # the bootstrap peer holds the two honest records, nothing else
    assert listed == {swarm.peer_id(0), swarm.peer_id(1)} and alive
    assert checked < MAX_SUBKEYS, f"the reader checked {checked} records"
    assert [hop.node_id for hop in chain] == [swarm.peer_id(0), swarm.peer_id(1)]
    assert answers == [reference]
    assert rss.growth_mb < 64, f"the node grew by {rss.growth_mb:.0f} MB"
