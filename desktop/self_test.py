"""`layerhive-app --self-test`: the app checks itself end to end, as installed, and exits (0: it works).

It starts like any launch (a demo swarm on this machine when no swarm is configured, the node joining it, the
windows), then, once the node serves, asks the swarm one question through the app's own node bridge, prints the
answer and leaves. It also prints when the first window appeared and when the node began serving, measured from
the process's start (so interpreter and imports count): the figures a person double-clicking the app waits for.
A message box the app shows (an error at start) ends the test with its text. Runs headless with
QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from desktop.bridge import NodeBridge
from node.app.controller import NodeStatus
from node.client.chat import Message
from node.model.sampling import SamplingParams

PROMPT = "Say hello in five words."
TIMEOUT_S = 900.0  # the first launch may fetch and convert the model


class SelfTest(QObject):
    def __init__(self, app: QApplication, *, prompt: str = PROMPT, max_new_tokens: int = 16,
                 timeout_s: float = TIMEOUT_S) -> None:
        super().__init__()
        self.app, self.prompt, self.max_new_tokens = app, prompt, max_new_tokens
        self.launched_at = psutil.Process().create_time()  # wall clock, as time.time()
        self.first_window_s: float | None = None
        self.serving_s: float | None = None
        self._asked = False
        app.installEventFilter(self)
        self._deadline = QTimer(self)
        self._deadline.setSingleShot(True)
        self._deadline.timeout.connect(lambda: self.fail(f"no answer within {timeout_s:.0f} s of the launch"))
        self._deadline.start(int(timeout_s * 1000))
        self.say(f"code from {Path(__file__).resolve().parent.parent}")

    def since_launch(self) -> float:
        return time.time() - self.launched_at

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() != QEvent.Type.Show or not isinstance(watched, QWidget) or not watched.isWindow():
            return False
        if self.first_window_s is None:
            self.first_window_s = self.since_launch()
            self.say(f"first window {self.first_window_s:.2f} s after launch ({watched.windowTitle()!r})")
        if isinstance(watched, QMessageBox):  # the app tells the person something went wrong: nobody reads it here
            self.fail(f"the app showed a message: {watched.text()}")
        return False

    def attach(self, bridge: NodeBridge) -> None:
        """Watches the node; asks the question once it serves."""
        self.bridge = bridge
        bridge.status_changed.connect(self._on_status)
        bridge.chat_done.connect(self._on_answer)
        bridge.chat_failed.connect(lambda error: self.fail(f"the chat failed: {error}"))
        self._on_status(bridge.status())

    def _on_status(self, status: NodeStatus) -> None:
        if status.state == "failed":
            self.fail(f"the node failed: {status.error}")
        elif status.state == "online" and not self._asked:
            self._asked = True
            self.serving_s = self.since_launch()
            self.say(f"serving {self.serving_s:.2f} s after launch, layers {status.layers}")
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=0)
            self.bridge.chat([Message("user", self.prompt)], params)

    def _on_answer(self, answer: str) -> None:
        if not answer.strip():
            self.fail("the swarm answered with nothing")
            return
        self.say(f"answer {self.since_launch():.2f} s after launch: {answer.strip()!r}")
        self.say("passed")
        self.app.exit(0)

    def fail(self, why: str) -> None:
        self.say(f"FAILED: {why}")
        self.app.exit(1)

    @staticmethod
    def say(text: str) -> None:
        print(f"self-test: {text}", flush=True)
