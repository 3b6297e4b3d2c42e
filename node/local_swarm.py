"""A whole swarm on this machine: a bootstrap peer plus N node processes on 127.0.0.1.

Used by `layerhive swarm local`, by `layerhive chat` when no swarm is given, and by
the tests and benchmarks, so they all exercise real processes talking over libp2p.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from hivemind import DHT

from node.checkpoint import resolve_model
from node.membership import servers_key
from swarm.records import RecordError, ServerRecord


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
        log_dir: str | None = None,
    ) -> None:
        self.source = resolve_model(model)
        self.ranges = list(ranges) if ranges else even_split(self.source.num_layers, num_nodes)
        self.threads_per_node = threads_per_node
        self.node_args = list(node_args)
        self.log_dir = log_dir
        self.bootstrap: DHT | None = None
        self.processes: list[subprocess.Popen] = []

    @property
    def initial_peers(self) -> list[str]:
        assert self.bootstrap is not None, "the swarm is not started"
        return [str(m) for m in self.bootstrap.get_visible_maddrs()]

    def start(self, timeout_s: float = 180.0) -> list[str]:
        self.bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for index, (start, end) in enumerate(self.ranges):
            self.processes.append(self._spawn_node(index, start, end))
        self.wait_until_covered(timeout_s)
        return self.initial_peers

    def _spawn_node(self, index: int, start: int, end: int) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "node.cli", "node", "--model", self.source.name,
            "--layers", f"{start}:{end}", "--initial-peers", *self.initial_peers, *self.node_args,
        ]
        env = dict(os.environ)
        if self.threads_per_node:
            env["OMP_NUM_THREADS"] = str(self.threads_per_node)
            command += ["--threads", str(self.threads_per_node)]
        if not self.log_dir:
            return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        with open(os.path.join(self.log_dir, f"node{index}.log"), "w") as log:  # the child keeps its own handle
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def online_records(self) -> list[ServerRecord]:
        assert self.bootstrap is not None
        found = self.bootstrap.get(servers_key(self.source.name), latest=True)
        records = []
        for item in (found.value if found is not None and isinstance(found.value, dict) else {}).values():
            try:
                record = ServerRecord.from_dict(item.value, num_layers=self.source.num_layers)
            except RecordError:
                continue
            if record.state == "online":
                records.append(record)
        return records

    def wait_until_covered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        wanted = set(self.ranges)
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a node process exited with code {process.returncode} while starting"
                                       + (f"; see logs in {self.log_dir}" if self.log_dir else ""))
            online = {(r.start, r.end) for r in self.online_records()}
            if wanted <= online:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the local swarm did not come online within {timeout_s:.0f} s")

    def kill(self, index: int) -> None:
        """SIGKILLs node `index`, as a crash would."""
        self.processes[index].kill()
        self.processes[index].wait()

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
