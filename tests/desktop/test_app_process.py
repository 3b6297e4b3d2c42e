"""The app as a user runs it: `python -m desktop.app` in an empty home, offscreen. A first run (accepting
the window's defaults: the demo swarm) reaches serving; a second launch finds it and ends without starting
a second demo swarm; SIGTERM leaves nothing running; the choices and the log are where they belong."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parents[2]


def app_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LAYERHIVE_", "XDG_"))}
    return {**env, "HOME": str(tmp_path / "home"), "LAYERHIVE_HOME": str(tmp_path / "layerhive"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"), "QT_QPA_PLATFORM": "offscreen",
            "PYTHONPATH": str(ROOT), "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def node_processes(root: psutil.Process) -> list[psutil.Process]:
    """The node processes the app started (each has a DHT process of its own below it)."""
    return [p for p in root.children() if "node.app.cli" in " ".join(p.cmdline())]


def test_a_first_launch_serves_a_second_one_defers_to_it_and_quit_leaves_nothing(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama", num_layers=4))
    env = app_env(tmp_path)
    command = [sys.executable, "-m", "desktop.app", "--model", model]
    log = tmp_path / "layerhive" / "app" / "logs" / "layerhive-app.log"
    output = open(tmp_path / "first.out", "w")  # noqa: SIM115 (the child writes to it until it ends)
    first = subprocess.Popen([*command, "--accept-defaults"], env=env, stdout=output, stderr=subprocess.STDOUT,
                             start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and "serving after" in log.read_text()):
            assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
            time.sleep(0.5)
        text = log.read_text()
        first_window = float(re.search(r"first window after ([\d.]+) s", text).group(1))
        serving = float(re.search(r"serving after ([\d.]+) s", text).group(1))
        print(f"tiny model, demo swarm: first window {first_window:.1f} s, serving {serving:.1f} s after launch")
        assert first_window < serving
        root = psutil.Process(first.pid)
        nodes = node_processes(root)
        assert len(nodes) == 2  # the demo swarm's two nodes (the app's own node runs in the app)
        tree = [root, *root.children(recursive=True)]

        second = subprocess.run([*command, "--accept-defaults"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0 and "already running" in second.stderr
        assert {p.pid for p in node_processes(root)} == {p.pid for p in nodes}  # no second demo swarm
        time.sleep(1)
        assert "another Layerhive runs" in log.read_text() and "asked to show" in log.read_text()

        first.send_signal(signal.SIGTERM)  # as a session logout or a service manager quits it
        assert first.wait(timeout=90) == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]  # the node, the demo swarm, their p2p daemons: all ended
        settings = (tmp_path / "config" / "Layerhive" / "Layerhive.conf").read_text()
        assert "first_run_done=true" in settings and "kind=demo" in settings
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for process in tree:
            if process.is_running():
                process.kill()
        output.close()


def test_quitting_while_the_demo_swarm_starts_leaves_nothing_running(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama", num_layers=4))
    log = tmp_path / "layerhive" / "app" / "logs" / "layerhive-app.log"
    app = subprocess.Popen([sys.executable, "-m", "desktop.app", "--model", model, "--accept-defaults"],
                           env=app_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        root = psutil.Process(app.pid)
        deadline = time.monotonic() + 240
        while len(node_processes(root)) < 2:  # the demo swarm's nodes are starting: the app is mid-start
            assert app.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        tree = [root, *root.children(recursive=True)]
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert "quit while starting" in log.read_text()
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)
        for process in tree:
            if process.is_running():
                process.kill()
