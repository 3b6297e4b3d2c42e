"""Every process the project starts ends with its parent, and SIGINT/SIGTERM reach it.

Two ways, for two kinds of child:
- A child whose spawning thread waits for it (a DHT process's p2pd) dies with that thread:
  `die_with_spawner` (Linux's PR_SET_PDEATHSIG, in the child between fork and exec). The signal follows
  the spawning *thread*, so it suits only a spawner that outlives its child.
- A long-lived child started by a thread that may end first (a node of a local swarm, a DHT process forked
  from a worker thread by `node.client.session.connect`) watches its parent's pid instead
  (`watch_parent`): once re-parented, even after a SIGKILL of the parent, it stops itself, gracefully
  first. Node processes learn their parent from `PARENT_ENV` (`child_env`, `follow_parent_from_env`).
Signal masks and ignored signals are inherited through fork and exec (a parent blocked in `sigwait`
used to leave its nodes deaf to SIGTERM), so every project process starts with `default_signals`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)

PARENT_ENV = "LAYERHIVE_PARENT_PID"
CHECK_INTERVAL_S = 0.5
GRACE_S = 20.0  # how long a graceful stop may take once the parent is gone, before the hard way
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def default_signals() -> None:
    """SIGINT and SIGTERM unblocked in this thread and not ignored, whatever the parent left us."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child calls it between fork and exec
    return None


_prctl = _load_prctl()


def die_with_spawner() -> None:
    """A `preexec_fn`: the child gets SIGTERM when the thread that spawned it ends (Linux; elsewhere nothing),
    with SIGINT/SIGTERM unblocked. Only for children whose spawning thread waits for them."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def parent_gone(parent_pid: int) -> bool:
    """Whether the process `parent_pid` is no longer our parent (it died and we were re-parented)."""
    return os.getppid() != parent_pid or not psutil.pid_exists(parent_pid)


def watch_parent(on_orphan: Callable[[], None], *, parent_pid: int | None = None,
                 interval_s: float = CHECK_INTERVAL_S) -> threading.Thread:
    """Calls `on_orphan()` on a daemon thread once `parent_pid` (default: the current parent) is gone."""
    parent = parent_pid if parent_pid is not None else os.getppid()

    def watch() -> None:
        while not parent_gone(parent):
            time.sleep(interval_s)
        on_orphan()

    thread = threading.Thread(target=watch, name="layerhive-lifeline", daemon=True)
    thread.start()
    return thread


def kill_descendants() -> None:
    """SIGKILLs every process below this one (its DHT process, p2p daemons), e.g. before exiting the hard way."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def stop_self(grace_s: float = GRACE_S) -> None:
    """SIGTERM to this process (a node stops gracefully on it); if it still runs after `grace_s`, its
    descendants are killed and it exits."""
    logger.warning("the parent process is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    kill_descendants()
    os._exit(1)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a project process spawned by this one: it will stop when this process ends."""
    env = dict(os.environ if env is None else env)
    env[PARENT_ENV] = str(os.getpid())
    return env


def follow_parent_from_env(grace_s: float = GRACE_S) -> None:
    """In a process spawned with `child_env`: stop (`stop_self`) once the spawning process is gone."""
    value = os.environ.pop(PARENT_ENV, None)  # not passed on: our own children follow us, not our parent
    if not value or not value.isdigit():
        return
    watch_parent(lambda: stop_self(grace_s), parent_pid=int(value))
