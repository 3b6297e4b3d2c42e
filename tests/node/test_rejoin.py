"""Resume always comes back: a node that re-joined before, then paused for longer than its record lives,
resumes and serves again (issue 18: it used to announce an epoch below one its own filter had seen from
itself, and stayed "joining" for ever)."""

from __future__ import annotations

import time

import pytest

from node.app.controller import NodeController
from node.app.local_swarm import LocalSwarm
from node.model.checkpoint import resolve_model
from node.serve.epochs import OwnEpoch
from node.serve.node import NodeConfig

pytestmark = pytest.mark.timeout(420)

TTL_S = 6.0
MEMORY = 12_000_000  # fp32 bytes: room for at most 5 of the 6 layers
NODE_ARGS = ["--ttl", str(TTL_S)]


def _online(controller: NodeController) -> bool:
    status = controller.status()
    return status.state == "online" and status.layers is not None


def test_resume_after_a_rejoin_and_a_pause_longer_than_the_ttl(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path))  # the node's remembered epoch lives here
    path = str(tiny_checkpoint("llama", num_layers=6))
    # Fixed-range nodes, as in the app's demo swarm: their records keep the epoch they started with (0),
    # so once the node's own record expires nothing in the swarm remembers the epochs it reached.
    swarm = LocalSwarm(path, ranges=[(0, 3), (3, 6)], threads_per_node=1, node_args=NODE_ARGS)
    controller = None
    try:
        swarm.start(timeout_s=120)
        config = NodeConfig(initial_peers=swarm.initial_peers, ttl_s=TTL_S, bench=False, max_memory_bytes=MEMORY,
                            identity="rejoin-test")
        controller = NodeController(resolve_model(path), config)
        controller.start().result(timeout=120)
        first = controller.status()
        assert _online(controller)

        # A memory cap change drains and re-joins: the node's epoch moves on.
        controller.set_memory_cap(MEMORY - 1_000_000).result(timeout=120)
        rejoined = controller.status()
        assert _online(controller) and rejoined.epoch >= first.epoch
        seen = controller.node.tracker.newest.get(rejoined.peer_id, rejoined.epoch)

        controller.pause().result(timeout=90)
        assert controller.status().state == "paused"
        time.sleep(2.5 * TTL_S)  # the node's offline record expires: the swarm forgets its last epoch

        controller.resume().result(timeout=150)  # used to stay "joining" here for ever
        resumed = controller.status()
        assert _online(controller) and resumed.peer_id == rejoined.peer_id
        assert resumed.epoch >= seen  # one's own epochs never go backwards
        swarm.wait_until_covered(90)

        # And across a restart of the app, once the swarm forgot it: the same identity (the same peer id)
        # announces no lower epoch than it did, or peers that remember the old one would ignore it.
        controller.stop().result(timeout=60)
        time.sleep(2.5 * TTL_S)
        controller = NodeController(resolve_model(path), config)
        controller.start().result(timeout=150)
        restarted = controller.status()
        assert _online(controller) and restarted.peer_id == resumed.peer_id and restarted.epoch >= resumed.epoch
    finally:
        if controller is not None:
            controller.stop().result(timeout=60)
        swarm.stop()


def test_the_newest_epoch_survives_a_restart_and_a_damaged_file(tmp_path):
    path = tmp_path / "identity" / "desktop.epoch"
    epoch = OwnEpoch(path)
    assert epoch.newest == 0 and not path.exists()
    epoch.note(3)
    epoch.note(2)  # never backwards
    assert epoch.newest == 3 and OwnEpoch(path).newest == 3
    path.write_text("{not json")
    assert OwnEpoch(path).newest == 0  # unreadable: the swarm's epoch still applies, the node still starts
    path.write_text('{"newest_epoch": -5}')
    assert OwnEpoch(path).newest == 0
    assert OwnEpoch(None).newest == 0  # an ephemeral identity keeps nothing


def test_pause_while_joining_withdraws_at_once(tiny_checkpoint):
    """A Pause clicked during a long join gives the join up: the node never goes online before pausing."""
    path = str(tiny_checkpoint("llama", num_layers=6))
    with LocalSwarm(path, ranges=[(0, 6)], threads_per_node=1, node_args=NODE_ARGS) as swarm:
        # The join waits for the swarm to settle over 15 heartbeat periods (30 s): far longer than a pause.
        config = NodeConfig(initial_peers=swarm.initial_peers, ttl_s=TTL_S, bench=False, settle_periods=15)
        controller = NodeController(resolve_model(path), config)
        states: list[str] = []
        controller.on_state_change(lambda state, status: states.append(state))
        try:
            starting = controller.start()
            deadline = time.monotonic() + 60
            while controller.status().state != "joining" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert controller.status().state == "joining"
            controller.pause().result(timeout=60)
            assert starting.cancelled() and controller.status().state == "paused"
            assert "online" not in states and states[-1] == "paused"
            own = controller.status().peer_id
            records = swarm.bootstrap.list_servers_blocking(swarm.source.name, num_layers=6)
            assert [r.state for r in records if r.peer_id == own] == ["offline"]  # withdrawn: planned no more
            controller.resume().result(timeout=150)  # and it can still join later
            assert _online(controller)
        finally:
            controller.stop().result(timeout=60)
