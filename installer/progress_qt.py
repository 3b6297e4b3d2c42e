"""The installer's progress window in Qt, for a Python without Tk: run by the new environment's Python once
PySide6 is installed in it (installer/progress.py, QtWindow). It reads JSON lines on stdin:
{"step": [fraction, text]}, {"detail": text}, {"ask": question}, {"finish": [ok, text]}; and writes
{"answer": bool} or {"cancel": true} on stdout. It exits when closed after the final message, or when
its stdin ends before one (the installer went away)."""

from __future__ import annotations

import json
import sys
import threading

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)


class Inbox(QObject):
    """Reads stdin on a daemon thread (it must not hold the app open); its signals reach the window queued."""

    message = Signal(dict)
    ended = Signal()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="installer-inbox").start()

    def _read(self) -> None:
        for line in sys.stdin:
            try:
                self.message.emit(json.loads(line))
            except ValueError:
                continue
        self.ended.emit()


class ProgressWindow(QWidget):
    def __init__(self, title: str) -> None:
        super().__init__()
        self.setWindowTitle(title)
        self.setMinimumWidth(460)
        self.finished = self.cancelling = False
        self.step, self.detail = QLabel("Starting…"), QLabel("")
        self.step.setWordWrap(True)
        self.detail.setWordWrap(True)
        self.detail.setStyleSheet("color: #666")
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        self.message = QPlainTextEdit()  # selectable: it may hold a command to copy
        self.message.setReadOnly(True)
        self.message.hide()
        self.button = QPushButton("Cancel")
        self.button.clicked.connect(self.close)
        layout = QVBoxLayout(self)
        for widget in (self.step, self.bar, self.detail, self.message, self.button):
            layout.addWidget(widget)

    def handle(self, message: dict) -> None:
        if "step" in message:
            fraction, text = message["step"]
            self.bar.setValue(round(100 * fraction))
            self.step.setText(text)
            self.detail.setText("")
        elif "detail" in message:
            self.detail.setText(message["detail"])
        elif "ask" in message:
            answer = QMessageBox.question(self, self.windowTitle(), message["ask"]) == QMessageBox.StandardButton.Yes
            reply({"answer": answer})
        elif "finish" in message:
            ok, text = message["finish"]
            self.finished = True
            if ok:
                self.bar.setValue(100)
            self.step.setText("Done." if ok else "It did not work.")
            self.message.setPlainText(text)
            self.message.show()
            self.button.setText("Close")
            self.button.setEnabled(True)

    def installer_gone(self) -> None:
        """The installer ended before its final message (killed): nothing left to show. exit(), not quit(): quit
        would first ask the window to close, and it asks the person whether to cancel."""
        if not self.finished:
            QApplication.exit(0)

    def closeEvent(self, event) -> None:
        if self.finished:
            event.accept()
            return
        event.ignore()
        if not self.cancelling and QMessageBox.question(
                self, self.windowTitle(), "Stop now? Nothing stays half-installed.") == QMessageBox.StandardButton.Yes:
            self.cancelling = True
            self.step.setText("Stopping and undoing what was done…")
            self.button.setEnabled(False)
            reply({"cancel": True})


def reply(message: dict) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


def main() -> int:
    app = QApplication(sys.argv[:1])
    window = ProgressWindow(sys.argv[1] if len(sys.argv) > 1 else "Layerhive")
    inbox = Inbox()
    inbox.message.connect(window.handle)
    inbox.ended.connect(window.installer_gone)  # a method of the window: called on its (the GUI) thread
    window.show()
    inbox.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
