"""A whole swarm on this machine: a bootstrap peer plus N node processes on 127.0.0.1.

Used by `layerhive swarm local`, by `layerhive chat` when no swarm is given, and by
the tests and benchmarks, so they all exercise real processes talking over libp2p.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from node.model.checkpoint import resolve_model
from node.net.lifeline import child_env
from node.net.membership import SwarmPeer, open_dht
from swarm.records import ServerRecord


def even_split(num_layers: int, parts: int) -> list[tuple[int, int]]:
    if not 1 <= parts <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {parts} nodes")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class LocalSwarm:
    def __init__(
        self,
        model: str,
        ranges: Sequence[tuple[int, int]] | None = None,
        *,
        num_nodes: int = 3,
        threads_per_node: int | None = None,
        node_args: Sequence[str] = (),
        per_node_args: Mapping[int, Sequence[str]] | None = None,
        log_dir: str | None = None,
        join: bool = False,
    ) -> None:
        """`join=True`: `num_nodes` nodes started without ranges, taking the ones the swarm's plan gives them."""
        self.source = resolve_model(model)
        self.join = join
        if join:
            self.ranges: list[tuple[int, int] | None] = [None] * num_nodes
        else:
            self.ranges = list(ranges) if ranges else even_split(self.source.num_layers, num_nodes)
        self.threads_per_node = threads_per_node
        self.node_args = list(node_args)
        self.per_node_args = {index: list(args) for index, args in (per_node_args or {}).items()}
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="layerhive-swarm-")
        self.bootstrap: SwarmPeer | None = None
        self.processes: list[subprocess.Popen] = []
        self.dead_peers: set[str] = set()  # killed nodes whose records may linger until they expire

    @property
    def initial_peers(self) -> list[str]:
        assert self.bootstrap is not None, "the swarm is not started"
        return self.bootstrap.visible_maddrs

    def start(self, timeout_s: float = 180.0) -> list[str]:
        self.bootstrap = open_dht([], ["/ip4/127.0.0.1/tcp/0"])  # validates records like every Layerhive peer
        for index, layers in enumerate(self.ranges):
            self.processes.append(self._spawn_node(index, layers))
        self.wait_until_covered(timeout_s)
        return self.initial_peers

    def _spawn_node(self, index: int, layers: tuple[int, int] | None) -> subprocess.Popen:
        fixed = ["--layers", f"{layers[0]}:{layers[1]}"] if layers is not None else []
        command = [
            sys.executable, "-m", "node.app.cli", "node", "--model", self.source.name,
            *fixed, "--initial-peers", *self.initial_peers, *self.node_args, *self.per_node_args.get(index, ()),
        ]
        env = child_env()  # the node stops once this process is gone, even killed
        # Nodes here share the machine's cores and take turns (a chain runs one stage at a time). GNU OpenMP's
        # threads spin ~300k rounds after each op before sleeping, so a stage that has just finished keeps
        # cores busy that the next stage needs: measured on 2 cores, 3 stages of 2 threads, 37.9 -> 30.5 ms
        # per token with 10k. A node alone on its machine (the usual case) keeps the default.
        env.setdefault("GOMP_SPINCOUNT", "10000")
        if self.threads_per_node:
            env["OMP_NUM_THREADS"] = str(self.threads_per_node)
            command += ["--threads", str(self.threads_per_node)]
        # Each node gets its own process group, so `kill` takes down its DHT process and p2p daemon too,
        # as a crash of the volunteer's machine would.
        with open(os.path.join(self.log_dir, f"node{index}.log"), "w") as log:  # the child keeps its own handle
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def online_records(self) -> list[ServerRecord]:
        assert self.bootstrap is not None
        records = self.bootstrap.list_servers_blocking(self.source.name, num_layers=self.source.num_layers)
        return [record for record in records if record.state == "online"]

    def wait_until_covered(self, timeout_s: float) -> None:
        """Waits until every node process has announced its range (each range as many times as it was given);
        in join mode, until every live node is online and every layer covered."""
        deadline = time.monotonic() + timeout_s
        wanted = Counter(self.ranges)
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None and process.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"a node process exited with code {process.returncode} while starting; "
                                       f"see logs in {self.log_dir}")
            live = [r for r in self.online_records() if r.peer_id not in self.dead_peers]
            if self.join:  # nodes started elsewhere (e.g. in-process by a test) count too
                alive = sum(process.poll() is None for process in self.processes)
                covered = {layer for r in live for layer in range(r.start, r.end)}
                if len(live) >= alive and len(covered) == self.source.num_layers:
                    return
            elif not wanted - Counter((r.start, r.end) for r in live):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the local swarm did not come online within {timeout_s:.0f} s; logs in {self.log_dir}")

    def peer_id(self, index: int, timeout_s: float = 60.0) -> str:
        """Node `index`'s peer id, from the line it prints once it serves."""
        deadline = time.monotonic() + timeout_s
        path = os.path.join(self.log_dir, f"node{index}.log")
        while True:
            with open(path) as log:
                for line in log:
                    if line.startswith("serving ") and "/p2p/" in line:
                        return line.rsplit("/p2p/", 1)[1].split()[0]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(f"node {index} did not report its peer id; see {path}")

    def kill(self, index: int) -> None:
        """SIGKILLs node `index` with its DHT process and p2p daemon, as a crash of its machine would."""
        process = self.processes[index]
        with contextlib.suppress(TimeoutError):
            self.dead_peers.add(self.peer_id(index, timeout_s=0))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def respawn(self, index: int) -> None:
        """Starts a fresh node (a new peer id) in place of dead node `index`; returns without waiting."""
        if self.processes[index].poll() is None:
            raise RuntimeError(f"node {index} is still running")
        self.processes[index] = self._spawn_node(index, self.ranges[index])

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):  # whatever the node left behind in its group
                os.killpg(process.pid, signal.SIGKILL)
        self.processes.clear()
        if self.bootstrap is not None:
            self.bootstrap.shutdown()
            self.bootstrap = None

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
