"""What the app keeps and checks around the node: settings, invitations, lifetime totals, the login item,
memory caps from the machine's totals, one instance per user, the log."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time as clock
from datetime import time

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop import login_item, logs  # noqa: E402
from desktop.contribution import LifetimeContribution, describe  # noqa: E402
from desktop.instance import SingleInstance  # noqa: E402
from desktop.machine import GB, Memory, memory, memory_caps_gb  # noqa: E402
from desktop.settings import AppSettings  # noqa: E402
from desktop.swarm_choice import DEMO_LABEL, InviteError, SwarmChoice, invite_link, parse_invite  # noqa: E402
from desktop.widgets import MemoryPicker  # noqa: E402
from node.app.controller import NodeStatus  # noqa: E402

PEER = "/ip4/127.0.0.1/tcp/41657/p2p/QmfY3kWkKgmTMmxq2ZThRUDuUDukYuXqh3m6rRAdpKaex9"
OTHER = "/dns4/boot.example.org/tcp/31337/p2p/QmfY3kWkKgmTMmxq2ZThRUDuUDukYuXqh3m6rRAdpKaex8"


@pytest.fixture(scope="module")
def app():
    yield QApplication.instance() or QApplication([])


def settings_in(tmp_path) -> AppSettings:
    return AppSettings(QSettings(str(tmp_path / "layerhive.conf"), QSettings.Format.IniFormat))


def test_every_setting_survives_a_relaunch_and_a_broken_file_falls_back(tmp_path):
    settings = settings_in(tmp_path)
    assert not settings.first_run_done and settings.swarm == SwarmChoice("demo") and settings.pause_on_battery
    settings.swarm = SwarmChoice("invite", (PEER, OTHER))
    settings.memory_cap_bytes, settings.threads, settings.device = 3_000_000_000, 1, "cpu"
    settings.only_when_idle, settings.idle_minutes, settings.pause_on_battery = True, 12, False
    settings.max_gpu_temp_c, settings.schedule = 83, (time(22, 30), time(6, 0))
    settings.first_run_done = True
    again = settings_in(tmp_path)  # a new launch reads the file
    assert again.swarm == SwarmChoice("invite", (PEER, OTHER)) and again.first_run_done
    assert (again.memory_cap_bytes, again.threads, again.device) == (3_000_000_000, 1, "cpu")
    policy = again.policy()
    assert policy.only_when_idle and policy.idle_after_s == 720 and not policy.pause_on_battery
    assert policy.max_gpu_temp_c == 83 and policy.schedule == (time(22, 30), time(6, 0))

    text = (tmp_path / "layerhive.conf").read_text()
    for key, garbage in (("threads", "many"), ("schedule_start", "25:99"), ("kind", "moon"), ("idle_minutes", "-3")):
        text = "\n".join(f"{line.split('=')[0]}={garbage}" if line.split("=")[0].endswith(key) else line
                         for line in text.splitlines())
    (tmp_path / "layerhive.conf").write_text(text)
    broken = settings_in(tmp_path)  # a hand-edited file: defaults for what it broke, the rest kept
    assert broken.threads is None and broken.schedule is None and broken.swarm == SwarmChoice("demo")
    assert broken.idle_minutes == 5 and broken.memory_cap_bytes == 3_000_000_000


def test_invite_links_and_pasted_peers_are_read_strictly():
    assert parse_invite(invite_link([PEER, OTHER])) == (PEER, OTHER)
    assert parse_invite(f"layerhive://join?peers={PEER.replace('/', '%2F')}") == (PEER,)  # url-encoded
    assert parse_invite(f"  {PEER}\n{OTHER}, {PEER} ") == (PEER, OTHER)  # pasted, duplicates dropped
    bad = {
        "": "paste an invite link",
        "layerhive://join": "names no peers",
        f"layerhive://steal?peers={PEER}": "looks like layerhive://join",
        "/ip4/1.2.3.4/tcp/1": "does not name the peer",
        "/ip4/999.1.1.1/tcp/1/p2p/QmfY3kWkKgmTMmxq2ZThRUDuUDukYuXqh3m6rRAdpKaex9": "not a valid peer address",
        "http://example.org": "not a multiaddr",
        "x" * 5000: "longer than 4096",
        " ".join(f"/ip4/10.0.0.{i}/tcp/1/p2p/QmfY3kWkKgmTMmxq2ZThRUDuUDukYuXqh3m6rRAdpKaex9" for i in range(17)):
            "at most 16",
    }
    for text, reason in bad.items():
        with pytest.raises(InviteError, match=reason):
            parse_invite(text)


def test_the_demo_swarm_is_named_as_such():
    assert SwarmChoice("demo").label == DEMO_LABEL == "Demo swarm (this computer only)"
    assert SwarmChoice("invite", (PEER,)).label == "Invited swarm (1 peer)"
    assert SwarmChoice("demo").initial_peers() == [] and SwarmChoice("invite", (PEER,)).initial_peers() == [PEER]


def test_the_public_swarm_needs_configured_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path))
    monkeypatch.delenv("LAYERHIVE_INITIAL_PEERS", raising=False)
    with pytest.raises(InviteError, match="no public swarm is configured"):
        SwarmChoice("public").initial_peers()
    monkeypatch.setenv("LAYERHIVE_INITIAL_PEERS", PEER)
    assert SwarmChoice("public").initial_peers() == [PEER]


def _status(tokens: int, own: int, sessions: int, online_s: float) -> NodeStatus:
    return NodeStatus(state="online", peer_id="Qm", layers=(0, 2), epoch=1, sessions=0, draining_layers=(),
                      tokens_served=tokens, steps_served=tokens, sessions_opened=sessions, online_s=online_s,
                      own_tokens_served=own)


def test_lifetime_totals_add_up_across_launches_and_keep_own_chats_apart(tmp_path):
    path = tmp_path / "contribution.json"
    first = LifetimeContribution(path)
    first.add(_status(0, 0, 0, 0.0))
    first.add(_status(100, 30, 2, 60.0))
    totals = first.add(_status(150, 30, 3, 90.0))
    assert (totals.tokens_for_others, totals.tokens_for_own_chats, totals.sessions_opened) == (120, 30, 3)
    assert totals.online_s == 90.0 and totals.since and totals.checked_tokens is None
    first.save()
    second = LifetimeContribution(path)  # the next launch: the node's counters start from zero again
    totals = second.add(_status(40, 0, 1, 30.0))
    assert (totals.tokens_for_others, totals.tokens_for_own_chats, totals.online_s) == (160, 30, 120.0)
    assert describe(totals) == "Lifetime: 160 tokens for others · 0.0 h online (+30 for your own chats)"
    path.write_text('{"tokens_for_others": "lots", "online_s": -5, "sessions_opened": 7}')
    assert LifetimeContribution(path).totals.tokens_for_others == 0  # a broken file keeps what is well-formed
    assert LifetimeContribution(path).totals.sessions_opened == 7


def test_memory_caps_never_exceed_the_machine(app):
    assert max(memory_caps_gb(int(23.4 * GB))) == 16  # not 32 on a 23 GB machine (issue 18)
    assert max(memory_caps_gb(int(64 * GB))) == 48 and memory_caps_gb(int(2 * GB)) == [1]
    here = memory()
    assert all(gb * GB < here.total_bytes for gb in memory_caps_gb(here.total_bytes))
    machine = Memory("cpu", total_bytes=int(23.4 * GB), free_bytes=int(15 * GB), usable_bytes=int(10.7 * GB))
    picker = MemoryPicker(machine, cap_bytes=None)
    assert picker.cap_bytes() is None and "10.7 GB now" in picker.no_cap.text()
    picker.no_cap.setChecked(False)
    picker.slider.setValue(picker.slider.maximum())
    assert picker.cap_bytes() <= machine.total_bytes - 1.5 * GB and picker.value_label.text() == "At most 21.5 GB"
    picker.slider.setValue(4)
    assert picker.cap_bytes() == 2_000_000_000 and picker.value_label.text() == "At most 2.0 GB"


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG autostart entry is the Linux login item")
def test_start_at_login_writes_and_removes_the_autostart_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert not login_item.is_enabled()
    login_item.set_enabled(True)
    entry = (tmp_path / "autostart" / "layerhive.desktop").read_text()
    assert login_item.is_enabled() and "Exec=" in entry and "X-GNOME-Autostart-enabled=true" in entry
    command = entry.split("Exec=", 1)[1].splitlines()[0]
    assert "desktop.app" in command or command.endswith("layerhive-app")
    login_item.set_enabled(False)
    assert not login_item.is_enabled() and not (tmp_path / "autostart" / "layerhive.desktop").exists()
    assert b"<string>org.layerhive.app</string>" in login_item.launch_agent(["/x/layerhive-app"])  # macOS form


def test_a_second_instance_asks_the_first_to_show_itself(app, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path))
    first, second = SingleInstance(), SingleInstance()
    shown = []
    first.activated.connect(lambda: shown.append(True))
    try:
        assert first.acquire()
        assert not second.acquire()  # says "show" to the first and gives up
        for _ in range(100):
            QApplication.processEvents()
            if shown:
                break
            clock.sleep(0.02)
        assert shown
    finally:
        first.release()
    third = SingleInstance()
    assert third.acquire()  # once the first is gone, a new launch runs
    third.release()


def test_the_log_rotates_and_catches_uncaught_errors(tmp_path):
    hooks, handlers = (sys.excepthook, threading.excepthook), list(logging.getLogger().handlers)
    path = logs.setup_logging(tmp_path / "logs" / "app.log")
    logs.route_hivemind()
    heard: list[str] = []
    logs.uncaught_listeners.append(heard.append)
    try:
        logging.getLogger("hivemind.test").warning("from hivemind")  # hivemind's records reach the file too
        try:
            raise RuntimeError("boom at start")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        for handler in logging.getLogger().handlers:
            handler.flush()
        text = path.read_text()
        assert "from hivemind" in text and "uncaught exception" in text and "boom at start" in text
        assert heard == ["RuntimeError: boom at start"]
        handler = next(h for h in logging.getLogger().handlers if getattr(h, "layerhive_app", False))
        assert handler.maxBytes == logs.MAX_BYTES and handler.backupCount == logs.BACKUPS
    finally:
        logs.uncaught_listeners.remove(heard.append)
        sys.excepthook, threading.excepthook = hooks  # the rest of the test session keeps pytest's own
        for handler in set(logging.getLogger().handlers) - set(handlers):
            logging.getLogger().removeHandler(handler)
            handler.close()
