"""The Qt side of the node controller: its calls, state changes and chat stream as signals.

`NodeController` runs the node on its own thread and never blocks the caller; its callbacks arrive on
that thread. Signals emitted there reach slots in the UI thread queued, so widgets are only ever
touched by the UI thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from PySide6.QtCore import QObject, QTimer, Signal

from desktop.wording import layer_list, model_label
from node.app.controller import ChatReply, NodeController, NodeStatus
from node.client.chat import AnswerStats, Message
from node.client.session import NoChainError
from node.model.sampling import SamplingParams


class NodeBridge(QObject):
    status_changed = Signal(object)  # NodeStatus: on every state change, and every `poll_ms` for the counters
    failed = Signal(str)  # an operation (start, pause, resume) failed; the text is for the user
    chat_text = Signal(str)  # a piece of the answer being streamed
    chat_progress = Signal(object)  # AnswerStats: the answer's figures so far, with each piece
    chat_done = Signal(object)  # ChatReply: the whole answer and its figures
    chat_failed = Signal(str)  # "stopped", or why there is no answer, in words for the user
    swarm_changed = Signal(object)  # after `refresh_swarm`: `NodeController.swarm_status`'s SwarmStatus, or None
    swarm_failed = Signal(str)  # after `refresh_swarm`: why the swarm could not be read

    def __init__(self, controller: NodeController, *, poll_ms: int = 1000, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.swarm_label = ""  # how the app names the swarm joined (desktop.swarm_choice), for every window
        self.last_reply: ChatReply | None = None  # the last answer, whose chain the swarm map highlights
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
        """Starts an answer; pieces arrive as `chat_text` and `chat_progress`, then `chat_done` or `chat_failed`.
        Cancel the returned future to stop it."""
        future = self.controller.chat(messages, params, self._chat_piece)
        future.add_done_callback(self._chat_finished)
        return future

    def _chat_piece(self, piece: str, stats: AnswerStats) -> None:
        self.chat_text.emit(piece)
        self.chat_progress.emit(stats)

    def _chat_finished(self, future: Future) -> None:
        if future.cancelled():
            self.chat_failed.emit("stopped")
        elif (error := future.exception()) is not None:
            self.chat_failed.emit(explain_chat_failure(error, self.controller.source.name))
        else:
            self.last_reply = future.result()
            self.chat_done.emit(self.last_reply)

    def _watch(self, what: str, future: Future) -> Future:
        def done(f: Future) -> None:
            if not f.cancelled() and (error := f.exception()) is not None:
                self.failed.emit(f"could not {what}: {error}")

        future.add_done_callback(done)
        return future


def explain_chat_failure(error: BaseException, model: str) -> str:
    """Why the swarm gave no answer, in words for the user (the details follow, for a bug report)."""
    name = model_label(model)
    if isinstance(error, NoChainError) and error.uncovered_layers:
        return (f"The swarm cannot answer right now: no node serves {layer_list(error.uncovered_layers)} of {name}. "
                "Answers come back once nodes serve them again (the swarm map shows the gap).")
    if isinstance(error, NoChainError):
        return (f"The swarm cannot answer right now: the nodes serving {name} are full or failing. "
                f"Try again in a minute. ({error})")
    if isinstance(error, ValueError) and "context" in str(error):
        return f"This conversation is too long for {name}: start a new chat. ({error})"
    if isinstance(error, ConnectionError | TimeoutError):
        return f"The swarm did not answer: a node stopped responding and no other took over. ({error})"
    return f"No answer, because of an error: {type(error).__name__}: {error}"
