"""The tray app's widgets driving a real node in a real local swarm (Qt offscreen, hivemind on loopback).
The chat window and the swarm map have their own tests (test_chat_and_map.py); fixtures in conftest.py."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication

from desktop.app import while_showing
from desktop.bridge import NodeBridge
from desktop.settings import AppSettings
from desktop.tray import Tray
from node.app.controller import NodeController
from node.serve.node import NodeConfig
from tests.desktop.helpers import wait_until

pytestmark = pytest.mark.timeout(300)


def settings_in(tmp_path) -> AppSettings:
    return AppSettings(QSettings(str(tmp_path / "layerhive.conf"), QSettings.Format.IniFormat))


def test_tray_shows_what_the_node_serves_and_pauses_and_resumes_it(hive, tmp_path):
    _, bridge = hive
    opened = []
    settings = settings_in(tmp_path)
    tray = Tray(bridge, settings, open_chat=lambda: opened.append("chat"), open_map=lambda: opened.append("map"),
                quit_app=lambda: None, snoozes=[("for 2 seconds", 2.0)])
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
