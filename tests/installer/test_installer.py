"""The Linux installer end to end, as a person uses it: the installer file built from this checkout, run for a user
whose home is empty; the installed app answering a chat headless (`layerhive-app --self-test`) through a demo
swarm of a tiny model; the app started from its menu entry and stopped by the uninstaller; nothing left behind.
Also: a failed install is undone (and an earlier install comes back), an app that dies at start is reported.

The one shortcut: `--offline --system-site-packages`, so the new environment takes torch, hivemind and Qt from this
machine instead of downloading them; the Layerhive wheel itself is built and installed. Installs from an index are
covered by the failure test (an index that does not answer) and by benchmarks/installer_times.py --full."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer.layout import layout_for
from installer.processes import app_processes, list_processes
from tests.installer.conftest import closed_port, files_under, run_installer, user_env

pytestmark = pytest.mark.timeout(1500)
OFFLINE = ("--offline", "--system-site-packages")
PIP_OUTPUT = ("Successfully installed", "Processing ", "Looking in", "Collecting ")


def test_installs_answers_a_chat_stops_and_uninstalls_without_a_trace(installer_file, tmp_path, tiny_checkpoint):
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home)
    layout = layout_for("linux", {"HOME": str(home)})
    done = run_installer(installer_file, env, *OFFLINE, "--no-launch", "--login-item", "yes")
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "Traceback" not in said and not any(line in said for line in PIP_OUTPUT), "pip's output is for the log"
    assert "Successfully installed layerhive" in Path(layout.install_log).read_text()

    app, menu, login = Path(layout.app_executable), Path(layout.menu_entry), Path(layout.login_item)
    icon = Path(layout.icon)
    for entry in (menu, login):
        text = entry.read_text()
        assert text.startswith("[Desktop Entry]\n") and f"Exec={app}\n" in text and f"Icon={icon}\n" in text
    assert "X-GNOME-Autostart-enabled=true" in login.read_text()
    assert icon.read_bytes().startswith(b"\x89PNG")
    manifest = json.loads(Path(layout.manifest).read_text())
    assert set(manifest["files"]) == {str(icon), str(menu), str(login)} and manifest["trees"] == [str(layout.root)]

    model = tiny_checkpoint("llama", 6)
    checked = subprocess.run([str(app), "--self-test", "--model", str(model)], capture_output=True, text=True,
                             env={**env, "QT_QPA_PLATFORM": "offscreen"}, timeout=900)
    report = self_test_report(checked.stdout)
    assert checked.returncode == 0 and report.get("answer"), checked.stdout[-3000:] + checked.stderr[-3000:]
    assert report["code"].startswith(str(Path(layout.venv))), "the installed code runs, not this checkout"
    assert {"first_window", "serving", "answered"} <= set(report["timings"]), report
    print(report)

    running = start_from_menu_entry(menu, model, env, tmp_path / "app.log")
    try:
        wait_for_demo_swarm(Path(layout.root), running)
        removed = run_installer(installer_file, env, "--uninstall", "--remove-data", "yes")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert "Stopped the running Layerhive" in removed.stdout
        assert running.wait(timeout=30) is not None
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
    assert app_processes(Path(layout.root)) == []
    assert not any(str(home) in " ".join(p.argv) for p in list_processes()), "no process of the app survives"
    assert files_under(home) == [], "the uninstaller leaves nothing in the home directory"


def start_from_menu_entry(menu: Path, model: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The app as the menu starts it (its entry's Exec line), with the tiny model, headless."""
    command = shlex.split(next(line for line in menu.read_text().splitlines() if line.startswith("Exec="))[5:])
    with open(log, "w") as output:
        return subprocess.Popen([*command, "--model", str(model)], env={**env, "QT_QPA_PLATFORM": "offscreen"},
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_demo_swarm(root: Path, app: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until the app runs its demo swarm: node processes and p2p daemons the uninstaller must stop too."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert app.poll() is None, "the app ended by itself"
        argvs = [" ".join(p.argv) for p in app_processes(root)]
        if sum("node.app.cli node" in a for a in argvs) >= 2 and any("p2pd" in a for a in argvs):
            return
        time.sleep(1)
    raise TimeoutError("the app did not start its demo swarm")


def descendants(pid: int):
    processes, found = list_processes(), {pid}
    for _ in range(10):
        found |= {p.pid for p in processes if p.ppid in found}
    return [p for p in processes if p.pid in found and p.pid != pid]


def dead_indexes(env: dict[str, str]) -> dict[str, str]:
    """The person's pip points at an index that does not answer, and so does torch's (no pip.conf fallback)."""
    port = closed_port()
    kept = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    return {**kept, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple",
            "PIP_RETRIES": "0", "PIP_TIMEOUT": "5", "LAYERHIVE_TORCH_INDEX": f"http://127.0.0.1:{port}/whl"}


def snapshot(home: Path, layout) -> dict[str, tuple[int, int]]:
    """Every file under `home` but the installer's log, with its size and modification time."""
    state = Path(layout.state)
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in home.rglob("*")
            if not p.is_relative_to(state) and not p.is_dir()}


def test_a_failed_update_is_undone_and_the_earlier_install_kept(installer_file, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home)
    layout = layout_for("linux", {"HOME": str(home)})
    first = run_installer(installer_file, env, *OFFLINE, "--no-launch", "--login-item", "no")
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot(home, layout)

    failed = run_installer(installer_file, dead_indexes(env), "--no-launch", "--login-item", "yes")
    said = failed.stdout + failed.stderr
    assert failed.returncode == 1, said
    assert "Nothing is half-installed" in said and str(layout.install_log) in said and "Traceback" not in said
    assert "torch" in said and "failed" in said
    assert "rolled back" in Path(layout.install_log).read_text()
    assert snapshot(home, layout) == before, "the earlier install is back as it was"
    assert not Path(layout.login_item).exists()
    helped = subprocess.run([str(layout.app_executable), "--help"], capture_output=True, text=True, timeout=300,
                            env={**env, "QT_QPA_PLATFORM": "offscreen"})
    assert helped.returncode == 0 and "--self-test" in helped.stdout

    removed = run_installer(installer_file, env, "--uninstall", "--remove-data", "no")
    assert removed.returncode == 0 and files_under(home) == []


def test_a_failed_first_install_leaves_only_its_log(installer_file, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    layout = layout_for("linux", {"HOME": str(home)})
    failed = run_installer(installer_file, dead_indexes(user_env(home)), "--no-launch")
    assert failed.returncode == 1 and "Nothing is half-installed" in failed.stderr, failed.stdout + failed.stderr
    log = Path(layout.install_log)
    assert files_under(home) == sorted(str(p.relative_to(home)) for p in [log, *log.parents] if p.is_relative_to(home)
                                       and p != home)
    assert "torch's index" in log.read_text() and "did not answer" in log.read_text()


def test_an_app_that_dies_at_start_is_reported_with_its_output(installer_file, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    layout = layout_for("linux", {"HOME": str(home)})
    env = user_env(home, DISPLAY=":87", QT_QPA_PLATFORM="xcb")  # a display that is not there: Qt aborts
    done = run_installer(installer_file, env, *OFFLINE, "--login-item", "no", "--no-gui")
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "Layerhive is installed" in said and "stopped at once" in said and str(layout.launch_log) in said
    assert "could not connect to display" in said, "Qt's own words reach the person"
    assert Path(layout.app_executable).exists(), "the install itself stays: it is the display that is missing"
    removed = run_installer(installer_file, user_env(home), "--uninstall", "--remove-data", "yes")
    assert removed.returncode == 0 and files_under(home) == []


def test_the_installer_builds_from_a_stock_python_without_wheel_or_new_setuptools(tmp_path):
    """The reported failure: a Python whose venv has setuptools 65 and no `wheel` (`invalid command 'bdist_wheel'`)."""
    stock = tmp_path / "stock"
    subprocess.run([sys.executable, "-m", "venv", str(stock)], check=True, timeout=300)
    python = stock / "bin" / "python"
    has_wheel = subprocess.run([str(python), "-c", "import wheel"], capture_output=True).returncode == 0
    assert not has_wheel, "a fresh venv has no `wheel` package"
    built = subprocess.run([str(python), str(Path(__file__).parents[2] / "installer" / "build.py"),
                            "--out", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert built.returncode == 0, built.stdout + built.stderr
    for name in ("layerhive-install.run", "Layerhive-Install.command", "layerhive-install.ps1"):
        assert (tmp_path / "dist" / name).stat().st_size > 50_000


def test_without_a_wheel_the_installer_says_how_to_build_one(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    repo = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-m", "installer", "--no-launch"], cwd=repo, env=user_env(home),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "installer/build.py" in done.stderr and "Traceback" not in done.stderr


def test_the_installer_starts_the_app_and_the_uninstaller_stops_it(installer_file, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    layout = layout_for("linux", {"HOME": str(home)})
    env = user_env(home, QT_QPA_PLATFORM="offscreen")
    done = run_installer(installer_file, env, *OFFLINE, "--login-item", "no")
    assert done.returncode == 0 and "Layerhive is running" in done.stdout, done.stdout + done.stderr
    assert "layerhive-app started" in Path(layout.launch_log).read_text()
    assert app_processes(Path(layout.root)), "the app runs on after the installer"
    removed = run_installer(installer_file, env, "--uninstall", "--remove-data", "yes")
    assert removed.returncode == 0 and "Stopped the running Layerhive" in removed.stdout, removed.stdout
    assert app_processes(Path(layout.root)) == [] and files_under(home) == []


def test_an_install_stopped_midway_is_undone(installer_file, tmp_path):
    """SIGTERM (or Ctrl-C) while the environment is being made: the command is ended, everything undone."""
    home = tmp_path / "home"
    home.mkdir()
    layout = layout_for("linux", {"HOME": str(home)})
    log = Path(layout.install_log)
    running = subprocess.Popen(["sh", str(installer_file), *OFFLINE, "--no-launch"], env=user_env(home),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (log.exists() and "-m venv" in log.read_text()):
        assert running.poll() is None and time.monotonic() < deadline, "the install never reached the venv step"
        time.sleep(0.05)
    installer = next(p for p in descendants(running.pid) if "-m installer" in " ".join(p.argv))
    os.kill(installer.pid, signal.SIGTERM)
    out, err = running.communicate(timeout=300)
    assert running.returncode == 130 and "everything this run changed was undone" in err, out + err
    assert not any("-m venv" in " ".join(p.argv) and str(home) in " ".join(p.argv) for p in list_processes())
    assert files_under(home) == [".local", ".local/state", ".local/state/layerhive",
                                 ".local/state/layerhive/install.log"]


def self_test_report(stdout: str) -> dict:
    """The JSON line `layerhive-app --self-test` prints last (desktop.runner.App.self_test)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no self-test report in: {stdout[-2000:]}"
    return json.loads(lines[-1])
