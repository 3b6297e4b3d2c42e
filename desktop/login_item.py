"""Start at login: the platform's own mechanism, so the user can see and remove it there too.

Linux: an XDG autostart entry, $XDG_CONFIG_HOME/autostart/layerhive.desktop (the same file the installer
writes when the user agrees). macOS: a LaunchAgent, ~/Library/LaunchAgents/org.layerhive.app.plist.
Windows: the "Layerhive" value under HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run.
The state is read from there, not remembered apart, so it cannot disagree with what the system will do.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

APP_ID = "layerhive"
MAC_LABEL = "org.layerhive.app"
WINDOWS_RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"


def launch_command() -> list[str]:
    """How to start this app: its `layerhive-app` script next to this Python (an installed venv), else the module."""
    script = Path(sys.executable).with_name("layerhive-app.exe" if os.name == "nt" else "layerhive-app")
    if script.exists():
        return [str(script)]
    found = shutil.which("layerhive-app")
    return [found] if found else [sys.executable, "-m", "desktop.app"]


def autostart_file() -> Path:
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "autostart" / f"{APP_ID}.desktop"


def launch_agent_file() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{MAC_LABEL}.plist"


def desktop_entry(command: list[str]) -> str:
    return "\n".join([
        "[Desktop Entry]", "Type=Application", "Name=Layerhive",
        "Comment=Lend this computer to a swarm that serves language models",
        f"Exec={shlex.join(command)}", "Terminal=false", "X-GNOME-Autostart-enabled=true", "",
    ])


def launch_agent(command: list[str]) -> bytes:
    return plistlib.dumps({"Label": MAC_LABEL, "ProgramArguments": command, "RunAtLoad": True,
                           "ProcessType": "Interactive"})


def is_enabled() -> bool:
    if sys.platform == "win32":
        return _windows_value() is not None
    path = launch_agent_file() if sys.platform == "darwin" else autostart_file()
    return path.exists()


def set_enabled(enabled: bool) -> None:
    """Adds or removes the login item. Raises OSError when the system refuses."""
    command = launch_command()
    if sys.platform == "win32":
        _set_windows_value(subprocess.list2cmdline(command) if enabled else None)
        return
    path = launch_agent_file() if sys.platform == "darwin" else autostart_file()
    if not enabled:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if sys.platform == "darwin":
        path.write_bytes(launch_agent(command))
    else:
        path.write_text(desktop_entry(command))


def _windows_value() -> str | None:
    import winreg  # type: ignore[import-not-found]

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY) as key:
            return winreg.QueryValueEx(key, "Layerhive")[0]
    except FileNotFoundError:
        return None


def _set_windows_value(line: str | None) -> None:
    import winreg  # type: ignore[import-not-found]

    with winreg.CreateKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY) as key:
        if line is None:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, "Layerhive")
        else:
            winreg.SetValueEx(key, "Layerhive", 0, winreg.REG_SZ, line)
