"""Helpers for the desktop tests: waiting on Qt's loop, and settings in a file of the test's own."""

from __future__ import annotations

import time

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

from desktop.settings import AppSettings


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Runs the Qt event loop (queued signals land) until `predicate()` holds. Not QTest.qWait: it keeps the
    GIL while it waits, which starves the node's threads in this process (16 s to a SmolLM2 answer's first
    piece, against 1 s under app.exec(), which releases it)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def settings_in(tmp_path) -> AppSettings:
    return AppSettings(QSettings(str(tmp_path / "layerhive.conf"), QSettings.Format.IniFormat))
