"""The Linux installer end to end: build the self-extracting file from this checkout, run it for a user whose
home is a temporary directory, start the installed app's entry point, uninstall.

The only shortcut: `--offline --system-site-packages`, so the new environment takes torch, hivemind and Qt
from this machine instead of downloading them again; the Layerhive wheel itself is built and installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from installer.build import build

pytestmark = pytest.mark.timeout(600)


def run_installer(installer: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(installer), *args], env=env, capture_output=True, text=True, timeout=500)


def test_the_installer_installs_for_the_user_adds_a_login_item_and_uninstalls(tmp_path):
    installer = build(tmp_path / "dist")
    assert installer.name == "layerhive-install.run" and os.access(installer, os.X_OK)
    assert installer.read_bytes().startswith(b"#!/bin/sh")

    home = tmp_path / "home"
    done = run_installer(installer, home, "--offline", "--system-site-packages", "--no-launch")
    assert done.returncode == 0, done.stdout + done.stderr
    root = home / "data" / "layerhive"
    app = root / "venv" / "bin" / "layerhive-app"
    assert app.exists()
    installed = list((root / "venv" / "lib").glob("python3*/site-packages/node/serve/server.py"))
    assert installed, "the wheel's packages are in the new environment"
    helped = subprocess.run([str(app), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "layerhive-app" in helped.stdout

    menu = home / "data" / "applications" / "layerhive.desktop"
    login = home / "config" / "autostart" / "layerhive.desktop"
    icon = home / "data" / "icons" / "hicolor" / "256x256" / "apps" / "layerhive.png"
    for entry in (menu, login):
        text = entry.read_text()
        assert text.startswith("[Desktop Entry]\n") and f"Exec={app}\n" in text and f"Icon={icon}\n" in text
    assert "X-GNOME-Autostart-enabled=true" in login.read_text()
    assert icon.read_bytes().startswith(b"\x89PNG")

    removed = run_installer(installer, home, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not root.exists() and not menu.exists() and not login.exists() and not icon.exists()


def test_the_installer_says_what_is_missing_without_a_wheel(tmp_path):
    lonely = tmp_path / "install.py"
    lonely.write_text((Path(__file__).parents[2] / "installer" / "install.py").read_text())
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, str(lonely), "--no-launch"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "no layerhive wheel" in done.stderr
