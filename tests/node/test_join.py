"""Joining without fixed ranges: the deterministic plan (unit) and real node processes taking it (live)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from node.app.local_swarm import LocalSwarm
from node.model.checkpoint import resolve_model
from node.model.stage import Stage
from node.net.membership import open_dht
from node.serve.assignment import EpochTracker, check_records, model_spec, plan, planned_kv_budget
from node.serve.node import Node, NodeConfig
from swarm.allocator import allocate
from swarm.records import ServerRecord
from swarm.types import LayerRange, ModelSpec

pytestmark = pytest.mark.timeout(300)

SPEC = ModelSpec("tiny", 6, 64, layer_bytes=80e3, kv_bytes_per_token_per_layer=128)
MEMORY = 6e6  # at the reference dtype: room for 2-5 of the 6 layers with the allocator's KV share


def joining(i: int, **fields) -> ServerRecord:
    defaults = dict(model="tiny", start=0, end=1, state="joining", memory_bytes=MEMORY,
                    layer_latency_s=0.001 * (1 + i % 2))
    return ServerRecord(peer_id=f"peer{i}", **{**defaults, **fields})


def as_online(result, records: list[ServerRecord]) -> list[ServerRecord]:
    return [ServerRecord(**{**r.to_dict(), "state": "online", "start": result.range_of(r.peer_id).start,
                            "end": result.range_of(r.peer_id).end, "epoch": result.epoch}) for r in records]


def test_the_plan_is_a_function_of_the_records_whatever_their_order():
    records = [joining(i) for i in range(5)]
    first = plan(SPEC, check_records(SPEC, records))
    assert sorted(first.assignment.ranges) == [r.peer_id for r in records]
    for seed in range(10):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        assert plan(SPEC, check_records(SPEC, shuffled)) == first
    # With nobody online yet, it is the allocator's global plan, and following it is a fixpoint.
    assert dict(first.assignment.ranges) == dict(allocate(SPEC, {p: s for p, s in _specs(records)}, _rtt).ranges)
    online = as_online(first, records)
    again = plan(SPEC, check_records(SPEC, online))
    assert again.assignment.ranges == first.assignment.ranges and again.epoch == first.epoch


def _specs(records):
    from node.serve.assignment import planning_spec

    return [(r.peer_id, planning_spec(r)) for r in sorted(records, key=lambda r: r.peer_id)]


def _rtt(a: str, b: str) -> float:
    return 0.0 if a == b else 0.005


def test_a_joiner_or_a_departure_is_planned_the_same_everywhere_and_covers_every_layer():
    records = [joining(i) for i in range(4)]
    online = as_online(plan(SPEC, records), records)
    with_joiner = plan(SPEC, online + [joining(9)])
    assert with_joiner.range_of("peer9") is not None and with_joiner.epoch > online[0].epoch
    assert plan(SPEC, [joining(9), *reversed(online)]) == with_joiner
    departed = plan(SPEC, online[1:])
    covered = {layer for rng in departed.assignment.ranges.values() for layer in range(rng.start, rng.end)}
    assert covered == set(range(SPEC.num_layers)) and "peer0" not in departed.assignment.ranges
    # Draining and offline nodes get no range.
    leaving = [ServerRecord(**{**online[0].to_dict(), "state": "draining"}), *online[1:]]
    assert plan(SPEC, leaving) == departed


def test_bad_records_are_ignored_with_the_reason_logged(caplog):
    good = [joining(i) for i in range(3)]
    outside = ServerRecord(peer_id="outside", model="tiny", start=4, end=9, state="online", memory_bytes=MEMORY)
    greedy = ServerRecord(peer_id="greedy", model="tiny", start=0, end=6, state="online", memory_bytes=100e3)
    huge = joining(7, memory_bytes=1e15)
    other_model = joining(8, model="other")
    with caplog.at_level("WARNING", logger="node.serve.assignment"):
        kept = check_records(SPEC, [*good, outside, greedy, huge, other_model])
    assert kept == good
    log = caplog.text
    assert "outside the model" in log and "whose weights alone need" in log
    assert "not a plausible amount of memory" in log and "not 'tiny'" in log


def test_stale_epochs_are_not_followed(caplog):
    tracker = EpochTracker()
    newer = ServerRecord(peer_id="p", model="tiny", start=0, end=3, state="online", memory_bytes=MEMORY, epoch=5)
    older = ServerRecord(**{**newer.to_dict(), "start": 3, "end": 6, "epoch": 4})
    assert check_records(SPEC, [newer], tracker) == [newer]
    with caplog.at_level("WARNING", logger="node.serve.assignment"):
        assert check_records(SPEC, [older], tracker) == []
    assert "stale" in caplog.text
    # Of two records of one peer in one read, the newer epoch wins.
    assert check_records(SPEC, [older, newer]) == [newer]


# --- live: real node processes on 127.0.0.1 ---------------------------------------------------------------

TTL_S = 6.0  # heartbeat and re-planning every 2 s; a killed node's record expires after 6 s
NODE_ARGS = ["--quick-measure", "--max-memory-gb", "0.012", "--ttl", str(TTL_S)]  # 12 MB fp32 = 6 MB reference


def _layers(records) -> dict[str, LayerRange]:
    return {r.peer_id: LayerRange(r.start, r.end) for r in records}


def _wait_for_settled_plan(swarm: LocalSwarm, spec: ModelSpec, nodes: int, timeout_s: float):
    """The online records once `nodes` of them cover every layer and serve exactly the plan over them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = [r for r in swarm.online_records() if r.peer_id not in swarm.dead_peers]
        covered = {layer for r in records for layer in range(r.start, r.end)}
        planned = dict(plan(spec, check_records(spec, records)).assignment.ranges)
        if len(records) == nodes and len(covered) == spec.num_layers and planned == _layers(records):
            return records
        time.sleep(0.5)
    raise TimeoutError(f"the swarm did not settle on its plan; logs in {swarm.log_dir}")


def test_nodes_started_together_take_the_plan_and_cover_a_killed_one(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_layers=6)
    spec = model_spec(resolve_model(str(path)))
    # Heterogeneous: a slower GPU, and a slow link (20 ms one way, 10 Mbit/s up).
    heterogeneous = {0: ["--test-slowdown-ms", "30"], 1: ["--emulate-delay-ms", "20", "--emulate-bandwidth-mbps", "10"]}
    with LocalSwarm(str(path), num_nodes=5, join=True, threads_per_node=1, node_args=NODE_ARGS,
                    per_node_args=heterogeneous) as swarm:
        records = _wait_for_settled_plan(swarm, spec, 5, 60)
        ranges = _layers(records)
        # Each node serves exactly its range in the plan over everyone's records (checked above), and
        # with memory for 2-5 layers each that is not five copies of one range. (Whether they all took
        # the global plan at once depends on how far apart the processes came up on a loaded machine: a
        # node that starts later than the settle window is placed by the incremental plan instead.)
        assert len(set(ranges.values())) > 1
        print("settled (range, epoch):", {r.peer_id[:8]: (f"{r.start}:{r.end}", r.epoch) for r in records})

        victim = next(i for i in range(5) if swarm.peer_id(i) in ranges)
        swarm.kill(victim)
        started = time.monotonic()
        after = _wait_for_settled_plan(swarm, spec, 4, TTL_S + 45)
        print(f"layers covered again {time.monotonic() - started:.1f} s after the kill: {_layers(after)}")
        assert all(r.peer_id not in swarm.dead_peers for r in after)


def test_a_started_nodes_server_enforces_the_kv_share_the_plan_gave_it(tiny_checkpoint):
    """Two nodes join in-process with 12 MB each: each server's KV budget is exactly what the plan's weights
    and head parts leave of the memory the node announced (swarm.costmodel.kv_share_bytes), in fp32 bytes."""
    source = resolve_model(str(tiny_checkpoint("llama", num_layers=6)))
    spec = model_spec(source)
    boot = open_dht([], ["/ip4/127.0.0.1/tcp/0"])

    async def scenario() -> None:
        # Unquantized: the test checks the fp32 arithmetic (a quantized node scales its announced memory).
        config = NodeConfig(initial_peers=boot.visible_maddrs, ttl_s=3.0, bench=False, max_memory_bytes=12_000_000,
                            quant="none")
        nodes = [Node(source, config), Node(source, config)]
        try:
            await asyncio.gather(*(node.start() for node in nodes))
            records = check_records(spec, await nodes[0].peer.list_servers(source.name, num_layers=6))
            planned = plan(spec, records)
            for node in nodes:
                layers = LayerRange(node.record.start, node.record.end)
                assert planned.range_of(node.record.peer_id) == layers
                assert len(layers) < spec.num_layers  # 12 MB hold at most 5 layers: the two share the model
                weights = len(layers) * spec.layer_bytes + spec.head_bytes / 2 * (
                    (layers.start == 0) + (layers.end == spec.num_layers))
                share_fp32 = int((node.record.memory_bytes - weights) * 4 / 2)  # planned at bf16, served in fp32
                assert node.record.memory_bytes == 6_000_000 and share_fp32 > 0
                # Less the rotary tables at the longest session this node accepts (they grow with sessions).
                rotary = node.server.stage.rotary.max_bytes(config.max_length)
                assert 0 < rotary < share_fp32 and node.server.budget.budget_bytes == share_fp32 - rotary
                assert share_fp32 == planned_kv_budget(spec, node.record.memory_bytes, layers, torch.float32)
                announced = next(r for r in records if r.peer_id == node.record.peer_id)
                assert announced.reachability == node.record.reachability == node.peer.reachability == "direct"
        finally:
            await asyncio.gather(*(node.stop() for node in nodes))

    try:
        asyncio.run(scenario())
    finally:
        boot.shutdown()


def test_the_plan_charges_chain_ends_for_what_a_ring_loads_there(tiny_checkpoint):
    """A ring's last stage holds the LM head (one vocab x hidden matrix): the plan charges each end half of
    embedding + LM head, which covers it (the first stage reads embedding rows from the mapped file)."""
    source = resolve_model(str(tiny_checkpoint("qwen2", num_layers=6)))
    spec = model_spec(source)
    last = Stage(source, 4, 6, dtype=torch.bfloat16, device=torch.device("cpu"))  # the planning dtype
    lm_head = last.head.lm_head.weight
    assert spec.head_bytes / 2 == lm_head.numel() * lm_head.element_size() > 0
    layers = sum(p.numel() * p.element_size() for p in last.layers.parameters())
    assert layers == 2 * spec.layer_bytes


def test_status_reports_nodes_coverage_and_the_plan():
    import json

    from node.app.cli import format_status, status_json
    from node.serve.assignment import swarm_status

    records = [joining(i) for i in range(4)]
    online = as_online(plan(SPEC, records), records)
    status = swarm_status(SPEC, [*online, joining(9)])
    assert status.min_replicas >= 1 and not status.uncovered_layers and status.epoch == online[0].epoch
    assert len(status.replicas_per_layer) == SPEC.num_layers and len(status.nodes) == 5
    newcomer = next(n for n in status.nodes if n.record.peer_id == "peer9")
    assert newcomer.serving is None and newcomer.planned is not None
    assert all(n.serving == LayerRange(n.record.start, n.record.end) for n in status.nodes if n is not newcomer)
    assert "replicas per layer" in format_status(status)

    shown = json.loads(json.dumps(status_json(status)))  # `layerhive status --json`: numbers, never "a:b"
    assert shown["replicas_per_layer"] == list(status.replicas_per_layer) and shown["min_replicas"] >= 1
    by_peer = {n["peer_id"]: n for n in shown["nodes"]}
    assert by_peer["peer9"]["range"] is None
    assert by_peer["peer9"]["planned"] == {"start": newcomer.planned.start, "end": newcomer.planned.end}
    for record in online:
        assert by_peer[record.peer_id]["range"] == {"start": record.start, "end": record.end}
        assert by_peer[record.peer_id]["layer_latency_s"] == record.layer_latency_s


def test_a_joined_node_announces_the_uplink_it_measured(tiny_checkpoint):
    """Nodes started together find no one to measure at first; each measures on its heartbeat once the other
    is there, announces it, and `layerhive status --json` shows it."""
    import json
    import subprocess
    import sys

    path = tiny_checkpoint("llama", num_layers=6)
    with LocalSwarm(str(path), num_nodes=2, join=True, threads_per_node=1, node_args=NODE_ARGS) as swarm:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            records = swarm.online_records()
            if len(records) == 2 and all(r.uplink_bps > 0 for r in records):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no measured uplink announced: {swarm.online_records()}; logs in {swarm.log_dir}")
        shown = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--model", str(path),
                                "--initial-peers", *swarm.initial_peers, "--json"],
                               capture_output=True, text=True, timeout=120, check=True)
        nodes = json.loads(shown.stdout)["nodes"]
        assert len(nodes) == 2 and all(n["uplink_bps"] > 1e6 for n in nodes), nodes  # loopback: far above 1 Mbit/s
        print("measured uplinks (Mbit/s):", [round(n["uplink_bps"] / 1e6) for n in nodes])


def test_status_leaves_proven_liars_out_of_the_plan_and_shows_checked_credit():
    from node.app.cli import format_status, status_json
    from node.net.credit import CheckedCredit
    from node.serve.assignment import swarm_status

    records = as_online(plan(SPEC, [joining(i) for i in range(4)]), [joining(i) for i in range(4)])
    status = swarm_status(SPEC, records, credit={"peer1": CheckedCredit(120, 2)}, liars=frozenset({"peer0"}))
    assert "peer0" not in {n.record.peer_id for n in status.nodes} and status.proven_liars == {"peer0"}
    text = format_status(status)
    assert "PROVEN LIARS, not used: peer0" in text and "120 (2 cl)" in text
    shown = {n["peer_id"]: n for n in status_json(status)["nodes"]}
    assert (shown["peer1"]["checked_tokens"], shown["peer1"]["checked_by"]) == (120, 2)
    assert (shown["peer2"]["checked_tokens"], shown["peer2"]["checked_by"]) == (0, 0)
