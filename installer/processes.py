"""The installed app's running processes, and stopping them (before an update or an uninstall).

A process belongs to the install when its program or script is inside the install's root: the tray app
(`venv/bin/python venv/bin/layerhive-app`), the node processes of its demo swarm (`venv/bin/python -m ...`),
and everything those started (p2pd daemons, pip), found through parent ids. They get SIGTERM first (the app
then leaves the swarm cleanly and stops its children), and SIGKILL if still running after the grace period.

Standard library only: /proc on Linux, `ps` on macOS, PowerShell on Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def list_processes() -> list[Process]:
    if sys.platform.startswith("linux"):
        return _from_proc()
    if sys.platform == "win32":
        return _from_powershell()
    return _from_ps()


def _from_proc() -> list[Process]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # after "(comm)", which may hold spaces
        found.append(Process(int(entry.name), ppid, tuple(a.decode(errors="replace") for a in argv if a)))
    return found


def _from_ps() -> list[Process]:
    listed = subprocess.run(["ps", "-axo", "pid=,ppid=,command="], capture_output=True, text=True, timeout=30)
    found = []
    for line in listed.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            found.append(Process(int(parts[0]), int(parts[1]), (parts[2],)))  # paths may hold spaces: one string
    return found


def _from_powershell() -> list[Process]:
    script = ("Get-CimInstance Win32_Process | Select-Object ProcessId,ParentProcessId,ExecutablePath,CommandLine"
              " | ConvertTo-Json -Compress")
    listed = subprocess.run(["powershell", "-NoProfile", "-NonInteractive", "-Command", script],
                            capture_output=True, text=True, timeout=60)
    rows = json.loads(listed.stdout or "[]")
    return [Process(int(r["ProcessId"]), int(r["ParentProcessId"] or 0),
                    tuple(filter(None, [r.get("ExecutablePath") or "", r.get("CommandLine") or ""])))
            for r in (rows if isinstance(rows, list) else [rows])]


def _inside(path: str, roots: tuple[Path, ...]) -> bool:
    """Whether `path` lies under one of `roots`; its own symlinks are not followed (a venv's python is a
    symlink to the interpreter it was made from)."""
    if not os.path.isabs(path):
        return False
    normal = Path(os.path.normpath(path))
    return any(normal.is_relative_to(root) for root in roots)


def app_processes(root: Path, processes: list[Process] | None = None) -> list[Process]:
    """Processes running the install's programs, and all their descendants."""
    processes = list_processes() if processes is None else processes
    roots = (Path(os.path.normpath(root)), root.resolve())
    ours = {p.pid for p in processes if p.pid != os.getpid() and any(_inside(a, roots) for a in p.argv[:2])}
    grew = True
    while grew:  # descendants: p2pd, pip, node processes started through another interpreter
        more = {p.pid for p in processes if p.ppid in ours and p.pid not in ours and p.pid != os.getpid()}
        ours |= more
        grew = bool(more)
    return [p for p in processes if p.pid in ours]


def stop_app(root: Path, grace_s: float = 30.0) -> list[Process]:
    """Stops every process of the install; returns those it found (empty when the app was not running)."""
    found = app_processes(root)
    if not found:
        return []
    for process in found:
        _signal(process.pid, graceful=True)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(found):
        time.sleep(0.2)
    for process in _alive(found):
        _signal(process.pid, graceful=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(found):
        time.sleep(0.1)
    return found


def _alive(processes: list[Process]) -> list[Process]:
    current = {p.pid: p.argv for p in list_processes()}
    return [p for p in processes if current.get(p.pid) == p.argv]  # same pid and command: not a reused pid


def _signal(pid: int, *, graceful: bool) -> None:
    if sys.platform == "win32":
        command = ["taskkill", "/PID", str(pid)] + ([] if graceful else ["/F"])
        subprocess.run(command, capture_output=True, timeout=30)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
