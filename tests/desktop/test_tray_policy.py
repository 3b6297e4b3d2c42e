"""The tray with a real node in a real local swarm: the run rules pause and resume it, the contributor's own
pause comes first, a pause asked while starting is remembered only once it took effect, and the tokens of the
user's own chats are told apart from those served to others."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop.bridge import NodeBridge  # noqa: E402
from desktop.contribution import LifetimeContribution  # noqa: E402
from desktop.policy import Decision  # noqa: E402
from desktop.settings import AppSettings  # noqa: E402
from desktop.swarm_choice import DEMO_LABEL  # noqa: E402
from desktop.tray import Tray  # noqa: E402
from node.app.controller import NodeController  # noqa: E402
from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.chat import ChatEngine, Message  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.serve.node import NodeConfig  # noqa: E402

pytestmark = pytest.mark.timeout(300)
NEVER_STOPS = SamplingParams(max_new_tokens=8, stop_token_ids=(-1,))  # exactly 8 tokens whatever is sampled


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def hive(tiny_checkpoint):
    """A swarm serving layers 2:4 of a tiny model; the app's node alone serves 0:2, so every chain runs through it."""
    app = QApplication.instance() or QApplication([])
    path = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(path, ranges=[(2, 4)], threads_per_node=1) as swarm:
        controller = NodeController(path, NodeConfig(start=0, end=2, initial_peers=swarm.initial_peers, bench=False,
                                                     ttl_s=6.0, max_memory_bytes=2_000_000_000))
        bridge = NodeBridge(controller, poll_ms=200)
        try:
            yield app, swarm, bridge
        finally:
            bridge.stop().result(timeout=60)


def make_tray(bridge: NodeBridge, tmp_path) -> Tray:
    settings = AppSettings(QSettings(str(tmp_path / "layerhive.conf"), QSettings.Format.IniFormat))
    return Tray(bridge, settings, open_chat=lambda: None, open_map=lambda: None, quit_app=lambda: None,
                open_settings=lambda: None, open_log=lambda: None, swarm_label=DEMO_LABEL,
                lifetime=LifetimeContribution(tmp_path / "contribution.json"))


def serving(tray: Tray) -> bool:
    return tray.doing_action.text().startswith("Serving layers 0–1")


def test_the_run_rules_pause_and_resume_the_node_and_the_contributor_comes_first(hive, tmp_path):
    _, _, bridge = hive
    tray = make_tray(bridge, tmp_path)
    assert [a.text() for a in tray.menu.actions() if a.text() in ("Settings…", "Open log")] == ["Settings…",
                                                                                                "Open log"]
    tray.apply_policy(Decision(False, "on battery power"))
    tray.start()  # the rules hold the node at launch: it does not start
    assert bridge.status().state == "stopped" and tray.doing_action.text() == "Paused: on battery power"
    tray.apply_policy(Decision(True))
    wait_until(lambda: serving(tray), 90, "the node serving once the rules allow")
    assert tray.swarm_action.text() == "Offering 2.0 GB · Demo swarm (this computer only)"  # 2 GB, not 1.0 GB
    assert tray.lifetime_action.text().startswith("Lifetime: ")

    tray.apply_policy(Decision(False, "the computer is in use"))
    wait_until(lambda: tray.doing_action.text() == "Paused: the computer is in use", 90, "the rules' pause")
    assert not tray.settings.paused  # the rules' pause is not the contributor's: the next launch runs
    tray.toggle()  # the contributor resumes against the rules ...
    wait_until(lambda: serving(tray), 90, "the node back")
    tray.apply_policy(Decision(False, "the computer is in use"))  # ... which wait until they allow it again
    assert bridge.status().state == "online"
    tray.apply_policy(Decision(True))
    tray.apply_policy(Decision(False, "outside the schedule (22:00–07:00)"))
    wait_until(lambda: tray.doing_action.text().startswith("Paused: outside the schedule"), 90, "the schedule")

    tray.apply_policy(Decision(True))
    wait_until(lambda: serving(tray), 90, "the node back")
    tray.toggle()  # the contributor pauses: the rules never resume what the contributor paused
    wait_until(lambda: tray.doing_action.text() == "Paused", 90, "the contributor's pause")
    tray.apply_policy(Decision(True))
    assert bridge.status().state == "paused" and tray.settings.paused
    tray.toggle()
    wait_until(lambda: serving(tray), 90, "the node back")


def test_a_pause_asked_while_starting_is_remembered_once_it_took_effect(hive, tmp_path):
    _, _, bridge = hive
    bridge.pause().result(timeout=90)
    bridge.controller.stop().result(timeout=60)  # a fresh launch: a new controller, stopped
    bridge.controller = NodeController(bridge.controller.source, bridge.controller.config)
    bridge.controller.on_state_change(lambda _state, status: bridge.status_changed.emit(status))
    tray = make_tray(bridge, tmp_path)
    bridge.start()
    wait_until(lambda: bridge.status().state == "starting", 30, "the node starting")
    tray.toggle()
    assert not tray.settings.paused  # not yet: were the app quit now, the next launch would run
    wait_until(lambda: bridge.status().state == "paused", 90, "the pause")
    QApplication.processEvents()
    wait_until(lambda: tray.settings.paused, 10, "the pause remembered")
    tray.toggle()
    wait_until(lambda: serving(tray), 90, "the node back")


def test_own_chats_are_counted_apart_from_tokens_served_to_others(hive, tmp_path):
    _, swarm, bridge = hive
    if bridge.status().state != "online":
        bridge.resume().result(timeout=90)
    before = bridge.status()
    answer = bridge.chat([Message("user", "hello")], NEVER_STOPS)  # the app's own chat, through its node
    answer.result(timeout=120)
    mine = bridge.status()
    assert mine.own_tokens_served > before.own_tokens_served
    assert mine.tokens_for_others == before.tokens_for_others  # nothing for others yet

    async def someone_else() -> None:  # another peer's chat through the same node
        async with connect(swarm.initial_peers, swarm.source) as client:
            async for _ in ChatEngine(client, swarm.source).stream_chat([Message("user", "hi")], NEVER_STOPS):
                pass

    asyncio.run(someone_else())
    theirs = bridge.status()
    assert theirs.tokens_for_others > mine.tokens_for_others and theirs.own_tokens_served == mine.own_tokens_served
    lifetime = LifetimeContribution(tmp_path / "totals.json")
    lifetime.add(before)
    totals = lifetime.add(theirs)
    assert totals.tokens_for_others == theirs.tokens_for_others - before.tokens_for_others
    assert totals.tokens_for_own_chats == theirs.own_tokens_served - before.own_tokens_served
