"""The node controller the tray app drives: start (join), pause with a session in flight, resume, status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from node.app.controller import NodeController
from node.app.local_swarm import LocalSwarm
from node.client.failover import ResilientSession
from node.client.generate import generate
from node.client.session import connect
from node.model.checkpoint import resolve_model
from node.model.head import ClientHead
from node.model.sampling import SamplingParams
from node.serve.node import NodeConfig

pytestmark = pytest.mark.timeout(300)

TTL_S = 6.0
MEMORY = 12_000_000  # fp32 bytes: room for at most 5 of the 6 layers, so the two nodes must share the model
NODE_ARGS = ["--quick-measure", "--max-memory-gb", str(MEMORY / 1e9), "--ttl", str(TTL_S)]
NEW_TOKENS = 20


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


async def _generate(swarm: LocalSwarm, prompt_ids: list[int], on_token=None) -> tuple[list[int], list]:
    source = swarm.source
    async with connect(swarm.initial_peers, source) as client:
        session = ResilientSession(client, max_length=len(prompt_ids) + NEW_TOKENS, step_timeout_s=30)
        await session.open()
        tokens: list[int] = []
        try:
            async for token in generate(session, ClientHead(source), prompt_ids, SamplingParams(NEW_TOKENS)):
                tokens.append(token)
                if on_token is not None:
                    on_token(len(tokens), [hop.node_id for hop in session.session.chain])
                await asyncio.sleep(0.2)  # a slow reader keeps the session open while the node drains
        finally:
            await session.close()
        return tokens, session.events


def test_pause_drains_a_session_in_flight_then_resume_rejoins(tiny_checkpoint):
    path = str(tiny_checkpoint("llama", num_layers=6))
    source = resolve_model(path)
    prompt_ids = list(range(5, 25))
    swarm = LocalSwarm(path, num_nodes=1, join=True, threads_per_node=1, node_args=NODE_ARGS)
    starter = threading.Thread(target=swarm.start, kwargs={"timeout_s": 90})
    starter.start()
    controller = None
    try:
        _wait(lambda: swarm.bootstrap is not None, 30, "bootstrap peer")
        controller = NodeController(source, NodeConfig(initial_peers=swarm.initial_peers, ttl_s=TTL_S, bench=False,
                                                       max_memory_bytes=MEMORY))
        states: list[str] = []
        controller.on_state_change(lambda state, status: states.append(state))
        assert controller.status().state == "stopped"
        controller.start().result(timeout=90)
        starter.join()
        status = controller.status()
        assert status.state == "online" and status.layers is not None and status.peer_id

        reference, events = asyncio.run(_generate(swarm, prompt_ids))
        assert len(reference) == NEW_TOKENS and not events
        served = controller.status().tokens_served
        assert served > 0 and controller.status().sessions_opened >= 1

        pausing = []

        def pause_midway(count: int, chain: list[str]) -> None:
            if count == 5:
                assert status.peer_id in chain  # the session runs through the node we pause
                pausing.append(controller.pause(deadline_s=60))  # returns at once: a UI thread never blocks

        tokens, events = asyncio.run(_generate(swarm, prompt_ids, pause_midway))
        assert tokens == reference and not events  # the session in flight finished where it was, no failover
        pausing[0].result(timeout=60)
        paused = controller.status()
        assert paused.state == "paused" and paused.layers is None and paused.sessions == 0
        assert paused.tokens_served > served
        assert "draining" in states and states[-1] == "paused"
        record = next(r for r in swarm.online_records() + _all_records(swarm) if r.peer_id == status.peer_id)
        assert record.state == "offline"

        controller.resume().result(timeout=90)
        resumed = controller.status()
        assert resumed.state == "online" and resumed.layers is not None
        assert states[-2:] == ["joining", "online"]
        swarm.wait_until_covered(60)
        again, events = asyncio.run(_generate(swarm, prompt_ids))
        assert again == reference

        # `layerhive status` sees both nodes online and every layer covered; it finds the swarm through the
        # user's configuration (here the environment), as every command does without --initial-peers.
        env = {**os.environ, "LAYERHIVE_INITIAL_PEERS": ",".join(swarm.initial_peers)}
        shown = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--json", "--model", path],
                               capture_output=True, text=True, timeout=60, env=env)
        assert shown.returncode == 0, shown.stderr
        status_json = json.loads(shown.stdout)
        assert status_json["min_replicas"] >= 1 and not status_json["uncovered_layers"]
        assert resumed.peer_id in {n["peer_id"] for n in status_json["nodes"] if n["state"] == "online"}
    finally:
        if controller is not None:
            controller.stop().result(timeout=30)
            assert controller.status().state == "stopped"
        starter.join()
        swarm.stop()


def _all_records(swarm: LocalSwarm):
    return swarm.bootstrap.list_servers_blocking(swarm.source.name, num_layers=swarm.source.num_layers)
