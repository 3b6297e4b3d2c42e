"""The running app, loaded by desktop.app behind its start-up window: the first run, the swarm (the demo one
started here when chosen), the node, its windows and the tray, the run rules' timer, lifetime totals."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEventLoop, QObject, QTimer, Signal
from PySide6.QtWidgets import QApplication, QSystemTrayIcon, QWidget

from desktop import logs
from desktop.app import StartupWindow, Terminated, bring_up, open_log_file, seconds_since_launch, terminating
from desktop.bridge import NodeBridge
from desktop.chat_window import ChatWindow
from desktop.contribution import LifetimeContribution
from desktop.first_run import FirstRunResult, FirstRunWindow
from desktop.instance import SingleInstance
from desktop.machine import memory
from desktop.policy import decide
from desktop.sensors import read_conditions
from desktop.settings import AppSettings
from desktop.swarm_choice import SwarmChoice
from desktop.swarm_map import SwarmMapWindow
from desktop.tray import Tray
from node.app.controller import NodeController
from node.client.chat import Message
from node.model.checkpoint import DEFAULT_MODEL, ModelSource, resolve_model
from node.model.sampling import SamplingParams
from node.serve.node import NodeConfig

logger = logging.getLogger(__name__)
POLICY_CHECK_MS = 30_000
SELF_TEST_QUESTION = "What is the capital of France?"


class _Relay(QObject):
    """Carries messages from other threads (uncaught exceptions) to the UI thread."""

    message = Signal(str)


class App:
    """The node, its windows and the tray, and the timers that keep them current."""

    def __init__(self, qt: QApplication, args: argparse.Namespace, window: StartupWindow, instance: SingleInstance,
                 *, first_window_s: float) -> None:
        self.qt, self.args, self.window = qt, args, window
        self.model = args.model or DEFAULT_MODEL
        self.settings = AppSettings()
        self.local_swarm = None
        self.bridge: NodeBridge | None = None
        self.tray: Tray | None = None
        self.settings_window = None
        self.restart = False
        self.timings: dict[str, float] = {"first_window": first_window_s}
        self.front: QWidget = window  # the window shown while starting, raised when launched again
        instance.activated.connect(self.show_up)
        logs.route_hivemind()
        self._relay = _Relay()
        self._relay.message.connect(self._show_error)
        logs.uncaught_listeners.append(self._relay.message.emit)

    def mark(self, what: str) -> None:
        if what not in self.timings:
            self.timings[what] = round(seconds_since_launch(), 2)
            logger.info("%s after %.2f s", what.replace("_", " "), self.timings[what])

    def run(self) -> int:
        args, settings = self.args, self.settings
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        source: ModelSource | str = self.model
        if args.initial_peers is not None:  # named on the command line: this run only
            swarm = SwarmChoice("invite", tuple(args.initial_peers)) if args.initial_peers else SwarmChoice("demo")
        elif not settings.first_run_done or args.first_run:
            result = self.first_run()
            if result is None:
                return 0  # the user quit before starting
            source, swarm = result.source, result.swarm
        else:
            swarm = settings.swarm
        if not isinstance(source, ModelSource):
            source = self.window.run("Preparing the model…", lambda: resolve_model(self.model))
        self.start(source, swarm)
        if args.self_test:
            return self.self_test()
        return 0 if terminating.is_set() else self.qt.exec()

    def first_run(self) -> FirstRunResult | None:
        """Shows the first-run window until the user starts (its result, saved) or quits (None)."""
        args, settings = self.args, self.settings
        window = FirstRunWindow(self.model, settings, memory(settings.device), open_log=open_log_file,
                                auto_accept=args.accept_defaults or args.self_test)
        done = QEventLoop()
        window.accepted.connect(lambda _: done.quit())
        window.quit_requested.connect(done.quit)
        watch = QTimer()  # SIGTERM or Ctrl-C meanwhile: leave as if the user quit
        watch.timeout.connect(lambda: terminating.is_set() and done.quit())
        watch.start(100)
        bring_up(window)
        self.front = window
        self.window.hide()
        self.mark("first_run_window")
        window.begin()
        done.exec()
        watch.stop()
        result = None if terminating.is_set() else window.result
        if result is not None:
            self.mark("first_run_accepted")
            settings.swarm = result.swarm
            settings.memory_cap_bytes = result.memory_cap_bytes
            settings.first_run_done = True
            bring_up(self.window)
            self.front = self.window
        window.close()
        return result

    def start(self, source: ModelSource, swarm: SwarmChoice) -> None:
        """The swarm (the demo one started first), the node, its windows and the tray; then contributing."""
        args, settings, window = self.args, self.settings, self.window
        if swarm.is_demo:
            from node.app.local_swarm import LocalSwarm

            self.local_swarm = LocalSwarm(source.name, num_nodes=2)
            window.run("Starting the demo swarm on this computer (this computer only)…", self.local_swarm.start)
            self.mark("demo_swarm_up")
            initial_peers = self.local_swarm.initial_peers
        else:
            initial_peers = swarm.initial_peers()
        cap = int(args.max_memory_gb * 1e9) if args.max_memory_gb else settings.memory_cap_bytes
        config = NodeConfig(initial_peers=initial_peers, identity=args.identity, max_memory_bytes=cap,
                            device=settings.device)
        controller = window.run("Loading the model…", lambda: NodeController(source, config))
        self.mark("node_ready")
        self.bridge = bridge = NodeBridge(controller)
        bridge.swarm_label = swarm.label
        self.chat, self.swarm_map = ChatWindow(bridge), SwarmMapWindow(bridge)
        self.chat.setWindowTitle(f"Layerhive chat · {swarm.label}")
        self.swarm_map.setWindowTitle(f"Layerhive swarm map · {swarm.label}")
        self.lifetime = LifetimeContribution()
        self.tray = tray = Tray(bridge, settings, open_chat=lambda: bring_up(self.chat),
                                open_map=lambda: bring_up(self.swarm_map), quit_app=self.qt.quit,
                                open_settings=self.open_settings, open_log=open_log_file, swarm_label=swarm.label,
                                lifetime=self.lifetime)
        if QSystemTrayIcon.isSystemTrayAvailable():
            tray.show()
        else:  # no tray on this desktop: the chat window is the app, and closing it quits
            self.qt.setQuitOnLastWindowClosed(True)
        bridge.status_changed.connect(lambda status: status.state == "online" and self.mark("serving"))
        window.close()
        bring_up(self.chat)
        self.front = self.chat
        self.check_policy()
        tray.start()  # unless the contributor paused, a snooze still runs, or the rules hold the node
        self.policy_timer = QTimer()
        self.policy_timer.timeout.connect(self.check_policy)
        self.policy_timer.start(POLICY_CHECK_MS)

    def check_policy(self) -> None:
        if self.tray is None or self.bridge is None:
            return
        try:
            conditions = read_conditions()
        except Exception:  # a sensor that breaks must not stop the app: the rules wait for the next tick
            logger.exception("could not read the machine's state for the run rules")
            return
        running = self.bridge.status().state in ("starting", "joining", "online")
        self.tray.apply_policy(decide(self.settings.policy(), conditions, running=running))

    def open_settings(self) -> None:
        from desktop.settings_window import SettingsWindow

        if self.settings_window is None:
            self.settings_window = SettingsWindow(self.settings, memory(self.settings.device),
                                                  conditions=read_conditions)
            self.settings_window.saved.connect(self._on_settings_saved)
            self.settings_window.restart_requested.connect(self.restart_app)
        bring_up(self.settings_window)

    def _on_settings_saved(self, changed: set[str]) -> None:
        if "memory_cap_bytes" in changed and self.tray is not None:
            self.tray.set_memory_cap(self.settings.memory_cap_bytes)
        self.check_policy()

    def restart_app(self) -> None:
        self.restart = True
        self.qt.quit()

    def show_up(self) -> None:
        """Another launch asked for us: show our window (first run, start-up, or chat); say this one runs."""
        logger.info("a later launch asked to show this one")
        bring_up(self.front)
        if self.tray is not None:
            self.tray.showMessage("Layerhive", "Layerhive is already running: it is here in the tray.")

    def _show_error(self, text: str) -> None:
        if self.tray is not None and self.tray.isVisible():
            self.tray.showMessage("Layerhive: something went wrong", f"{text}\nOpen log has the details.",
                                  QSystemTrayIcon.MessageIcon.Warning)

    def stop(self) -> None:
        if self._relay.message.emit in logs.uncaught_listeners:
            logs.uncaught_listeners.remove(self._relay.message.emit)
        if self.bridge is not None:
            try:
                self.bridge.stop().result(timeout=30)  # leaves the swarm: peers stop routing to us at once
            except Exception:
                logger.exception("the node did not stop cleanly")
        if self.tray is not None:
            self.lifetime.add(self.bridge.status())
            self.lifetime.save()
            self.tray.hide()
        if self.local_swarm is not None:
            self.local_swarm.stop()

    def self_test(self) -> int:
        """Waits until serving, asks one question, prints the timings and the answer as JSON."""
        # `code`: where the running package lives, so an installer's check can tell its install from a checkout.
        result: dict = {"timings": self.timings, "code": str(Path(__file__).resolve().parent.parent)}
        try:
            wait_for(lambda: "serving" in self.timings, 900)
            started = time.monotonic()
            answer = self.bridge.chat([Message("user", SELF_TEST_QUESTION)], SamplingParams(max_new_tokens=24))
            wait_for(answer.done, 300)
            result.update(answer=answer.result(), chat_s=round(time.monotonic() - started, 2))
            self.mark("answered")
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(result), flush=True)
        return 0 if result.get("answer") else 1


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Runs Qt's loop until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if terminating.is_set():
            raise Terminated("asked to quit")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout_s:.0f} s")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 100)
        time.sleep(0.02)
