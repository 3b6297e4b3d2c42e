"""`layerhive-app`: the tray app. It starts a node that joins the swarm and serves the layers it is
given, and offers the chat window and the swarm map.

A window is on screen at once: this module imports only Qt and the app's light modules, shows a start-up
window, and loads the rest (torch, hivemind, the node: many seconds on a busy machine) behind it
(desktop.runner). The first launch then shows the first-run window (desktop.first_run): it fetches the
model and measures this computer with progress, and the user chooses the swarm and the memory to offer.
Later launches join the swarm chosen then (desktop.settings), or the one named by --initial-peers.
One app runs per user (desktop.instance); everything goes to a rotating log (desktop.logs), and every
failure at start reaches the user in a window, never only the log.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import psutil
from PySide6.QtCore import QEventLoop, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QApplication, QLabel, QMessageBox, QProgressBar, QVBoxLayout, QWidget

from desktop import logs
from desktop.icons import SERVING, hive_icon
from desktop.instance import SingleInstance

logger = logging.getLogger(__name__)
T = TypeVar("T")
STARTED = "layerhive-app started"  # printed once Qt has its display: installer/install.py's launch check waits for it
# Set by SIGTERM or Ctrl-C at any point: waits in progress give up, and the app stops what it started.
terminating = threading.Event()


class Terminated(Exception):
    """The app was asked to quit (SIGTERM, Ctrl-C) while starting."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerhive-app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the model to serve (default: the embedded SmolLM2-135M)")
    parser.add_argument("--initial-peers", nargs="*", default=None,
                        help="multiaddrs of swarm peers (default: the swarm chosen at the first run)")
    parser.add_argument("--identity", default="desktop", help="name of this node's persistent identity")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="offer at most this much memory (this run; the tray's choice is remembered)")
    parser.add_argument("--first-run", action="store_true", help="show the first-run window even if done before")
    parser.add_argument("--accept-defaults", action="store_true",
                        help="on a first run, take the choices the window proposes without waiting for a click")
    parser.add_argument("--self-test", action="store_true",
                        help="start (accepting the first-run defaults), wait until serving, ask the swarm one "
                             "question, print the timings and the answer as JSON, and quit; exit code 0 if answered")
    return parser.parse_args(argv)


def seconds_since_launch() -> float:
    """Since the process started (interpreter and imports included), as the user would time it."""
    return time.time() - psutil.Process().create_time()


class StartupWindow(QWidget):
    """A small window that says what start-up work is under way, while Qt's loop keeps running."""

    def __init__(self, title: str = "Layerhive") -> None:
        super().__init__()
        self.setWindowTitle(title)
        self.setWindowIcon(hive_icon(SERVING))
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, 0)  # busy: no fraction known
        layout = QVBoxLayout(self)
        layout.setContentsMargins(24, 24, 24, 24)
        layout.addWidget(self.label)
        layout.addWidget(self.bar)
        self.resize(440, 110)

    def run(self, text: str, work: Callable[[], T]) -> T:
        """Runs `work` on a helper thread while showing `text`; returns its result or raises its exception."""
        self.label.setText(text)
        self.show()
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(work)
            waiting = QEventLoop()
            poll = QTimer()
            poll.timeout.connect(lambda: (future.done() or terminating.is_set()) and waiting.quit())
            poll.start(50)
            waiting.exec()
            poll.stop()
            if terminating.is_set() and not future.done():
                pool.shutdown(wait=False, cancel_futures=True)
                raise Terminated(f"asked to quit during: {text}")
        return future.result()


def while_showing(text: str, work: Callable[[], T]) -> T:
    """Runs `work` on a helper thread while a small window says what is under way; Qt's loop keeps running."""
    window = StartupWindow()
    try:
        return window.run(text, work)
    finally:
        window.close()


def bring_up(window: QWidget) -> None:
    window.show()
    window.raise_()
    window.activateWindow()


def open_log_file() -> None:
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(logs.log_file())))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_path = logs.setup_logging()
    logger.info("Layerhive app starting (pid %d): %s", os.getpid(), " ".join(sys.argv))
    qt = QApplication(sys.argv[:1])
    qt.setApplicationName("Layerhive")
    qt.setWindowIcon(hive_icon(SERVING))
    qt.setQuitOnLastWindowClosed(False)  # closing the chat window leaves the node serving from the tray
    print(f"{STARTED} (Qt platform {qt.platformName()})", flush=True)
    # Ctrl-C or a service manager's SIGTERM quits like the menu's Quit, at any point: the node leaves the swarm
    # cleanly and the demo swarm stops. Python runs signal handlers only between bytecodes, so a timer lets
    # them in while Qt's loop waits.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: (terminating.set(), qt.quit()))
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(200)
    instance = SingleInstance()
    if not instance.acquire():
        logger.info("another Layerhive runs for this user: asked it to show itself")
        print("Layerhive is already running; its window was brought up.", file=sys.stderr)
        return 0
    window = StartupWindow()
    window.label.setText("Starting Layerhive…")
    bring_up(window)
    qt.processEvents()
    first_window_s = round(seconds_since_launch(), 2)
    logger.info("first window after %.2f s", first_window_s)
    app = None
    try:
        runner = window.run("Starting Layerhive: loading its parts (torch, the network)…",
                            lambda: importlib.import_module("desktop.runner"))
        app = runner.App(qt, args, window, instance, first_window_s=first_window_s)
        code = app.run()
    except Terminated as e:
        logger.info("quit while starting (%s)", e)
        code = 0
    except Exception as e:  # every failure at start reaches the user, not only the log
        logger.exception("Layerhive could not start")
        QMessageBox.critical(None, "Layerhive", f"Layerhive could not start:\n{type(e).__name__}: {e}\n\n"
                                                f"The log has the details: {log_path}")
        code = 1
    finally:
        if app is not None:
            app.stop()
        instance.release()
    if app is not None and app.restart:
        logger.info("restarting to apply new settings")
        os.execv(sys.executable, [sys.executable, "-m", "desktop.app", *(argv if argv is not None else sys.argv[1:])])
    return code


if __name__ == "__main__":
    sys.exit(main())
