"""Two nodes that cannot dial each other (nor be dialled by the client) still generate, through a relay.

Topology, built with network namespaces and veth pairs:

    ns A (node, layers 0:3) --veth-- ns R (bootstrap + relay, 10.X.9.1) --veth-- ns B (node, layers 3:6)
                                          |
                                     root namespace (the client)

R does not forward packets, A and B have routes only to R's address, and R's links drop inbound TCP SYNs
towards A and B (what a NAT does): A, B and the client can open connections to R only. So the
A->B push and the client's legs to A and B all run over libp2p circuit relay through R.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.model.checkpoint import resolve_model
from node.model.sampling import SamplingParams
from node.net.membership import open_dht
from tests.node.swarm_client import generate_through
from tests.node.test_pipeline import reference_generate

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable"
    return None


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


class Topology:
    """Namespaces A, B, R with unique names and a /16 of 10.0.0.0/8 of their own (tests may run in parallel)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = {role: f"lh{tag}{role}" for role in "ABR"}
        octet = 100 + os.getpid() % 150
        self.net = f"10.{octet}"
        self.relay_ip = f"{self.net}.9.1"
        self.ip = {"A": f"{self.net}.1.2", "B": f"{self.net}.2.2", "root": f"{self.net}.3.2"}
        self.root_link = f"lh{tag}c0"
        self.created: list[str] = []

    def exec(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def build(self) -> None:
        for role, name in self.ns.items():
            sh("ip", "netns", "add", name)
            self.created.append(name)
            sh(*self.exec(role), "ip", "link", "set", "lo", "up")
        sh(*self.exec("R"), "sysctl", "-qw", "net.ipv4.ip_forward=0")  # R must not route A <-> B
        sh(*self.exec("R"), "ip", "addr", "add", f"{self.relay_ip}/32", "dev", "lo")
        for role, subnet in (("A", 1), ("B", 2)):
            inner, outer = f"{self.ns[role]}0", f"{self.ns[role]}1"
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            sh("ip", "link", "set", inner, "netns", self.ns[role])
            sh("ip", "link", "set", outer, "netns", self.ns["R"])
            sh(*self.exec(role), "ip", "addr", "add", f"{self.net}.{subnet}.2/24", "dev", inner)
            sh(*self.exec(role), "ip", "link", "set", inner, "up")
            sh(*self.exec("R"), "ip", "addr", "add", f"{self.net}.{subnet}.1/24", "dev", outer)
            sh(*self.exec("R"), "ip", "link", "set", outer, "up")
            sh(*self.exec(role), "ip", "route", "add", f"{self.relay_ip}/32", "via", f"{self.net}.{subnet}.1")
            self._drop_inbound_syn(outer)
        relay_side = f"lh{os.getpid() % 100000}c1"
        sh("ip", "link", "add", self.root_link, "type", "veth", "peer", "name", relay_side)
        self.created.append(self.root_link)
        sh("ip", "link", "set", relay_side, "netns", self.ns["R"])
        sh("ip", "addr", "add", f"{self.ip['root']}/24", "dev", self.root_link)
        sh("ip", "link", "set", self.root_link, "up")
        sh(*self.exec("R"), "ip", "addr", "add", f"{self.net}.3.1/24", "dev", relay_side)
        sh(*self.exec("R"), "ip", "link", "set", relay_side, "up")
        sh("ip", "route", "add", f"{self.relay_ip}/32", "via", f"{self.net}.3.1")

    def _drop_inbound_syn(self, link: str) -> None:
        """On R's side of a node's link: TCP SYNs without ACK (new inbound connections) go to a class whose
        queue holds nothing, i.e. are dropped, like a NAT drops them. (No netem or tc actions here: htb only.)"""
        tc = [*self.exec("R"), "tc"]
        sh(*tc, "qdisc", "add", "dev", link, "root", "handle", "1:", "htb", "default", "10")
        sh(*tc, "class", "add", "dev", link, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
        sh(*tc, "class", "add", "dev", link, "parent", "1:", "classid", "1:20", "htb", "rate", "8bit")
        sh(*tc, "qdisc", "add", "dev", link, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0")
        sh(*tc, "filter", "add", "dev", link, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "protocol", "6", "0xff", "match", "u8", "0x02", "0x12", "at", "33", "flowid", "1:20")

    def destroy(self) -> None:
        subprocess.run(["ip", "route", "del", f"{self.relay_ip}/32"], capture_output=True)
        for name in reversed(self.created):  # deleting a namespace deletes its veth ends and their peers
            if name == self.root_link:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def topology():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    topo = Topology()
    try:
        topo.build()
        yield topo
    finally:
        topo.destroy()


class Processes:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env, self.running = log_dir, env, []

    def spawn(self, name: str, command: list[str], **env: str) -> Path:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as log:
            self.running.append(subprocess.Popen(command, env={**self.env, **env}, cwd=REPO, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))
        return log_path

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def wait_for_line(path: Path, marker: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if marker in line:
                return line.strip()
        time.sleep(0.2)
    raise TimeoutError(f"no {marker!r} in {path} within {timeout_s:.0f} s:\n{path.read_text()[-3000:]}")


def tcp_connect_from(topo: Topology, role: str, host: str, port: int) -> str:
    """Tries a TCP connection from namespace `role`; returns "ok" or the error."""
    script = (f"import socket\ns = socket.socket(); s.settimeout(3)\n"
              f"try:\n    s.connect(({host!r}, {port})); print('ok')\nexcept OSError as e:\n    print(repr(e))")
    return subprocess.run([*topo.exec(role), sys.executable, "-c", script], capture_output=True, text=True
                          ).stdout.strip()


def test_chain_generates_through_a_relay(topology: Topology, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama", num_layers=6)
    source = resolve_model(str(path))
    env = {**os.environ, "LAYERHIVE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "LAYERHIVE_RELAYS": "", "LAYERHIVE_INITIAL_PEERS": ""}
    processes = Processes(tmp_path, env)
    try:
        boot_log = processes.spawn("bootstrap", [
            *topology.exec("R"), sys.executable, "-m", "node.app.cli", "bootstrap",
            "--host-maddrs", f"/ip4/{topology.relay_ip}/tcp/31337", "--identity", "test-relay"])
        relay = wait_for_line(boot_log, f"/ip4/{topology.relay_ip}/tcp/31337/p2p/", 60)
        for role, layers in (("A", "0:3"), ("B", "3:6")):
            processes.spawn(f"node{role}", [
                *topology.exec(role), sys.executable, "-m", "node.app.cli", "-v", "node", "--model", str(path),
                "--layers", layers, "--initial-peers", relay, "--host-maddrs", f"/ip4/{topology.ip[role]}/tcp/0",
                "--threads", "1", "--relay", relay])
        lines = {role: wait_for_line(tmp_path / f"node{role}.log", "peer addresses: ", 90) for role in "AB"}

        # The nodes announce only circuit addresses through R, and B's listening port is not reachable from A.
        for role in "AB":
            assert all("/p2p-circuit" in m for m in lines[role].split("peer addresses: ")[1].split()), lines[role]
        # No route from A to B at all (a refused connection would mean B's address is reachable).
        assert "Network is unreachable" in tcp_connect_from(topology, "A", topology.ip["B"], 9)
        assert tcp_connect_from(topology, "R", topology.ip["B"], 9) != "ok"  # and R cannot open connections to B

        client = open_dht([relay], [f"/ip4/{topology.ip['root']}/tcp/0"], client_mode=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                records = [r for r in client.list_servers_blocking(source.name, num_layers=6)
                           if r.state == "online"]
                if len(records) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
        finally:
            client.shutdown()
        assert sorted((r.start, r.end, r.reachability) for r in records) == [(0, 3, "relayed"), (3, 6, "relayed")]

        prompt_ids = list(range(3, 30))
        stop_ids = (source.config.eos_token_id,)
        params = SamplingParams(max_new_tokens=12, stop_token_ids=stop_ids)
        ours = asyncio.run(generate_through([relay], source, prompt_ids, params, expect_ranges=[(0, 3), (3, 6)],
                                              host=topology.ip["root"]))
        assert ours == reference_generate(source, prompt_ids, 12, stop_ids)
        assert len(ours) >= 3
    finally:
        processes.stop()
