"""The hostile-peer suite: real node processes attacked by real hostile processes (`tests.node.hostile_peers`).

Every attack gets a bound, a check before work, and here a test that the bound holds while honest users are
still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from node.app.local_swarm import LocalSwarm
from node.client.routing import believed, plan_chains
from node.client.session import connect
from node.model.checkpoint import resolve_model
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

pytestmark = pytest.mark.timeout(600)


class Hostile:
    """A hostile process (`python -m tests.node.hostile_peers ATTACK ...`), started and waited for `ready`."""

    def __init__(self, attack: str, initial_peers: list[str], model: str, *args: str, ready_timeout_s: float = 180
                 ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.node.hostile_peers", attack, "--initial-peers", *initial_peers,
             "--model", model, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HIVEMIND_LOGLEVEL": "ERROR"})
        self.lines: list[str] = []
        deadline = time.monotonic() + ready_timeout_s
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("ready"):
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise AssertionError(f"the hostile process {attack} did not start:\n" + "\n".join(self.lines[-30:]))

    def value(self, prefix: str) -> str:
        return next(line.removeprefix(prefix).strip() for line in self.lines if line.startswith(prefix))

    def result(self, timeout_s: float = 120) -> dict:
        """Waits for the attack to end (its --duration) and returns what it reported."""
        out, _ = self.process.communicate(timeout=timeout_s)
        self.lines += out.splitlines()
        return json.loads(self.value("result "))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def hostile(*args, **kwargs) -> Iterator[Hostile]:
    process = Hostile(*args, **kwargs)
    try:
        yield process
    finally:
        process.stop()


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


def test_a_record_claiming_absurd_speed_does_not_take_the_chains(tiny_checkpoint, tmp_path):
    """Two honest nodes serve 0:2 and 2:4; a hostile process serves 0:2 too, 50 ms a step, while its record claims
    0.1 us a layer, 50 TB and the largest epoch. Taken at its word it would carry every chain; the client measures
    it and routes around it. A node joining afterwards still gets layers and goes online."""
    model = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(model, [(0, 2), (2, 4)], threads_per_node=1, log_dir=str(tmp_path)) as swarm, \
            hostile("lying-record", swarm.initial_peers, model, "--layers", "0:2", "--slowdown-ms", "50",
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
