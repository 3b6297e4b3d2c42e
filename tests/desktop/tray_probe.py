"""Runs the real app (`desktop.app.main`, arguments as for `layerhive-app`) with a probe that tells a test driving
it from outside, under Xvfb, what a user would see: every window and menu as it is shown, with its title, its
place on the screen, and a menu's entries and where each is drawn, as JSON lines appended to $LAYERHIVE_PROBE.
The test clicks with real X events (xdotool); the probe only reports, and takes screenshots asked for in the
file $LAYERHIVE_PROBE.ask, one per line: "screen PATH", "window TITLE PATH", or "link TITLE|TEXT" (where the
last link TEXT is drawn in that window's text browser, reported as {"class": "link", "center": [x, y]})."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QPoint, QTimer
from PySide6.QtGui import QGuiApplication, QTextCursor
from PySide6.QtWidgets import QApplication, QMenu, QTextBrowser, QWidget

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
                window_titled(title).grab().save(path)
            elif kind == "link":
                title, _, text = rest.partition("|")
                self._report_link(window_titled(title).findChild(QTextBrowser), text)
        self._asked = len(lines)

    def _report_link(self, browser: QTextBrowser, text: str) -> None:
        cursor, last = browser.document().find(text), None
        while not cursor.isNull():
            last, cursor = QTextCursor(cursor), browser.document().find(text, cursor)
        if last is None:
            return
        last.setPosition(last.selectionStart() + 2)
        center = browser.viewport().mapToGlobal(browser.cursorRect(last).center())
        with REPORT.open("a") as out:
            out.write(json.dumps({"class": "link", "text": text, "center": [center.x(), center.y()]}) + "\n")


def window_titled(title: str) -> QWidget:
    return next(w for w in QApplication.topLevelWidgets() if w.isWindow() and w.windowTitle().startswith(title))


class ProbedApplication(QApplication):
    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv)
        self._probe = Probe(self)
        self.installEventFilter(self._probe)


if __name__ == "__main__":
    desktop.app.QApplication = ProbedApplication  # the app as it is, but for the probe watching it
    sys.exit(desktop.app.main(sys.argv[1:]))
