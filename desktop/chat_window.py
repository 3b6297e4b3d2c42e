"""The chat window: a transcript that streams the swarm's answer, a prompt line, Send and Stop."""

from __future__ import annotations

import html
from concurrent.futures import Future

from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from desktop.bridge import NodeBridge
from desktop.icons import SERVING, hive_icon
from node.client.chat import Message
from node.model.sampling import SamplingParams


class ChatWindow(QWidget):
    def __init__(self, bridge: NodeBridge, *, sampling: SamplingParams | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.sampling = sampling or SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.9)
        self.setWindowTitle("Layerhive chat")
        self.setWindowIcon(hive_icon(SERVING))
        self.resize(560, 640)
        self.messages: list[Message] = []
        self._answer: Future | None = None

        self.transcript = QTextBrowser()
        self.transcript.setPlaceholderText("Ask anything: the answer comes from volunteers' GPUs across the swarm.")
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("Message")
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.status_line = QLabel()
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        row.addWidget(self.send_button)
        row.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(row)
        layout.addWidget(self.status_line)

        self.prompt.returnPressed.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        bridge.chat_text.connect(self._on_text)
        bridge.chat_done.connect(self._on_done)
        bridge.chat_failed.connect(self._on_failed)
        self._set_busy(False)

    @property
    def busy(self) -> bool:
        return self._answer is not None

    def send(self) -> None:
        text = self.prompt.text().strip()
        if not text or self.busy:
            return
        self.prompt.clear()
        self.messages.append(Message("user", text))
        if not self.transcript.document().isEmpty():
            self.transcript.textCursor().insertBlock()  # else the new turn would run on from the last answer
            self._append_html("<br>")
        self._append_html(f"<b>You</b><br>{html.escape(text)}<br><br><b>Layerhive</b><br>")
        self._set_busy(True)
        self._answer = self.bridge.chat(list(self.messages), self.sampling)

    def stop(self) -> None:
        if self._answer is not None:
            self._answer.cancel()

    def _on_text(self, piece: str) -> None:
        if self._answer is None:  # queued by the swarm thread before Stop reached it: the answer has ended
            return
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(piece)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def _on_done(self, answer: str) -> None:
        self.messages.append(Message("assistant", answer))
        self._finish("")

    def _on_failed(self, reason: str) -> None:
        self.messages.pop()  # the question goes unanswered: do not send it as context next time
        self._finish(f"({'stopped' if reason == 'stopped' else 'no answer: ' + reason})")

    def _finish(self, note: str) -> None:
        if note:
            self._append_html(f"<br><i>{html.escape(note)}</i>")
        self._answer = None
        self._set_busy(False)

    def _append_html(self, fragment: str) -> None:
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertHtml(fragment)
        self.transcript.setTextCursor(cursor)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.status_line.setText("answering through the swarm..." if busy else "")
