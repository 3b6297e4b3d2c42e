"""The chat window and the swarm map on a real local swarm of a tiny model (Qt offscreen, hivemind on loopback):
answers streamed with their model, speed and chain; history across launches; a gap in the swarm said plainly."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from desktop.bridge import NodeBridge
from desktop.chat_window import MUTED, ChatWindow
from desktop.history import ChatHistory
from desktop.swarm_map import SwarmMapWindow, describe_node
from desktop.wording import describe_chain, model_label
from node.app.controller import NodeController
from node.client.chat import Message
from node.model.sampling import SamplingParams
from node.net.membership import open_dht
from node.serve.node import NodeConfig
from tests.desktop.helpers import headless_answer, wait_until

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_new_tokens=12)
QUESTION = "hello what is the capital of paris"


def online(bridge: NodeBridge) -> NodeBridge:
    if bridge.status().state != "online":
        bridge.start().result(timeout=90)
    return bridge


def ask(window: ChatWindow, text: str, timeout_s: float = 60) -> None:
    window.prompt.setText(text)
    QTest.mouseClick(window.send_button, Qt.MouseButton.LeftButton)
    assert window.busy and not window.send_button.isEnabled() and window.prompt.text() == ""
    wait_until(lambda: not window.busy, timeout_s, "the answer")


def click_link(window: ChatWindow, text: str, occurrence: int = -1) -> None:
    """Clicks the link `text` in the transcript with the mouse, where it is drawn (the last one by default)."""
    found, cursor = [], window.transcript.document().find(text)
    while not cursor.isNull():
        found.append(cursor)
        cursor = window.transcript.document().find(text, cursor)
    assert found, f"no {text!r} in the transcript"
    inside = found[occurrence]
    inside.setPosition(inside.selectionStart() + 2)
    window.transcript.setTextCursor(inside)
    window.transcript.ensureCursorVisible()
    point = window.transcript.cursorRect(inside).center()
    QTest.mouseClick(window.transcript.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, point)


def test_an_answer_comes_with_its_model_speed_and_chain_and_stays_across_launches(hive, tmp_path):
    swarm, bridge = hive
    online(bridge)
    history_path = tmp_path / "chats.sqlite"
    window = ChatWindow(bridge, history=ChatHistory(history_path), sampling=GREEDY)
    window.show()
    model = model_label(swarm.source.name)
    assert model in window.windowTitle() and model in window.model_line.text()
    lines_while_answering: list[str] = []
    bridge.chat_progress.connect(lambda _stats: lines_while_answering.append(window.status_line.text()))
    streamed_colors = set()  # of the text as it streams in, not the header's grey
    bridge.chat_text.connect(lambda _piece: streamed_colors.add(
        window.transcript.textCursor().charFormat().foreground().color().name()))
    ask(window, QUESTION)

    expected = headless_answer(swarm.initial_peers, swarm.source.name, [Message("user", QUESTION)], GREEDY)
    reply = bridge.last_reply
    assert expected and reply.text == expected
    assert window.messages == [Message("user", QUESTION), Message("assistant", expected)]
    stats = reply.stats
    assert stats.model == swarm.source.name and 1 <= stats.tokens <= GREEDY.max_new_tokens
    assert any(line.endswith("tokens/s") or "tokens/s ·" in line for line in lines_while_answering)  # mid-answer
    assert streamed_colors and MUTED not in streamed_colors
    shown = window.transcript.toPlainText()
    assert expected in shown and f"{stats.tokens} tokens · {stats.tokens_per_s:.1f} tokens/s" in shown
    assert "Show chain" in shown and "Served by" not in shown and window.status_line.text() == ""

    chain = stats.chains[-1]  # one chain over the model's 4 layers, through nodes the swarm lists
    assert len(stats.chains) == 1 and chain[0].start == 0 and chain[-1].end == 4
    assert all(a.end == b.start for a, b in zip(chain, chain[1:], strict=False))
    swarm_peers = {node["peer_id"] for node in bridge.controller.swarm_status().result(timeout=30)["nodes"]}
    assert {hop.node_id for hop in chain} <= swarm_peers
    click_link(window, "Show chain")
    served_by = f"Served by: {describe_chain(chain, bridge.status().peer_id)}"
    assert served_by in window.transcript.toPlainText() and "Hide chain" in window.transcript.toPlainText()
    window.grab().save(str(tmp_path / "chat.png"))
    click_link(window, "Hide chain")
    assert "Served by" not in window.transcript.toPlainText()
    QGuiApplication.clipboard().clear()
    click_link(window, "Copy")
    assert QGuiApplication.clipboard().text() == expected and window.status_line.text() == "Answer copied."
    window.close()

    relaunched = ChatWindow(bridge, history=ChatHistory(history_path), sampling=GREEDY)  # the next launch
    relaunched.show()
    assert relaunched.turns == [] and relaunched.conversation_list.count() == 1
    item = relaunched.conversation_list.item(0)
    assert item.text() == QUESTION
    QTest.mouseClick(relaunched.conversation_list.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     relaunched.conversation_list.visualItemRect(item).center())
    assert relaunched.messages == window.messages and relaunched.turns[1].stats == stats  # chain and all
    click_link(relaunched, "Show chain")
    assert served_by in relaunched.transcript.toPlainText()

    ask(relaunched, "what is the capital")  # goes on with the old conversation as context
    assert len(relaunched.messages) == 4 and relaunched.conversation_list.count() == 1
    assert len(ChatHistory(history_path).messages(relaunched.conversation_id)) == 4

    QTest.mouseClick(relaunched.new_chat_button, Qt.MouseButton.LeftButton)
    assert relaunched.messages == [] and relaunched.transcript.toPlainText() == ""
    ask(relaunched, "hi")
    assert relaunched.messages[0] == Message("user", "hi")  # a fresh context
    assert [c.title for c in ChatHistory(history_path).conversations()] == ["hi", QUESTION]
    relaunched.delete_conversation(relaunched.conversation_id)
    assert relaunched.conversation_list.count() == 1 and relaunched.turns == []
    relaunched.close()


def test_stop_ends_the_answer_keeps_what_came_and_forgets_the_question(hive, tmp_path):
    _, bridge = hive
    online(bridge)
    never_stops = SamplingParams(max_new_tokens=200, stop_token_ids=(-1,))  # no token ends it early
    window = ChatWindow(bridge, history=ChatHistory(tmp_path / "chats.sqlite"), sampling=never_stops)
    pieces: list[str] = []
    bridge.chat_text.connect(lambda piece: (pieces.append(piece), window.stop() if len(pieces) == 2 else None))
    window.prompt.setText(QUESTION)
    window.send()
    wait_until(lambda: not window.busy, 60, "the stop")
    assert window.transcript.toPlainText().endswith("(stopped)")
    assert window.messages == [] and window.send_button.isEnabled()
    assert 2 <= len(pieces) < 200 and window.turns[1].text == "".join(window._streamed).strip()
    assert window.history.conversations() == []  # nothing answered, nothing stored


def test_the_map_shows_every_node_this_one_and_the_last_answers_chain(hive, tmp_path):
    swarm, bridge = hive
    online(bridge)
    window = SwarmMapWindow(bridge, refresh_ms=500)
    window.show()
    own = bridge.status().peer_id
    # The app's node serves 0:2 beside the local swarm's 0:2 and 2:4: two rows, 0:2 twice over.
    wait_until(lambda: window.view.snapshot is not None and len(window.view.snapshot.nodes) == 3, 60,
               "the three nodes on the map")
    snapshot = window.view.snapshot
    assert snapshot.replicas_per_layer == (2, 2, 1, 1) and snapshot.uncovered_layers == []
    assert sorted(len(row) for row in window.view.rows) == [1, 2]
    summary = window.summary.text()
    assert "4 layers · 3 nodes serving · 1–2 replicas per layer" in summary
    assert "your node serves layers 0–1" in summary and not window.gap_warning.isVisible()
    assert "last answer's chain" in window.legend.text() and "0: not served" in window.legend.text()

    done = []
    bridge.chat_done.connect(done.append)
    bridge.chat([Message("user", QUESTION)], GREEDY)
    wait_until(lambda: done, 60, "an answer")
    assert window.view.chain == done[0].stats.chains[-1]  # highlighted as soon as the answer is in
    QApplication.processEvents()
    window.repaint()  # paints, recording where each bar went
    mine = next(rect for rect, node in window.view._bars if node.peer_id == own)
    node = window.view.node_at(mine.center().toPoint())
    raw = next(n for n in window.view.snapshot.nodes if n.peer_id == own)
    assert node == raw and describe_node(node, True).startswith(f"This node (yours) {own}\nonline, layers 0–1")
    assert ("speed unmeasured" in describe_node(node, True)) == (node.layer_latency_ms is None)
    window.grab().save(str(tmp_path / "swarm_map.png"))

    bridge.pause().result(timeout=90)  # the paused node leaves the map at the next read
    wait_until(lambda: len(window.view.snapshot.nodes) == 2, 60, "the paused node gone from the map")
    assert window.view.snapshot.replicas_per_layer == (1, 1, 1, 1)
    assert "1 replica per layer" in window.summary.text() and "your node is paused" in window.summary.text()
    bridge.resume().result(timeout=90)
    window.close()


@pytest.fixture(scope="module")
def half_swarm(tiny_checkpoint, app):
    """A swarm where only layers 0:2 of the 4 are served, by the app's own node."""
    path = str(tiny_checkpoint("llama", num_layers=4))
    bootstrap = open_dht([], ["/ip4/127.0.0.1/tcp/0"])
    peers = [str(m) for m in bootstrap.get_visible_maddrs()]
    bridge = NodeBridge(NodeController(path, NodeConfig(start=0, end=2, initial_peers=peers, bench=False,
                                                        ttl_s=6.0)), poll_ms=200)
    try:
        bridge.start().result(timeout=90)
        yield bridge
    finally:
        bridge.stop().result(timeout=60)
        bootstrap.shutdown()


def test_a_gap_in_the_swarm_is_said_plainly_in_the_chat_and_on_the_map(half_swarm, tmp_path):
    window = ChatWindow(half_swarm, history=ChatHistory(tmp_path / "chats.sqlite"), sampling=GREEDY)
    window.show()
    ask(window, QUESTION, timeout_s=90)
    note = window.turns[-1]
    model = model_label(half_swarm.controller.source.name)
    assert note.role == "note" and note.text.startswith(
        f"The swarm cannot answer right now: no node serves layers 2–3 of {model}.")
    assert "Traceback" not in window.transcript.toPlainText() and window.messages == []
    assert window.send_button.isEnabled()

    swarm_map = SwarmMapWindow(half_swarm, refresh_ms=500)
    swarm_map.show()
    wait_until(lambda: swarm_map.view.snapshot is not None, 60, "the swarm on the map")
    assert swarm_map.view.snapshot.uncovered_layers == [2, 3]
    assert swarm_map.gap_warning.isVisible()
    assert swarm_map.gap_warning.text().startswith("Gap: no online node serves layers 2–3.")
    swarm_map.grab().save(str(tmp_path / "gap.png"))
    swarm_map.close()
    window.close()
