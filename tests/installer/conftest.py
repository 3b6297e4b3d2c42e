"""The installer tests' shared parts: the installer files built once per session from this checkout, and a
person's environment with an empty home (no display, no PYTHONPATH pointing at this checkout, the PATH a desktop
session has plus this Python, which the installer is told to use)."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from installer.build import build


@pytest.fixture(scope="session")
def installer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/layerhive-install.run (with its macOS and Windows siblings beside it), built from this checkout."""
    return build(tmp_path_factory.mktemp("dist"))


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A person's environment: their home, their pip settings (PIP_*), and nothing of this checkout."""
    kept = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("LANG", "LC_ALL", "TMPDIR")}
    path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    return {**kept, "HOME": str(home), "PATH": path, "LAYERHIVE_PYTHON": sys.executable, **extra}


def run_installer(installer: Path, env: dict[str, str], *args: str, timeout: float = 900
                  ) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(installer), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serves `directory` on 127.0.0.1 (e.g. with a package index's layout); yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
