"""The first-run and settings windows, offscreen, over a real (tiny) model, a real benchmark and a real swarm."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings, QTime  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop import login_item  # noqa: E402
from desktop.first_run import FirstRunWindow  # noqa: E402
from desktop.machine import GB, memory  # noqa: E402
from desktop.policy import Conditions  # noqa: E402
from desktop.settings import AppSettings  # noqa: E402
from desktop.settings_window import SettingsWindow  # noqa: E402
from desktop.swarm_choice import SwarmChoice, invite_link  # noqa: E402
from node.app.local_swarm import LocalSwarm  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def app():
    yield QApplication.instance() or QApplication([])


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def settings_in(tmp_path) -> AppSettings:
    return AppSettings(QSettings(str(tmp_path / "layerhive.conf"), QSettings.Format.IniFormat))


def test_first_run_measures_with_progress_then_takes_the_users_choices(app, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LAYERHIVE_HOME", str(tmp_path / "home"))  # no bench cache: everything is measured
    monkeypatch.delenv("LAYERHIVE_INITIAL_PEERS", raising=False)
    path = str(tiny_checkpoint("llama", num_layers=4))
    settings = settings_in(tmp_path)
    window = FirstRunWindow(path, settings, memory())
    accepted = []
    window.accepted.connect(accepted.append)
    window.show()
    assert window.isVisible() and not window.start_button.isEnabled()  # on screen before any work is done
    assert not window.swarm_picker.public.isEnabled() and window.swarm_picker.demo.isChecked()  # no public swarm
    fractions: list[int] = []
    window.progress_bar.valueChanged.connect(fractions.append)
    window.begin()
    wait_until(lambda: window.bench is not None or window.error_label.isVisible(), 240, "the benchmark")
    assert window.bench is not None, window.error_label.text()
    assert len(set(fractions)) > 3 and fractions == sorted(fractions) and fractions[-1] == 1000  # real progress
    assert window.device_value.text().startswith(window.bench.device_name)
    assert f"{window.bench.stage_layer_latency_s() * 1e3:.2f} ms per layer per token" in window.speed_value.text()
    assert "GB in all" in window.memory_value.text() and "this computer only" in window.uplink_value.text()
    assert "Room for 4 of the model's 4 layers" in window.memory_picker.fit_label.text()
    assert window.start_button.isEnabled() and window.start_button.text() == "Start the demo"

    window.swarm_picker.invite.setChecked(True)  # an invitation: checked before it can be used
    window.swarm_picker.invite_text.setPlainText("layerhive://join?peers=/ip4/1.2.3.4/tcp/9")
    assert not window.start_button.isEnabled() and "does not name the peer" in window.swarm_picker.invite_error.text()
    with LocalSwarm(path, ranges=[(0, 4)], threads_per_node=1) as swarm:
        window.swarm_picker.invite_text.setPlainText(invite_link(swarm.initial_peers))
        assert window.start_button.isEnabled() and window.start_button.text() == "Start contributing"
        wait_until(lambda: "Mbit/s" in window.uplink_value.text() or "not measured" in window.uplink_value.text(),
                   120, "the uplink")
        assert "Mbit/s" in window.uplink_value.text()  # measured to the invited swarm's peers
        window.grab()  # paints with every figure shown

    window.swarm_picker.demo.setChecked(True)
    window.memory_picker.no_cap.setChecked(False)
    window.memory_picker.slider.setValue(4)
    window.start_button.click()
    assert len(accepted) == 1 and accepted[0] is window.result
    assert window.result.swarm == SwarmChoice("demo") and window.result.memory_cap_bytes == int(2 * GB)
    assert window.result.source.num_layers == 4 and window.result.bench is window.bench


def test_first_run_shows_a_failure_and_can_try_again(app, tmp_path):
    window = FirstRunWindow(str(tmp_path / "no-such-model"), settings_in(tmp_path), memory(), open_log=lambda: None)
    window.show()
    window.begin()
    wait_until(lambda: window.error_label.isVisible(), 60, "the error")
    assert "could not prepare this computer" in window.error_label.text() and "does not exist" in \
        window.error_label.text()
    assert window.retry_button.isVisible() and window.log_button.isVisible() and not window.start_button.isEnabled()
    quits = []
    window.quit_requested.connect(lambda: quits.append(True))
    window.close()  # closing the window before starting leaves the app
    assert quits == [True]


def test_settings_window_saves_everything_and_says_what_needs_a_restart(app, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    settings = settings_in(tmp_path)
    no_sensors = Conditions(now=datetime.now())
    window = SettingsWindow(settings, memory(), conditions=lambda: no_sensors)
    window.show()
    notes = " ".join(label.text() for label in window.findChildren(type(window.restart_note)))
    assert "does not report idle time" in notes and "No battery found" in notes and "No NVIDIA GPU" in notes
    assert window.threads.minimum() == 0 and window.threads.text().startswith("All (")
    window.memory_picker.no_cap.setChecked(False)
    window.memory_picker.slider.setValue(6)
    window.only_when_idle.setChecked(True)
    window.idle_minutes.setValue(10)
    window.limit_temperature.setChecked(True)
    window.max_temperature.setValue(75)
    window.use_schedule.setChecked(True)
    window.schedule_start.setTime(QTime(23, 0))
    window.schedule_end.setTime(QTime(6, 30))
    window.start_at_login.setChecked(True)
    changed = window.save()
    assert changed == {"memory_cap_bytes", "only_when_idle", "idle_minutes", "max_gpu_temp_c", "schedule",
                       "start_at_login"}
    assert not window.restart_button.isVisible() and window.restart_note.text() == "Saved."
    assert login_item.is_enabled()
    again = settings_in(tmp_path)
    assert again.memory_cap_bytes == 3_000_000_000 and again.idle_minutes == 10 and again.max_gpu_temp_c == 75
    assert again.policy().schedule is not None and again.policy().only_when_idle

    window.threads.setValue(1)
    window.swarm_picker.invite.setChecked(True)
    window.swarm_picker.invite_text.setPlainText("not a peer")
    assert not window.save_button.isEnabled()  # an unusable invitation cannot be saved
    window.swarm_picker.demo.setChecked(True)
    restarts = []
    window.restart_requested.connect(lambda: restarts.append(True))
    assert window.save() == {"threads"} and window.restart_button.isVisible()
    assert "CPU threads" in window.restart_note.text()
    window.restart_button.click()
    assert restarts == [True]
    window.start_at_login.setChecked(False)
    assert window.save() == {"start_at_login"} and not login_item.is_enabled()
