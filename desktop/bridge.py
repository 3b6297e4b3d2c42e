"""The Qt side of the node controller: its calls, state changes and chat stream as signals.

`NodeController` runs the node on its own thread and never blocks the caller; its callbacks arrive on
that thread. Signals emitted there reach slots in the UI thread queued, so widgets are only ever
touched by the UI thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from PySide6.QtCore import QObject, QTimer, Signal

from node.app.controller import NodeController, NodeStatus
from node.client.chat import Message
from node.model.sampling import SamplingParams


class NodeBridge(QObject):
    status_changed = Signal(object)  # NodeStatus: on every state change, and every `poll_ms` for the counters
    failed = Signal(str)  # an operation (start, pause, resume) failed; the text is for the user
    chat_text = Signal(str)  # a piece of the answer being streamed
    chat_done = Signal(str)  # the whole answer
    chat_failed = Signal(str)
    swarm_changed = Signal(object)  # after `refresh_swarm`: `NodeController.swarm_status`'s SwarmStatus, or None
    swarm_failed = Signal(str)  # after `refresh_swarm`: why the swarm could not be read

    def __init__(self, controller: NodeController, *, poll_ms: int = 1000, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._unsubscribe = controller.on_state_change(lambda _state, status: self.status_changed.emit(status))
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.refresh)
        self._timer.start(poll_ms)

    def status(self) -> NodeStatus:
        return self.controller.status()

    def refresh(self) -> None:
        self.status_changed.emit(self.controller.status())

    def refresh_swarm(self) -> Future:
        """Reads the swarm's records; the result arrives as `swarm_changed`."""
        def done(f: Future) -> None:
            if f.cancelled():
                return
            error = f.exception()
            if error is not None:
                self.swarm_failed.emit(f"{type(error).__name__}: {error}")
            else:
                self.swarm_changed.emit(f.result())

        future = self.controller.swarm_status()
        future.add_done_callback(done)
        return future

    def start(self) -> Future:
        return self._watch("start", self.controller.start())

    def pause(self) -> Future:
        return self._watch("pause", self.controller.pause())

    def resume(self) -> Future:
        return self._watch("resume", self.controller.resume())

    def set_memory_cap(self, max_memory_bytes: int | None) -> Future:
        return self._watch("change the memory cap", self.controller.set_memory_cap(max_memory_bytes))

    def stop(self) -> Future:
        self._timer.stop()
        self._unsubscribe()
        return self.controller.stop()

    def chat(self, messages: Sequence[Message], params: SamplingParams) -> Future:
        """Starts an answer; pieces arrive as `chat_text`, then `chat_done` or `chat_failed`. Cancel the
        returned future to stop it."""
        future = self.controller.chat(messages, params, self.chat_text.emit)
        future.add_done_callback(self._chat_finished)
        return future

    def _chat_finished(self, future: Future) -> None:
        if future.cancelled():
            self.chat_failed.emit("stopped")
        elif (error := future.exception()) is not None:
            self.chat_failed.emit(f"{type(error).__name__}: {error}")
        else:
            self.chat_done.emit(future.result())

    def _watch(self, what: str, future: Future) -> Future:
        def done(f: Future) -> None:
            if not f.cancelled() and (error := f.exception()) is not None:
                self.failed.emit(f"could not {what}: {error}")

        future.add_done_callback(done)
        return future
