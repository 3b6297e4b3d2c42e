"""The newest epoch this node has announced, which its next records must never go below.

Every peer drops a record older than the newest it has seen from the same peer id
(`node.serve.assignment.EpochTracker`), so a node that announced epoch 2, paused until its record
expired and then re-joined at the swarm's epoch 0 would be ignored by everyone who saw the 2, itself
included (issue 18). The node therefore joins at max(swarm's epoch, its own newest). A named identity
keeps its peer id across restarts, so for one the newest epoch is kept on disk too, next to the identity.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from node.model.checkpoint import layerhive_home

logger = logging.getLogger(__name__)


def epoch_file(identity: str) -> Path:
    return layerhive_home() / "identity" / f"{identity}.epoch"


class OwnEpoch:
    """The newest epoch announced under one peer id; kept in `path` when given (a named identity)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.newest = self._read() if path is not None else 0

    def note(self, epoch: int) -> None:
        """Remembers `epoch` if it is newer than any before; written to disk before it is announced."""
        if epoch <= self.newest:
            return
        self.newest = epoch
        if self.path is not None:
            self._write()

    def _read(self) -> int:
        try:
            value = json.loads(self.path.read_text()).get("newest_epoch", 0)
            return value if isinstance(value, int) and value >= 0 else 0
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, AttributeError) as e:  # a damaged file: the swarm's epoch still applies
            logger.warning("ignoring the unreadable epoch file %s: %s", self.path, e)
            return 0

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"newest_epoch": self.newest}))
            os.replace(tmp, self.path)  # atomic: a crash leaves the old value or the new one
        except OSError as e:
            logger.warning("could not keep the node's epoch in %s: %s", self.path, e)
