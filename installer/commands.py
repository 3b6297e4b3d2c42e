"""Running the installer's subprocesses (venv, pip) with their output in the log, not on the screen: the person
sees what is being fetched as a passing detail, and pip's ERROR lines if it fails. Cancel-aware: a cancel
terminates the running command at once.

Standard library only.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
from collections import deque
from collections.abc import Sequence

from installer.progress import Progress

_COLLECTING = re.compile(r"^(?:Collecting|Downloading|Obtaining|Processing)\s+(\S+)(?:\s+\((.+)\))?")


class InstallError(RuntimeError):
    """A step failed in a way the person can understand; the message says what and what to do."""


def pip_install(python: str) -> list[str]:
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]


def run_logged(command: Sequence[str], progress: Progress, *, what: str, span: tuple[float, float] | None = None,
               env: dict[str, str] | None = None) -> None:
    """Runs `command` with its output in the log; each package pip collects moves the bar through `span`."""
    progress.log.write("$ " + " ".join(command))
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", stdin=subprocess.DEVNULL,
                               env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True, name="installer-output").start()
    errors: deque[str] = deque(maxlen=3)
    try:
        _follow(lines, progress, errors, span)
    except BaseException:  # cancelled (also by a signal, raised right here): the command must not run on
        _end(process)
        raise
    if process.wait() != 0:
        said = ("\n  ".join([""] + list(errors))) if errors else ""
        raise InstallError(f"{what} failed (exit code {process.returncode}).{said}")


def _follow(lines: queue.Queue, progress: Progress, errors: deque[str], span: tuple[float, float] | None) -> None:
    """Logs the command's output until it ends, keeping pip's ERROR lines and showing what it fetches."""
    collected = 0
    while True:
        progress.check()
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            return
        progress.log.write("  " + line)
        if line.startswith("ERROR:"):
            errors.append(line[len("ERROR:"):].strip())
        match = _COLLECTING.match(line)
        if match:
            collected += 1
            size = f" ({match.group(2)})" if match.group(2) else ""
            progress.detail(f"{match.group(1).rsplit('/', 1)[-1]}{size}")
            if span:  # no total is known in advance: approach the end of the span, never reach it
                progress.advance(span[0] + (span[1] - span[0]) * (1 - 0.95 ** collected))


def _pump(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _end(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
