"""Conversations kept across launches: one sqlite file in the user's data directory
(`default_history_path`: ~/.local/share/Layerhive/chats.sqlite on Linux), readable by the user only.

A conversation is stored once its first question is answered; each answer keeps its figures (model, tokens,
speed, the chains that served it) so that a conversation opened again shows them as they were. A file that
cannot be read (damaged, or written by a newer version) is set aside under another name, never deleted,
and a new one is started."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from node.client.chat import AnswerStats
from swarm.types import Hop

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    details TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
TITLE_CHARS = 60


@dataclass(frozen=True)
class StoredMessage:
    role: str  # "user" | "assistant"
    content: str
    stats: AnswerStats | None = None  # an answer's figures


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    updated: float  # seconds since the epoch


def default_history_path() -> Path:
    """The user's data directory (Qt's GenericDataLocation: ~/.local/share, %LOCALAPPDATA%, ~/Library/Application
    Support) / Layerhive / chats.sqlite."""
    from PySide6.QtCore import QStandardPaths

    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)
    return Path(base or Path.home() / ".local" / "share") / "Layerhive" / "chats.sqlite"


def title_for(question: str) -> str:
    """A conversation's title: its first question, on one line, cut at a word."""
    line = " ".join(question.split())
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


class ChatHistory:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.set_aside: Path | None = None  # where an unreadable file went, for the window to say so
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            self.set_aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            logger.warning("the chat history %s cannot be read (%s); kept as %s, a new one started",
                           self.path, e, self.set_aside)
            self.path.rename(self.set_aside)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        db = sqlite3.connect(self.path)
        try:
            if fresh:
                os.chmod(self.path, 0o600)  # questions are private
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer Layerhive (schema {version})")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")  # a commit appends to the log: no fsync of the whole file
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.commit()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def conversations(self, limit: int = 500) -> list[Conversation]:
        """The newest first."""
        rows = self._db.execute("SELECT id, title, updated FROM conversations ORDER BY updated DESC, id DESC LIMIT ?",
                                (limit,))
        return [Conversation(*row) for row in rows]

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._db.execute("SELECT role, content, details FROM messages WHERE conversation_id = ? ORDER BY id",
                                (conversation_id,))
        return [StoredMessage(role, content, stats_from_json(details)) for role, content, details in rows]

    def start_conversation(self, first_question: str) -> int:
        now = time.time()
        with self._db:
            cursor = self._db.execute("INSERT INTO conversations (title, created, updated) VALUES (?, ?, ?)",
                                      (title_for(first_question), now, now))
        return int(cursor.lastrowid)

    def add(self, conversation_id: int, messages: Sequence[StoredMessage]) -> None:
        """Appends messages (a question and its answer) in one transaction: both or neither."""
        with self._db:
            self._db.executemany(
                "INSERT INTO messages (conversation_id, role, content, details) VALUES (?, ?, ?, ?)",
                [(conversation_id, m.role, m.content, stats_to_json(m.stats)) for m in messages])
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id))

    def delete(self, conversation_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def close(self) -> None:
        self._db.close()


def stats_to_json(stats: AnswerStats | None) -> str | None:
    return None if stats is None else json.dumps(asdict(stats))


def stats_from_json(text: str | None) -> AnswerStats | None:
    """The figures stored with an answer; None if there are none or they cannot be read (the text still shows)."""
    if not text:
        return None
    try:
        fields = json.loads(text)
        chains = tuple(tuple(Hop(str(h["node_id"]), int(h["start"]), int(h["end"])) for h in chain)
                       for chain in fields.pop("chains"))
        return AnswerStats(**fields, chains=chains)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        logger.warning("unreadable figures of a stored answer: %s", e)
        return None
