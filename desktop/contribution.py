"""Lifetime contribution: what this computer has given the swarm, kept across launches.

The node's counters start at zero with every launch (node.app.controller.NodeStatus); this adds what
they gained since the last reading to totals kept in the state directory. Tokens of the user's own
chats that ran through this node are counted apart: they are not a contribution to others.

Checked credit (tokens whose outputs other peers verified, as BOINC grants credit only on a quorum)
comes with the trust issue: `checked_tokens` stays None, shown as "not checked yet", until then.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

from desktop.paths import state_dir
from node.app.controller import NodeStatus

logger = logging.getLogger(__name__)
SAVE_EVERY_S = 60.0


@dataclass
class Totals:
    tokens_for_others: int = 0
    tokens_for_own_chats: int = 0
    sessions_opened: int = 0  # by anyone, own chats included (a session's owner is known only per token)
    online_s: float = 0.0
    since: str = ""  # the day contributing started on this computer (ISO date)
    checked_tokens: int | None = None  # filled by the trust issue's verification once it lands


def totals_file() -> Path:
    return state_dir() / "contribution.json"


class LifetimeContribution:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or totals_file()
        self.totals = self._load()
        self._last: NodeStatus | None = None  # the reading the totals already include
        self._saved_at = time.monotonic()

    def add(self, status: NodeStatus) -> Totals:
        """Adds what the node's counters gained since the last call; saves now and then."""
        last = self._last
        gained = _gain(status.tokens_for_others, last.tokens_for_others if last else 0)
        own = _gain(status.own_tokens_served, last.own_tokens_served if last else 0)
        sessions = _gain(status.sessions_opened, last.sessions_opened if last else 0)
        online = _gain(status.online_s, last.online_s if last else 0.0)
        self._last = status
        if gained or own or sessions or online:
            totals = self.totals
            totals.tokens_for_others += gained
            totals.tokens_for_own_chats += own
            totals.sessions_opened += sessions
            totals.online_s += online
            if not totals.since and (gained or online):
                totals.since = date.today().isoformat()
            if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self.save()
        return self.totals

    def save(self) -> None:
        self._saved_at = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(self.totals), indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("could not save the contribution totals to %s: %s", self.path, e)

    def _load(self) -> Totals:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Totals()
        except (OSError, ValueError) as e:
            logger.warning("starting the contribution totals afresh: %s is unreadable (%s)", self.path, e)
            return Totals()
        values = {}
        for f in fields(Totals):  # a hand-edited or older file: keep what is well-formed, default the rest
            value = data.get(f.name) if isinstance(data, dict) else None
            if f.name == "since" and isinstance(value, str) and len(value) <= 10:
                values[f.name] = value
            elif isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                values[f.name] = float(value) if f.name == "online_s" else int(value)
        return Totals(**values)


def _gain(now: float, before: float) -> float:
    """What a counter gained; a counter that went down was restarted (a new controller), so all of it is new."""
    return now - before if now >= before else now


def describe(totals: Totals) -> str:
    """One line for the tray."""
    hours = totals.online_s / 3600
    text = f"Lifetime: {totals.tokens_for_others:,} tokens for others · {hours:.1f} h online"
    if totals.tokens_for_own_chats:
        text += f" (+{totals.tokens_for_own_chats:,} for your own chats)"
    return text
