"""Every process the project starts ends with its parent; SIGTERM stops a node whatever signals it inherited.

Real processes: `layerhive swarm local` of the tiny model (a bootstrap DHT process and its p2pd, two node
processes with theirs), killed with SIGKILL or stopped with SIGTERM, started from a parent that blocked and
ignored SIGINT/SIGTERM (as a shell's background job, or the old `swarm local` that waited in sigwait).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(420)


def _deaf_to_stop_signals() -> None:
    """A preexec_fn: the child starts with SIGINT/SIGTERM blocked and ignored (both survive exec)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_local_swarm(model: str, nodes: int = 2) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "node.app.cli", "swarm", "local", "--model", model, "--nodes", str(nodes),
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_deaf_to_stop_signals,
    )
    deadline = time.monotonic() + 240
    seen = []
    for line in process.stdout:  # blocks per line; the swarm prints its peers once every node serves
        seen.append(line)
        if line.startswith("initial peers:"):
            return process
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError("the local swarm did not come online:\n" + "".join(seen[-30:]))


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def node_processes(swarm_pid: int) -> list[psutil.Process]:
    """The swarm's node processes (its direct children running `node`; their DHT processes are forks below them)."""
    return [p for p in psutil.Process(swarm_pid).children() if "node.app.cli node" in " ".join(p.cmdline())]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_until_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _names(processes: list[psutil.Process]) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in processes]
    return [str(p.pid) for p in processes]


@pytest.fixture
def tiny_model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama", num_layers=4))


def test_killing_a_local_swarm_with_sigkill_ends_all_its_processes(tiny_model):
    swarm = start_local_swarm(tiny_model)
    children = descendants(swarm.pid)
    try:
        p2pds = [p for p in children if "p2pd" in p.name()]
        nodes = node_processes(swarm.pid)
        assert len(nodes) == 2 and len(p2pds) == 3, _names(children)  # two nodes, and the bootstrap's own p2pd
        os.kill(swarm.pid, signal.SIGKILL)  # no cleanup can run in the parent
        swarm.wait()
        left = wait_until_gone(children, timeout_s=90)
        assert not left, f"still running after their parent was killed: {_names(left)}"
    finally:
        for process in alive(children):
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_sigterm_stops_a_swarm_and_a_node_that_inherited_blocked_signals(tiny_model):
    swarm = start_local_swarm(tiny_model)
    children = descendants(swarm.pid)
    try:
        node = node_processes(swarm.pid)[0]
        node_children = node.children(recursive=True)
        node.send_signal(signal.SIGTERM)  # one node alone: it stops, its DHT process and p2pd too
        assert not wait_until_gone([node, *node_children], timeout_s=90), _names(alive([node, *node_children]))
        swarm.send_signal(signal.SIGTERM)  # the swarm's parent: stops its nodes and exits cleanly
        assert swarm.wait(timeout=120) == 0
        left = wait_until_gone(children, timeout_s=60)
        assert not left, f"still running after the swarm stopped: {_names(left)}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            swarm.kill()
        for process in alive(children):
            with contextlib.suppress(psutil.Error):
                process.kill()
