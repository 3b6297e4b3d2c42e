"""`layerhive-app`: the tray app. It starts a node that joins the swarm and serves the layers it is
given, and offers the chat window and the swarm map. It joins the swarm named by --initial-peers, else the
one in the user's config (`node.net.config`); with none known it first starts a small local swarm of the model
on this machine (a bootstrap peer and two nodes), so the app can be tried alone."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication, QLabel, QMessageBox, QSystemTrayIcon

from desktop.bridge import NodeBridge
from desktop.chat_window import ChatWindow
from desktop.self_test import SelfTest
from desktop.settings import AppSettings
from desktop.swarm_map import SwarmMapWindow
from desktop.tray import Tray
from node.app.controller import NodeController
from node.model.checkpoint import DEFAULT_MODEL
from node.net.config import ConfigError, default_initial_peers
from node.serve.node import NodeConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")
STARTED = "layerhive-app started"  # Qt has its display: what installer/install.py's launch check waits for


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerhive-app", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--initial-peers", nargs="*", default=None,
                        help="multiaddrs of swarm peers (default: the user's config, see `layerhive node`)")
    parser.add_argument("--identity", default="desktop", help="name of this node's persistent identity")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="offer at most this much memory (this run; the tray's choice is remembered)")
    parser.add_argument("--self-test", action="store_true",
                        help="start, answer one chat through the swarm, print the answer and timings, exit (0: works)")
    return parser.parse_args(argv)


def while_showing(text: str, work: Callable[[], T]) -> T:
    """Runs `work` on a helper thread while a small window says what is under way; Qt's loop keeps running."""
    window = QLabel(text)
    window.setWindowTitle("Layerhive")
    window.setMargin(24)
    window.show()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(work)
        waiting = QEventLoop()
        poll = QTimer()
        poll.timeout.connect(lambda: future.done() and waiting.quit())
        poll.start(100)
        waiting.exec()
        poll.stop()
    window.close()
    return future.result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = QApplication(sys.argv[:1])
    app.setApplicationName("Layerhive")
    app.setQuitOnLastWindowClosed(False)  # closing the chat window leaves the node serving from the tray
    self_test = SelfTest(app) if args.self_test else None
    logger.info("%s (Qt platform %s)", STARTED, app.platformName())  # the installer waits for this line

    local_swarm = None
    try:
        initial_peers = args.initial_peers if args.initial_peers is not None else default_initial_peers()
    except ConfigError as e:  # a hand-edited config: say so in a window, the app may have no terminal
        QMessageBox.critical(None, "Layerhive", f"Layerhive cannot start: {e}")
        return 2
    if not initial_peers:  # no swarm known: a demo swarm on this machine
        from node.app.local_swarm import LocalSwarm

        local_swarm = LocalSwarm(args.model, num_nodes=2)
        try:  # the node needs a swarm to join: about 20 s the first time, with a window saying so meanwhile
            while_showing(f"Starting a local demo swarm of {args.model}…", local_swarm.start)
        except Exception as e:
            local_swarm.stop()
            QMessageBox.critical(None, "Layerhive", f"The local swarm did not start: {e}")
            return 1
        initial_peers = local_swarm.initial_peers
    settings = AppSettings()
    memory = int(args.max_memory_gb * 1e9) if args.max_memory_gb else settings.memory_cap_bytes
    controller = while_showing("Loading the model…", lambda: NodeController(args.model, NodeConfig(
        initial_peers=initial_peers, identity=args.identity, max_memory_bytes=memory)))
    bridge = NodeBridge(controller)
    if self_test is not None:
        self_test.attach(bridge)
    chat, swarm_map = ChatWindow(bridge), SwarmMapWindow(bridge)

    def bring_up(window) -> None:
        window.show()
        window.raise_()
        window.activateWindow()

    def open_chat() -> None:
        bring_up(chat)

    tray = Tray(bridge, settings, open_chat=open_chat, open_map=lambda: bring_up(swarm_map), quit_app=app.quit)
    if QSystemTrayIcon.isSystemTrayAvailable():
        tray.show()
    else:  # no tray on this desktop: the chat window is the app, and closing it quits
        app.setQuitOnLastWindowClosed(True)
    open_chat()
    tray.start()  # unless the contributor paused last time, or a snooze still runs
    # Ctrl-C or a service manager's SIGTERM quits like the menu's Quit: the node leaves the swarm cleanly.
    # Python runs signal handlers only between bytecodes, so a timer lets it in while Qt's loop waits.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: app.quit())
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(200)
    try:
        return app.exec()
    finally:
        try:
            bridge.stop().result(timeout=30)  # leaves the swarm: peers stop routing to us at once
        except Exception:
            logger.exception("the node did not stop cleanly")
        if local_swarm is not None:
            local_swarm.stop()


if __name__ == "__main__":
    sys.exit(main())
