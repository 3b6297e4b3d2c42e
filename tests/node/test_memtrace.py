"""The memory-growth diagnostic (`node.app.memtrace`), in a real process: off unless asked for; with
$LAYERHIVE_TRACEMALLOC set, each SIGUSR1 writes a tracemalloc snapshot and a line of RSS and heap figures."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

CHILD = """
import os, signal, time
from node.app.memtrace import install_from_env
install_from_env()
held = [bytes(1 << 20) for _ in range(4)]  # grown between the two dumps
for _ in range(2):
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.2)
    held += [bytes(1 << 20) for _ in range(8)]
"""


def _run(env_value: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"} | ({"LAYERHIVE_TRACEMALLOC": env_value} if env_value else {})
    return subprocess.run([sys.executable, "-c", CHILD], env={**env, "PYTHONPATH": ":".join(sys.path)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_each_sigusr1_dumps_a_snapshot_and_a_line_of_figures(tmp_path):
    prefix = tmp_path / "trace"
    result = _run(str(prefix), tmp_path)
    assert result.returncode == 0, result.stderr
    snapshots = sorted(tmp_path.glob("trace.*.snapshot"))
    assert [p.name.split(".")[-2] for p in snapshots] == ["0", "1"]
    lines = next(tmp_path.glob("trace.*.log")).read_text().splitlines()
    assert len(lines) == 2 and all("rss=" in line and "malloc_in_use=" in line for line in lines), lines
    growth = tracemalloc.Snapshot.load(str(snapshots[1])).compare_to(tracemalloc.Snapshot.load(str(snapshots[0])),
                                                                      "filename")
    assert sum(stat.size_diff for stat in growth) >= 8 << 20  # the 8 MB allocated between the dumps is traced


def test_without_the_variable_sigusr1_is_left_alone(tmp_path):
    result = _run(None, tmp_path)
    assert result.returncode == -10  # SIGUSR1's default action ends the process: no handler was installed
    assert not list(tmp_path.glob("*.snapshot"))
