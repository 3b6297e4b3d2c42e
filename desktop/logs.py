"""The app's log: a rotating file in the state directory, which "Open log" in the tray shows.

A tray app started from a menu or at login has no terminal, so everything that would have gone to one
goes here: our loggers, hivemind's (`route_hivemind`: it otherwise keeps its own handler), uncaught
exceptions on any thread, and a fault trace if the process crashes hard (crash.log beside it). A
terminal, when there is one, gets a copy.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO

from desktop.paths import log_file

MAX_BYTES = 2_000_000
BACKUPS = 3  # at most 8 MB of logs on disk
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("desktop")
_crash_file: TextIO | None = None  # kept open for faulthandler, which writes to it from a signal handler
# Told of every uncaught exception, with a line for the user (called on the thread that raised: a Qt app
# should re-emit it as a signal).
uncaught_listeners: list[Callable[[str], None]] = []


def setup_logging(path: Path | None = None, *, level: int = logging.INFO) -> Path:
    """Sends every log record to the rotating file at `path` (default: `log_file()`); returns the path."""
    global _crash_file
    path = path or log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "layerhive_app", False)]:  # set up once per process
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS,
                                                           encoding="utf-8")]
    if sys.stderr is not None and sys.stderr.isatty():
        handlers.append(logging.StreamHandler())
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.layerhive_app = True
        root.addHandler(handler)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback,
                                                      where=f"thread {args.thread.name if args.thread else '?'}")
    if _crash_file is None:
        _crash_file = open(path.with_name("crash.log"), "a", encoding="utf-8")  # noqa: SIM115 (lives on)
        faulthandler.enable(file=_crash_file)
    return path


def route_hivemind() -> None:
    """Sends hivemind's records to our handlers instead of its own stderr handler. Apart from `setup_logging`
    because importing hivemind takes seconds (it imports torch), and the first window must not wait for it."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")


def _log_uncaught(exc_type, exc_value, exc_traceback, where: str = "the main thread") -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)
        return
    logger.critical("uncaught exception in %s", where, exc_info=(exc_type, exc_value, exc_traceback))
    for listener in list(uncaught_listeners):
        try:
            listener(f"{exc_type.__name__}: {exc_value}")
        except Exception:  # a broken listener must not hide the original error
            logger.exception("an uncaught-exception listener failed")
