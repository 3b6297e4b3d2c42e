"""Finding and stopping an install's processes, with real processes: an "app" run by the install's venv python
(a symlink to this interpreter, as in a venv) and a child it started from outside the install (as p2pd is)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from installer.processes import app_processes, stop_app

APP = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "300"])
print(child.pid, flush=True)
time.sleep(300)
"""


def fake_install(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "layerhive"
    (root / "venv" / "bin").mkdir(parents=True)
    python = root / "venv" / "bin" / "python"
    python.symlink_to(sys.executable)
    return root, python


def start(python: Path, mode: str) -> tuple[subprocess.Popen, int]:
    app = subprocess.Popen([str(python), "-c", APP, mode], stdout=subprocess.PIPE, text=True)
    return app, int(app.stdout.readline())


def test_the_app_and_what_it_started_are_found_and_stopped(tmp_path):
    root, python = fake_install(tmp_path)
    app, child = start(python, "polite")
    outsider = subprocess.Popen(["sleep", "300"])
    try:
        found = {p.pid for p in app_processes(root)}
        assert found == {app.pid, child}, "the app and its child, not the unrelated sleep"
        stopped = stop_app(root, grace_s=20)
        assert {p.pid for p in stopped} == {app.pid, child}
        assert app.wait(timeout=5) is not None and app_processes(root) == []
        assert outsider.poll() is None
    finally:
        for process in (app, outsider):
            process.kill()
            process.wait()


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    root, python = fake_install(tmp_path)
    app, _child = start(python, "stubborn")
    try:
        began = time.monotonic()
        stop_app(root, grace_s=1)
        assert app.wait(timeout=5) == -9 and time.monotonic() - began < 15
        assert app_processes(root) == []
    finally:
        app.kill()
        app.wait()


def test_nothing_running_is_nothing_stopped(tmp_path):
    root, _python = fake_install(tmp_path)
    assert stop_app(root) == []
