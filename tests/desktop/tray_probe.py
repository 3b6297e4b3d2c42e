"""Runs the real app (`desktop.app.main`, arguments as for `layerhive-app`) with a probe that tells a test driving
it from outside, under Xvfb, what a user would see: every window and menu as it is shown, with its title, its
place on the screen, and a menu's entries and where each is drawn, as JSON lines appended to $LAYERHIVE_PROBE.
The test clicks with real X events (xdotool); the probe only reports, and takes screenshots asked for in the
file $LAYERHIVE_PROBE.ask ("screen PATH" or "window TITLE PATH", one per line)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QPoint, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication, QMenu, QWidget

import desktop.app

REPORT = Path(os.environ["LAYERHIVE_PROBE"])
ASK = Path(f"{REPORT}.ask")


def describe(widget: QWidget) -> dict:
    """The window as shown: `rect` on the screen, asked of the X server (an icon docked in the tray is placed in
    the tray's window, so its own geometry is relative to that)."""
    corner = widget.mapToGlobal(QPoint(0, 0))
    seen = {"class": widget.metaObject().className(), "title": widget.windowTitle(), "visible": widget.isVisible(),
            "rect": [corner.x(), corner.y(), widget.width(), widget.height()]}
    if isinstance(widget, QMenu):
        seen["actions"] = []
        for action in widget.actions():
            if action.isSeparator():
                continue
            box = widget.actionGeometry(action).translated(widget.mapToGlobal(widget.rect().topLeft()))
            seen["actions"].append({"text": action.text(), "enabled": action.isEnabled(),
                                    "checked": action.isChecked(), "center": [box.center().x(), box.center().y()]})
    return seen


class Probe(QObject):
    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self._asked = 0  # lines of ASK done
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._answer)
        self._timer.start(200)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.Show, QEvent.Type.Hide) and isinstance(watched, QWidget) \
                and watched.isWindow():
            QTimer.singleShot(150, lambda: self._report(watched))  # once laid out: the geometry is final
        return False

    def _report(self, widget: QWidget) -> None:
        with REPORT.open("a") as out:
            out.write(json.dumps(describe(widget)) + "\n")

    def _answer(self) -> None:
        if not ASK.exists():
            return
        lines = ASK.read_text().splitlines()
        for line in lines[self._asked:]:
            kind, _, rest = line.partition(" ")
            if kind == "screen":
                QGuiApplication.primaryScreen().grabWindow(0).save(rest)
            elif kind == "window":
                title, _, path = rest.rpartition(" ")
                window = next(w for w in QApplication.topLevelWidgets() if w.windowTitle().startswith(title))
                window.grab().save(path)
        self._asked = len(lines)


class ProbedApplication(QApplication):
    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv)
        self._probe = Probe(self)
        self.installEventFilter(self._probe)


if __name__ == "__main__":
    desktop.app.QApplication = ProbedApplication  # the app as it is, but for the probe watching it
    sys.exit(desktop.app.main(sys.argv[1:]))
