"""Where the app keeps its own state: the log, lifetime contribution totals, the single-instance lock.

$LAYERHIVE_HOME/app when that is set (one variable moves all of Layerhive's files: tests, portable
installs), else the platform's place for an app's state: $XDG_STATE_HOME/layerhive (~/.local/state/layerhive)
on Linux, ~/Library/Application Support/Layerhive on macOS, %LOCALAPPDATA%\\Layerhive on Windows. Settings
stay in QSettings (desktop.settings); models and identities stay in node.model.checkpoint.layerhive_home().
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def state_dir() -> Path:
    if os.environ.get("LAYERHIVE_HOME"):
        return Path(os.environ["LAYERHIVE_HOME"]).expanduser() / "app"
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "Layerhive"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "Layerhive"
    return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "layerhive"


def log_file() -> Path:
    return state_dir() / "logs" / "layerhive-app.log"
