"""The chat window: past conversations on the left, the transcript streaming the swarm's answer, a prompt line.

Each answer is signed with the model that gave it and its speed, and offers Copy and Show chain (the nodes
that computed it, layer range by layer range). Conversations are kept across launches (`desktop.history`).
Nothing here waits on the swarm: answers arrive as the bridge's queued signals."""

from __future__ import annotations

import html
from concurrent.futures import Future
from dataclasses import dataclass

from PySide6.QtCore import QCoreApplication, Qt, QUrl
from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from desktop.bridge import NodeBridge
from desktop.history import ChatHistory, StoredMessage, default_history_path
from desktop.icons import SERVING, hive_icon
from desktop.wording import describe_chain, model_label, plural
from node.app.controller import ChatReply
from node.client.chat import AnswerStats, Message
from node.model.sampling import SamplingParams

MUTED, ERROR = "#6b6f76", "#b3261e"


@dataclass
class Turn:
    role: str  # "user", "assistant", or "note": what the app says of an answer that did not come
    text: str
    stats: AnswerStats | None = None


def speed_text(stats: AnswerStats) -> str:
    """'24 tokens · 8.1 tokens/s · first after 0.9 s'."""
    parts = [plural(stats.tokens, "token")]
    if stats.tokens_per_s is not None:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    if stats.first_token_s is not None:
        parts.append(f"first after {stats.first_token_s:.1f} s")
    return " · ".join(parts)


def chain_html(stats: AnswerStats, own_peer_id: str | None) -> str:
    if not stats.chains:
        return "No chain recorded for this answer."
    lines = [f"Served by: {html.escape(describe_chain(stats.chains[0], own_peer_id))}"]
    lines += [f"then, after a node failed: {html.escape(describe_chain(chain, own_peer_id))}"
              for chain in stats.chains[1:]]
    return "<br>".join(lines)


def paragraphs(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def answer_header(model: str) -> str:
    return f"<p><b>Layerhive</b> <span style='color:{MUTED}'>· {html.escape(model)}</span></p>"


class ChatWindow(QWidget):
    def __init__(self, bridge: NodeBridge, *, history: ChatHistory | None = None,
                 sampling: SamplingParams | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.history = history if history is not None else ChatHistory(default_history_path())
        self.sampling = sampling or SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.9)
        self.model = model_label(bridge.controller.source.name)
        self.setWindowTitle(f"Layerhive chat · {self.model}")
        self.setWindowIcon(hive_icon(SERVING))
        self.resize(820, 640)
        self.messages: list[Message] = []  # what the model is sent: answered exchanges only
        self.turns: list[Turn] = []  # what the transcript shows
        self.conversation_id: int | None = None  # None until the first answer is stored
        self.chains_shown: set[int] = set()  # turns whose chain is unfolded
        self._answer: Future | None = None
        self._question = ""
        self._streamed: list[str] = []  # the pieces of the answer under way
        self._build()
        bridge.chat_text.connect(self._on_text)
        bridge.chat_progress.connect(self._on_progress)
        bridge.chat_done.connect(self._on_done)
        bridge.chat_failed.connect(self._on_failed)
        self._set_busy(False)
        self._list_conversations()
        self.prompt.setFocus()  # typing starts a question at once
        if (app := QCoreApplication.instance()) is not None:  # the history's log folded into its file at quit
            app.aboutToQuit.connect(self.history.close)
        if self.history.set_aside is not None:
            self.status_line.setText(f"The chat history could not be read; it was kept as {self.history.set_aside}.")

    def _build(self) -> None:
        self.new_chat_button = QPushButton("New chat")
        self.conversation_list = QListWidget()
        self.conversation_list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.conversation_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # titles elide
        self.conversation_list.setTextElideMode(Qt.TextElideMode.ElideRight)
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        side_layout.addWidget(self.new_chat_button)
        side_layout.addWidget(self.conversation_list, 1)

        self.model_line = QLabel(f"Model: <b>{html.escape(self.model)}</b>, run layer by layer by the swarm's nodes")
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)  # our links are actions: copy:N, chain:N
        self.transcript.setPlaceholderText("Ask anything: the swarm's nodes compute the answer together.")
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("Message")
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.status_line = QLabel()
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        row.addWidget(self.send_button)
        row.addWidget(self.stop_button)
        main = QWidget()
        main_layout = QVBoxLayout(main)
        main_layout.setContentsMargins(0, 0, 0, 0)
        main_layout.addWidget(self.model_line)
        main_layout.addWidget(self.transcript, 1)
        main_layout.addLayout(row)
        main_layout.addWidget(self.status_line)

        splitter = QSplitter()
        splitter.addWidget(side)
        splitter.addWidget(main)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([200, 620])
        QVBoxLayout(self).addWidget(splitter)

        self.prompt.returnPressed.connect(self.send)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.new_chat_button.clicked.connect(self.new_chat)
        self.transcript.anchorClicked.connect(self._on_link)
        self.conversation_list.itemClicked.connect(self._on_conversation_clicked)
        self.conversation_list.customContextMenuRequested.connect(self._conversation_menu)
        QShortcut(QKeySequence("Ctrl+N"), self, self.new_chat)
        QShortcut(QKeySequence("Ctrl+W"), self, self.close)

    @property
    def busy(self) -> bool:
        return self._answer is not None

    # --- asking -----------------------------------------------------------------------------------------

    def send(self) -> None:
        text = self.prompt.text().strip()
        if not text or self.busy:
            return
        self.prompt.clear()
        self._question = text
        self.messages.append(Message("user", text))
        self.turns.append(Turn("user", text))
        self._render(answering=True)
        self._set_busy(True)
        self._streamed = []
        self._answer = self.bridge.chat(list(self.messages), self.sampling)

    def stop(self) -> None:
        if self._answer is not None:
            self._answer.cancel()

    def _on_text(self, piece: str) -> None:
        if self._answer is None:  # queued by the swarm thread before Stop reached it: the answer has ended
            return
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        if not self._streamed:  # the answer's own paragraph under its header, in plain text, not the header's grey
            cursor.insertBlock(cursor.blockFormat(), QTextCharFormat())
        self._streamed.append(piece)
        cursor.insertText(piece)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def _on_progress(self, stats: AnswerStats) -> None:
        if self._answer is not None:
            self.status_line.setText(f"Answering through the swarm: {speed_text(stats)}")

    def _on_done(self, reply: ChatReply) -> None:
        if self._answer is None:
            return
        self.messages.append(Message("assistant", reply.text))
        self.turns.append(Turn("assistant", reply.text, reply.stats))
        self._store(reply)
        self._finish()

    def _on_failed(self, reason: str) -> None:
        if self._answer is None:
            return
        self.messages.pop()  # the question goes unanswered: do not send it as context next time
        partial = "".join(self._streamed).strip()
        if partial:  # what arrived of an answer stopped or broken: still shown, not sent as context
            self.turns.append(Turn("assistant", partial))
        self.turns.append(Turn("note", "(stopped)" if reason == "stopped" else reason))
        self._finish()

    def _finish(self) -> None:
        self._answer = None
        self._set_busy(False)
        self._render()

    def _store(self, reply: ChatReply) -> None:
        if self.conversation_id is None:
            self.conversation_id = self.history.start_conversation(self._question)
        self.history.add(self.conversation_id, [StoredMessage("user", self._question),
                                                StoredMessage("assistant", reply.text, reply.stats)])
        self._list_conversations()

    # --- the transcript ---------------------------------------------------------------------------------

    def _render(self, answering: bool = False) -> None:
        """Draws every turn again (a question, an answer's end, a fold), and the header of the answer under way
        if `answering`: the scroll position stays where the user left it, unless it was at the end."""
        bar = self.transcript.verticalScrollBar()
        at_end, position = bar.value() >= bar.maximum() - 4, bar.value()
        turns = "".join(self._turn_html(index, turn) for index, turn in enumerate(self.turns))
        self.transcript.setHtml(turns + (answer_header(self.model) if answering else ""))
        bar.setValue(bar.maximum() if at_end else position)

    def _turn_html(self, index: int, turn: Turn) -> str:
        if turn.role == "user":
            return f"{'<hr>' if index else ''}<p><b>You</b></p><p>{paragraphs(turn.text)}</p>"
        if turn.role == "note":
            return f"<p style='color:{ERROR}'><i>{paragraphs(turn.text)}</i></p>"
        parts = [answer_header(model_label(turn.stats.model) if turn.stats else self.model),
                 f"<p>{paragraphs(turn.text)}</p>"]
        links = [f"<a href='copy:{index}'>Copy</a>"]
        if turn.stats is not None:
            folded = index not in self.chains_shown
            links.append(f"<a href='chain:{index}'>{'Show chain' if folded else 'Hide chain'}</a>")
            parts.append(f"<p style='color:{MUTED}'>{speed_text(turn.stats)} · {' · '.join(links)}</p>")
            if not folded:
                parts.append(f"<p style='color:{MUTED}'>{chain_html(turn.stats, self.bridge.status().peer_id)}</p>")
        else:
            parts.append(f"<p style='color:{MUTED}'>{links[0]}</p>")
        return "".join(parts)

    def _on_link(self, url: QUrl) -> None:
        action, _, index = url.toString().partition(":")
        if not index.isdigit() or int(index) >= len(self.turns):
            return
        turn = self.turns[int(index)]
        if action == "copy":
            QGuiApplication.clipboard().setText(turn.text)
            self.status_line.setText("Answer copied.")
        elif action == "chain":
            self.chains_shown ^= {int(index)}
            self._render()

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.new_chat_button.setEnabled(not busy)
        self.conversation_list.setEnabled(not busy)
        if busy:
            self.status_line.setText("Answering through the swarm: finding a chain of nodes…")
        elif self.status_line.text().startswith("Answering"):
            self.status_line.setText("")

    # --- conversations ----------------------------------------------------------------------------------

    def new_chat(self) -> None:
        if self.busy:
            return
        self.conversation_id = None
        self.messages, self.turns, self.chains_shown = [], [], set()
        self.conversation_list.clearSelection()
        self._render()
        self.prompt.setFocus()

    def open_conversation(self, conversation_id: int) -> None:
        if self.busy:
            return
        stored = self.history.messages(conversation_id)
        self.conversation_id = conversation_id
        self.messages = [Message(m.role, m.content) for m in stored]
        self.turns = [Turn(m.role, m.content, m.stats) for m in stored]
        self.chains_shown = set()
        self._render()

    def delete_conversation(self, conversation_id: int) -> None:
        self.history.delete(conversation_id)
        if conversation_id == self.conversation_id:
            self.new_chat()
        self._list_conversations()

    def _list_conversations(self) -> None:
        self.conversation_list.clear()
        for conversation in self.history.conversations():
            item = QListWidgetItem(conversation.title)
            item.setData(Qt.ItemDataRole.UserRole, conversation.id)
            item.setToolTip(conversation.title)
            self.conversation_list.addItem(item)
            item.setSelected(conversation.id == self.conversation_id)

    def _on_conversation_clicked(self, item: QListWidgetItem) -> None:
        self.open_conversation(item.data(Qt.ItemDataRole.UserRole))

    def _conversation_menu(self, point) -> None:
        item = self.conversation_list.itemAt(point)
        if item is None:
            return
        menu = QMenu(self)
        menu.addAction("Delete conversation").triggered.connect(
            lambda: self.delete_conversation(item.data(Qt.ItemDataRole.UserRole)))
        menu.exec(self.conversation_list.mapToGlobal(point))
