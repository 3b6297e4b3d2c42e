"""The tray app's widgets driving a real node in a real local swarm (Qt offscreen, hivemind on loopback)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from datetime import datetime, timedelta

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt starts: no display needed

from PySide6.QtCore import Qt, QTimer  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop.app import while_showing  # noqa: E402
from desktop.bridge import NodeBridge  # noqa: E402
from desktop.chat_window import ChatWindow  # noqa: E402
from desktop.swarm_map import SwarmMapView, SwarmMapWindow, describe_node, pack_rows  # noqa: E402
from desktop.tray import Tray  # noqa: E402
from node.app.controller import NodeController  # noqa: E402
from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.chat import ChatEngine, Message  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.checkpoint import resolve_model  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.serve.node import NodeConfig  # noqa: E402
from tests.desktop.qt_helpers import settings_in, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_new_tokens=12)
QUESTION = "hello what is the capital of paris"




@pytest.fixture(scope="module")
def app():
    yield QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def hive(tiny_checkpoint, app):
    """A local swarm of a tiny model, and the app's own node serving layers 0:2 of it."""
    path = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(path, ranges=[(0, 2), (2, 4)], threads_per_node=1) as swarm:
        controller = NodeController(path, NodeConfig(start=0, end=2, initial_peers=swarm.initial_peers,
                                                     bench=False, ttl_s=6.0))
        bridge = NodeBridge(controller, poll_ms=200)
        try:
            yield swarm, bridge
        finally:
            bridge.stop().result(timeout=60)


def headless_answer(swarm: LocalSwarm, messages: list[Message], params: SamplingParams) -> str:
    async def run() -> str:
        source = resolve_model(swarm.source.name)
        async with connect(swarm.initial_peers, source) as client:
            return "".join([piece async for piece in ChatEngine(client, source).stream_chat(messages, params)])

    return asyncio.run(run())




def test_tray_shows_what_the_node_serves_and_pauses_and_resumes_it(hive, tmp_path):
    _, bridge = hive
    opened = []
    settings = settings_in(tmp_path)
    tray = Tray(bridge, settings, open_chat=lambda: opened.append("chat"), open_map=lambda: opened.append("map"),
                quit_app=lambda: None, snoozes=[("for 10 seconds", 10.0)])  # longer than a drain under load
    assert tray.doing_action.text() == "Not started" and tray.toggle_action.text() == "Resume contributing"
    tray.toggle_action.trigger()  # a stopped node starts
    wait_until(lambda: tray.doing_action.text().startswith("Serving layers 0–1"), 90, "the node online")
    assert tray.toggle_action.text() == "Pause contributing"
    assert tray.contributed_action.text().startswith("Contributed 0 tokens")

    tray.toggle_action.trigger()  # pause: a graceful drain, then the node withdraws
    wait_until(lambda: tray.doing_action.text() == "Paused", 90, "the node paused")
    assert tray.toggle_action.text() == "Resume contributing" and bridge.status().layers is None
    assert settings.paused  # remembered for the next launch

    tray.toggle_action.trigger()
    wait_until(lambda: tray.doing_action.text().startswith("Serving layers 0–1"), 90, "the node online again")
    assert not settings.paused

    tray.snooze_menu.actions()[0].trigger()  # pauses, then resumes by itself
    wait_until(lambda: tray.doing_action.text().startswith("Snoozed until"), 90, "the node snoozing")
    assert tray.toggle_action.text() == "Resume contributing" and not tray.snooze_menu.isEnabled()
    assert tray.snoozed_until is not None and settings_in(tmp_path).snoozed_until == tray.snoozed_until  # on disk
    wait_until(lambda: tray.doing_action.text().startswith("Serving layers 0–1"), 90, "the snooze over")
    assert settings.snoozed_until is None

    assert tray.memory_menu.actions()[0].isChecked()  # "No cap"
    assert bridge.controller.node.record.memory_bytes > 2e9
    two_gb = next(a for a in tray.memory_menu.actions() if a.text() == "At most 2 GB")
    two_gb.trigger()  # the node drains and rejoins, offering at most 2 GB
    assert two_gb.isChecked() and settings.memory_cap_bytes == 2_000_000_000
    wait_until(lambda: bridge.controller.node.record.memory_bytes <= 2e9
               and tray.doing_action.text().startswith("Serving layers 0–1"), 90, "the node back with the cap")

    next(a for a in tray.menu.actions() if a.text() == "Open chat").trigger()
    next(a for a in tray.menu.actions() if a.text() == "Swarm map").trigger()
    assert opened == ["chat", "map"]


def test_chat_window_streams_the_swarms_answer(hive, tmp_path):
    swarm, bridge = hive
    if bridge.status().state != "online":
        bridge.start().result(timeout=90)
    window = ChatWindow(bridge, sampling=GREEDY)
    window.show()
    pieces: list[str] = []
    bridge.chat_text.connect(pieces.append)
    window.prompt.setText(QUESTION)
    QTest.mouseClick(window.send_button, Qt.MouseButton.LeftButton)
    assert window.busy and not window.send_button.isEnabled() and window.prompt.text() == ""
    wait_until(lambda: not window.busy, 60, "the answer")

    expected = headless_answer(swarm, [Message("user", QUESTION)], GREEDY)
    assert expected and window.messages == [Message("user", QUESTION), Message("assistant", expected)]
    assert "".join(pieces) == expected and len(pieces) > 1  # streamed piece by piece, not all at the end
    assert window.transcript.toPlainText().endswith(expected)
    assert window.send_button.isEnabled() and window.status_line.text() == ""
    window.grab().save(str(tmp_path / "chat.png"))
    window.close()


def test_stop_ends_the_answer_and_forgets_the_question(hive):
    _, bridge = hive
    if bridge.status().state != "online":
        bridge.start().result(timeout=90)
    never_stops = SamplingParams(max_new_tokens=200, stop_token_ids=(-1,))  # no token ends it early
    window = ChatWindow(bridge, sampling=never_stops)
    pieces: list[str] = []
    bridge.chat_text.connect(lambda piece: (pieces.append(piece), window.stop() if len(pieces) == 2 else None))
    window.prompt.setText(QUESTION)
    window.send()
    wait_until(lambda: not window.busy, 60, "the stop")
    assert window.transcript.toPlainText().endswith("(stopped)")
    assert window.messages == [] and window.send_button.isEnabled()
    assert 2 <= len(pieces) < 200


def test_swarm_map_shows_every_node_over_its_layers_and_the_replicas(hive, tmp_path):
    swarm, bridge = hive
    if bridge.status().state != "online":
        bridge.start().result(timeout=90)
    window = SwarmMapWindow(bridge, refresh_ms=500)
    window.show()
    own = bridge.status().peer_id
    # The app's node serves 0:2 beside the local swarm's 0:2 and 2:4: two rows, 0:2 twice over.
    wait_until(lambda: window.view.status is not None and len(window.view.status.get("nodes", [])) == 3, 60,
               "the three nodes on the map")
    status = window.view.status
    assert status["replicas_per_layer"] == [2, 2, 1, 1] and status["uncovered_layers"] == []
    assert sorted(len(row) for row in window.view.rows) == [1, 2]
    assert "3 nodes, 4 layers, 1–2 replicas per layer" in window.summary.text()
    QApplication.processEvents()
    window.repaint()  # paints, recording where each bar went
    mine = next(rect for rect, node in window.view._bars if node["peer_id"] == own)
    node = window.view.node_at(mine.center().toPoint())
    assert node["peer_id"] == own and describe_node(node, True).startswith(f"This node {own}\nonline, layers 0–2")
    window.grab().save(str(tmp_path / "swarm_map.png"))

    bridge.pause().result(timeout=90)  # the paused node leaves the map at the next read
    wait_until(lambda: len(window.view.status.get("nodes", [])) == 2, 60, "the paused node gone from the map")
    assert window.view.status["replicas_per_layer"] == [1, 1, 1, 1]
    bridge.resume().result(timeout=90)
    window.close()


def test_rows_of_the_map_never_overlap():
    nodes = [{"range": r} for r in ("0:10", "5:15", "10:20", "0:20", "15:30", None)]
    rows = pack_rows(nodes)
    assert sum(len(row) for row in rows) == 5 and len(rows) == 3
    for row in rows:
        spans = [tuple(map(int, n["range"].split(":"))) for n in row]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_a_new_launch_keeps_the_snooze_the_pause_and_the_memory_cap(hive, tmp_path):
    swarm, _ = hive
    settings = settings_in(tmp_path)
    settings.memory_cap_bytes = 2_000_000_000
    settings.snoozed_until = datetime.now() + timedelta(seconds=3)
    settings.paused = False
    controller = NodeController(swarm.source.name, NodeConfig(start=0, end=2, initial_peers=swarm.initial_peers,
                                                              bench=False, max_memory_bytes=settings.memory_cap_bytes))
    bridge = NodeBridge(controller, poll_ms=200)
    try:
        tray = Tray(bridge, settings, open_chat=lambda: None, open_map=lambda: None, quit_app=lambda: None)
        tray.start()  # what the app does at launch: the snooze still runs, so the node waits
        assert tray.doing_action.text().startswith("Snoozed until") and bridge.status().state == "stopped"
        wait_until(lambda: tray.doing_action.text().startswith("Serving layers 0–1"), 90, "the snooze over")
        assert controller.node.record.memory_bytes <= 2e9 and settings.snoozed_until is None

        tray.toggle_action.trigger()  # paused by the contributor ...
        wait_until(lambda: bridge.status().state == "paused", 90, "the node paused")
        relaunched = Tray(bridge, settings_in(tmp_path), open_chat=lambda: None, open_map=lambda: None,
                          quit_app=lambda: None)
        relaunched.start()  # ... stays paused at the next launch
        QApplication.processEvents()
        assert relaunched.doing_action.text() == "Paused" and bridge.status().state == "paused"
    finally:
        bridge.stop().result(timeout=60)


def test_slow_start_up_work_runs_while_the_ui_stays_live(app):
    fired: list[float] = []
    QTimer.singleShot(50, lambda: fired.append(time.monotonic()))  # must fire during the work, not after
    started = time.monotonic()
    assert while_showing("Starting…", lambda: time.sleep(0.5) or 42) == 42
    assert fired and fired[0] - started < 0.4
    with pytest.raises(RuntimeError, match="no swarm"):
        while_showing("Starting…", lambda: (_ for _ in ()).throw(RuntimeError("no swarm")))


def test_the_map_says_why_it_shows_no_bars(app):
    view = SwarmMapView()
    assert view.message() == "Not connected to the swarm yet."
    view.set_status({"error": "TimeoutError: no DHT answer"})
    assert view.message() == "Could not read the swarm: TimeoutError: no DHT answer" and view.rows == []
    view.set_status({"model": "m", "num_layers": 4, "nodes": [{"peer_id": "Qm1", "range": None, "state": "joining"}],
                     "replicas_per_layer": [0] * 4})
    assert view.message() == "No node serves this model yet."
    view.grab()  # paints the message without bars
