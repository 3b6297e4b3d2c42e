"""One app per user: a second launch asks the first to show itself, then ends (it must not start a second
node, nor a second demo swarm).

A file lock in the state directory decides who is first (the OS drops it when the process dies, so a
crash leaves no stale lock); the first also listens on a local socket, on which a later launch says "show".
"""

from __future__ import annotations

import hashlib
import logging

from filelock import FileLock, Timeout
from PySide6.QtCore import QObject, Signal
from PySide6.QtNetwork import QLocalServer, QLocalSocket

from desktop.paths import state_dir

logger = logging.getLogger(__name__)
SHOW = b"show\n"


def _server_name() -> str:
    """Per state directory, so two users (or two test sandboxes) never meet."""
    return "layerhive-app-" + hashlib.sha256(str(state_dir().resolve()).encode()).hexdigest()[:16]


class SingleInstance(QObject):
    activated = Signal()  # another launch asked this one to show itself

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        path = state_dir() / "app.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path))
        self._server: QLocalServer | None = None

    def acquire(self) -> bool:
        """True: this is the only instance (and now listens for later ones). False: another one runs, and
        was asked to show itself."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self._ask_first_to_show()
            return False
        QLocalServer.removeServer(_server_name())  # a socket file left by a crash
        self._server = QLocalServer(self)
        self._server.newConnection.connect(self._on_connection)
        if not self._server.listen(_server_name()):
            logger.warning("cannot listen for later launches: %s", self._server.errorString())
        return True

    def release(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._lock.is_locked:
            self._lock.release()

    def _on_connection(self) -> None:
        while self._server is not None and (socket := self._server.nextPendingConnection()) is not None:
            socket.readyRead.connect(lambda s=socket: self._read(s))
            socket.disconnected.connect(socket.deleteLater)

    def _read(self, socket: QLocalSocket) -> None:
        if bytes(socket.readAll().data()).startswith(SHOW.strip()):  # anything else from anyone is ignored
            self.activated.emit()
        socket.disconnectFromServer()

    @staticmethod
    def _ask_first_to_show() -> None:
        socket = QLocalSocket()
        socket.connectToServer(_server_name())
        if socket.waitForConnected(2000):
            socket.write(SHOW)
            socket.waitForBytesWritten(2000)
            socket.disconnectFromServer()
        else:
            logger.warning("another Layerhive runs but did not answer: %s", socket.errorString())
