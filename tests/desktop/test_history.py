"""The chat history store: real sqlite files in a temporary directory."""

from __future__ import annotations

import os
import sqlite3
import stat

from desktop.history import SCHEMA_VERSION, ChatHistory, StoredMessage, stats_from_json, stats_to_json, title_for
from node.client.chat import AnswerStats
from swarm.types import Hop

STATS = AnswerStats(model="HuggingFaceTB/SmolLM2-135M-Instruct", tokens=24, elapsed_s=3.5, first_token_s=0.8,
                    tokens_per_s=8.9, chains=((Hop("QmA", 0, 15), Hop("QmB", 15, 30)), (Hop("QmC", 0, 30),)))


def exchange(question: str, answer: str, stats: AnswerStats | None = STATS) -> list[StoredMessage]:
    return [StoredMessage("user", question), StoredMessage("assistant", answer, stats)]


def test_conversations_survive_a_reopen_with_their_figures(tmp_path):
    path = tmp_path / "data" / "chats.sqlite"
    history = ChatHistory(path)
    first = history.start_conversation("What is a transformer layer?")
    history.add(first, exchange("What is a transformer layer?", "A block of attention and an MLP."))
    second = history.start_conversation("Hi")
    history.add(second, exchange("Hi", "Hello!", stats=None))
    history.add(first, exchange("And a KV cache?", "The keys and values kept per token."))
    history.close()

    reopened = ChatHistory(path)
    assert reopened.set_aside is None
    assert [(c.id, c.title) for c in reopened.conversations()] == [(first, "What is a transformer layer?"),
                                                                  (second, "Hi")]  # the newest first
    messages = reopened.messages(first)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "What is a transformer layer?"), ("assistant", "A block of attention and an MLP."),
        ("user", "And a KV cache?"), ("assistant", "The keys and values kept per token.")]
    assert messages[1].stats == STATS and messages[0].stats is None  # chains and all, as they were
    assert reopened.messages(second)[1].stats is None


def test_the_file_is_the_users_alone(tmp_path):
    ChatHistory(tmp_path / "chats.sqlite").close()
    assert stat.S_IMODE(os.stat(tmp_path / "chats.sqlite").st_mode) == 0o600


def test_delete_removes_the_conversation_and_its_messages(tmp_path):
    history = ChatHistory(tmp_path / "chats.sqlite")
    kept, gone = history.start_conversation("kept"), history.start_conversation("gone")
    history.add(kept, exchange("kept", "yes"))
    history.add(gone, exchange("gone", "no"))
    history.delete(gone)
    assert [c.id for c in history.conversations()] == [kept]
    assert history.messages(gone) == []
    rows = history._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert rows == 2


def test_an_unreadable_file_is_set_aside_not_lost(tmp_path):
    path = tmp_path / "chats.sqlite"
    path.write_bytes(b"this is not a database, but someone's chats might be in here" * 100)
    history = ChatHistory(path)
    assert history.set_aside is not None and history.set_aside.read_bytes().startswith(b"this is not a database")
    assert history.conversations() == []  # a new, working store
    history.add(history.start_conversation("again"), exchange("again", "fine"))
    assert len(ChatHistory(path).conversations()) == 1


def test_a_file_from_a_newer_version_is_set_aside(tmp_path):
    path = tmp_path / "chats.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    history = ChatHistory(path)
    assert history.set_aside is not None and history.set_aside.exists()


def test_damaged_figures_lose_the_figures_not_the_answer(tmp_path):
    assert stats_from_json(stats_to_json(STATS)) == STATS
    assert stats_from_json('{"model": "m", "tokens": "many"') is None  # cut short
    assert stats_from_json('{"model": "m"}') is None  # fields missing
    assert stats_from_json('{"chains": [[{"node_id": "x"}]]}') is None
    history = ChatHistory(tmp_path / "chats.sqlite")
    conversation = history.start_conversation("q")
    history.add(conversation, exchange("q", "the answer"))
    history._db.execute("UPDATE messages SET details = '{broken' WHERE role = 'assistant'")
    history._db.commit()
    assert history.messages(conversation)[1] == StoredMessage("assistant", "the answer", None)


def test_titles_are_one_line_and_short():
    assert title_for("  What\nis   this? ") == "What is this?"
    long = "Explain pipeline parallelism over a swarm of volunteers, with an example of three nodes"
    title = title_for(long)
    assert title.endswith("…") and len(title) <= 61 and long.startswith(title[:-1])
