"""Hostile peers against a live swarm: what each attack costs the node and the honest users beside it.

A local swarm of the tiny model (two nodes, layers 0:2 and 2:4, a 4 MB KV budget each) serves an honest client
that keeps generating greedy ring answers, each on a fresh session chosen by the router. Per attack (a real
hostile process, `tests.node.hostile_peers`, aimed at the first node; the API floods at a `layerhive api`
process, in the setups of `API_FLOODS`: no keys on loopback, keys, more flooder threads), the table shows:
- the attacked process's peak RSS (with its DHT process and p2p daemon) against its idle RSS;
- the honest decode step under attack against without it, measured in the same run (goal <= 1.5x): the median
  over answers of an answer's mean step (a ring's tokens arrive in bursts, so single gaps say little);
- honest session opens admitted (goal 100%);
- crashes of the swarm's processes (goal 0).
For the API floods also "vs paced": the step under attack against the same honest requests without the attack, each
sent after the wait it had under it (the median extra time to its first chunk: a caller on the flooder's address
waits for a connection slot). A step after seconds idle is slower on this machine whatever the wait's cause (a
2.1 s pause before each request and no flood: 1.38x, 1.05x, 1.03x in three rounds; the 64-thread flood in the same
rounds: 1.37x, 0.96x, 1.12x), so this ratio is what the flood itself costs the honest caller's steps; the first adds
what waiting costs them.

Usage: python benchmarks/hostile.py [--answers 6] [--tokens 16] [--attacks oversized,never-read,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from tests.node.hostile_peers import RssPeak, hostile  # noqa: E402

KV_BUDGET_MB = 4
PROMPT = [5, 17, 3, 99, 42]

# attack -> the hostile process's arguments (beyond the swarm and target)
ATTACKS: dict[str, list[str]] = {
    "oversized": ["--count", "4", "--size-mb", "64"],
    "never-read": ["--count", "2", "--duration", "25"],
    "push-flood": ["--count", "300", "--duration", "25"],
    "idle-hoard": ["--count", "64", "--peers", "2", "--max-length", "256", "--duration", "30"],
    "bad-offer": ["--count", "4", "--max-length", "16", "--duration", "25"],
    "direct-squat": ["--count", "70", "--max-length", "16", "--duration", "25"],
    "lying-record": ["--slowdown-ms", "200", "--ttl", "6", "--duration", "40"],
}


@dataclass(frozen=True)
class ApiFlood:
    """A setup of the API flood: flooder threads, their niceness, and who holds which API key."""

    threads: int = 8
    niceness: int = 0
    keys: bool = False  # the API requires keys: the honest caller has its own
    flooder_key: bool = False  # ... and the flooder another (else it sends none)
    source: str = "127.0.0.1"  # the flooder's source address (the honest caller's is 127.0.0.1)
    gate: bool = True  # the API's connection gate (node.app.api_gate) on; off: what it was without

    def describe(self) -> str:
        keys = ("keys: honest and flooder each its own" if self.flooder_key else "keys: honest has one, flooder none"
                ) if self.keys else "no keys"
        where = "both on 127.0.0.1" if self.source == "127.0.0.1" else f"flooder from {self.source}"
        return f"API; {keys}; {where}; {self.threads} flooder threads" + (
            f" at nice {self.niceness}" if self.niceness else "") + ("" if self.gate else "; NO connection gate")


API_FLOODS: dict[str, ApiFlood] = {
    "api-bodies": ApiFlood(),  # loopback without keys: the honest caller and the flooder are one address
    # The same flood with the flooder at the lowest CPU priority: a stand-in for an attacker on another machine,
    # whose CPU is not this one's (on this 2-core VM the flooder otherwise takes a third of the cores).
    "api-bodies-niced": ApiFlood(niceness=19),
    "api-bodies-keyed": ApiFlood(keys=True, flooder_key=True),  # beyond loopback: the flooder holds a key of its own
    "api-bodies-nokey": ApiFlood(keys=True),  # beyond loopback: the flooder has no key
    "api-bodies-64": ApiFlood(threads=64),  # more connections than one caller's held refusals (MAX_HELD_PER_CALLER)
    # The same from another source address (127.0.0.2, still loopback): a stand-in for a flooder on another machine,
    # whose connections the gate (node.app.api_gate) counts apart from the honest caller's.
    "api-bodies-64-apart": ApiFlood(threads=64, source="127.0.0.2"),
    "api-bodies-64-nogate": ApiFlood(threads=64, gate=False),  # the same without the gate, in the same run
    "api-bodies-256": ApiFlood(threads=256),  # beyond the gate's served and parked connections of one address
}
HONEST_KEY, FLOODER_KEY = "honest-key", "flooder-key"


@dataclass
class Row:
    attack: str
    idle_rss_mb: float
    peak_rss_mb: float
    step_p50_base_ms: float
    step_p50_attack_ms: float
    opens_admitted: int
    opens_tried: int
    crashes: int
    note: str = ""
    cpu_s: dict[str, float] | None = None  # API floods: CPU seconds by process while the honest caller was timed
    hostile_requests: int | None = None  # API floods: sent, all refused
    first_chunk_p50_ms: dict[str, float] | None = None  # API floods: request to first streamed chunk, base/attack
    step_p50_paced_ms: float | None = None  # API floods: without the attack, each request after the wait it had


class HonestLoad:
    """An honest client generating answers until stopped; records every token step and every open's outcome."""

    def __init__(self, swarm: LocalSwarm, tokens: int) -> None:
        self.swarm, self.tokens = swarm, tokens
        self.steps_s: list[float] = []
        self.opened = self.tried = 0
        self._stop = threading.Event()

    def run(self, answers: int) -> None:
        asyncio.run(self._answers(answers))

    def run_until(self, stop: threading.Event) -> None:
        self._stop = stop
        asyncio.run(self._answers(10**9))

    async def _answers(self, answers: int) -> None:
        async with connect(self.swarm.initial_peers, self.swarm.source) as client:  # a newcomer to every node
            for _ in range(answers):
                if self._stop.is_set():
                    return
                self.tried += 1
                try:
                    chain = await client.choose_chain()
                    session = await client.open_session(chain, max_length=len(PROMPT) + self.tokens,
                                                        sampling=SamplingParams(max_new_tokens=self.tokens))
                except Exception as e:
                    print(f"  honest open failed: {type(e).__name__}: {e}", flush=True)
                    await asyncio.sleep(0.5)
                    continue
                self.opened += 1
                try:
                    arrived = [time.perf_counter() async for _ in session.tokens(PROMPT, 0)]
                    if len(arrived) > 1:  # a ring's tokens come in bursts: the answer's mean step, not each gap
                        self.steps_s.append((arrived[-1] - arrived[0]) / (len(arrived) - 1))
                except Exception as e:
                    print(f"  honest answer failed: {type(e).__name__}: {e}", flush=True)
                finally:
                    await session.close()

    @property
    def p50_ms(self) -> float:
        """The median over answers of an answer's mean decode step (its first token, after the prefill, apart)."""
        return 1e3 * statistics.median(self.steps_s) if self.steps_s else float("nan")


def honest_during(swarm: LocalSwarm, tokens: int, attack: Callable[[], None]) -> HonestLoad:
    """Runs the honest load on a thread while `attack()` runs here."""
    load, stop = HonestLoad(swarm, tokens), threading.Event()
    thread = threading.Thread(target=load.run_until, args=(stop,), daemon=True)
    thread.start()
    try:
        attack()
    finally:
        stop.set()
        thread.join(timeout=180)
    return load


def crashes(swarm: LocalSwarm) -> int:
    return sum(process.poll() is not None for process in swarm.processes)


def run_node_attack(swarm: LocalSwarm, name: str, args: list[str], tokens: int, base_ms: float) -> Row:
    target = swarm.processes[0].pid
    common = ["--target", swarm.peer_id(0), "--layers", "0:2"]
    with RssPeak(target) as rss:
        def attack() -> None:
            with hostile(name, swarm.initial_peers, str(swarm.source.root), *common, *args) as process:
                process.result(timeout_s=600)
                print(f"  {name}: {process.lines[-1][:200]}", flush=True)

        load = honest_during(swarm, tokens, attack)
    return Row(name, rss.idle / 2**20, rss.peak / 2**20, base_ms, load.p50_ms, load.opened, load.tried,
               crashes(swarm))


def run_api_attack(swarm: LocalSwarm, name: str, tokens: int, answers: int) -> Row:
    """A `layerhive api` process flooded with 100 MB Content-Lengths, 64 MB chunked bodies and 200k-character
    prompts from the threads of `API_FLOODS[name]`, while an honest caller streams small completions through it."""
    setup = API_FLOODS[name]
    port = _free_port()
    keys = ["--api-key", f"{HONEST_KEY},{FLOODER_KEY}"] if setup.keys else []
    command = [sys.executable, "-m", "node.app.cli", "api", "--model", str(swarm.source.root), "--port", str(port),
               *keys, "--initial-peers", *swarm.initial_peers]
    if not setup.gate:  # `layerhive api` has no switch for it: `serve` as the CLI calls it, gate off
        assert not setup.keys
        command = [sys.executable, "-c", "import sys; from node.app.api import serve; serve(sys.argv[1], sys.argv[3:], "
                   "port=int(sys.argv[2]), connection_gate=False)", str(swarm.source.root), str(port),
                   *swarm.initial_peers]
    api = subprocess.Popen(command,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}/v1"
    honest_key = HONEST_KEY if setup.keys else "unused"
    flooder_key = FLOODER_KEY if setup.flooder_key else None
    try:
        _wait_for_api(url, honest_key)
        base = _api_steps(url, swarm.source.name, tokens, answers, honest_key)
        # The flood runs in a process of its own: as threads here it would take the GIL from the honest client
        # whose chunks are being timed, and measure this process rather than the API.
        spawn = multiprocessing.get_context("spawn")
        stop, sent, refused = spawn.Event(), spawn.Value("i", 0), spawn.Value("i", 0)
        flood = spawn.Process(target=_api_flood_process, daemon=True, args=(
            port, stop, sent, refused, setup.threads, setup.niceness, flooder_key, setup.source))
        with RssPeak(api.pid) as rss:
            flood.start()
            deadline = time.monotonic() + 120
            while sent.value < 64 and time.monotonic() < deadline:  # the spawned process imports for seconds
                time.sleep(0.2)
            parts = {"api": [api.pid], "flooder": [flood.pid], "nodes": [p.pid for p in swarm.processes],
                     "honest client": [-os.getpid()]}  # this process alone: the others are its children
            before, started = {name: _cpu_s(pids) for name, pids in parts.items()}, time.monotonic()
            during = _api_steps(url, swarm.source.name, tokens, answers, honest_key)
            spent = {name: _cpu_s(pids) - before[name] for name, pids in parts.items()}
            wall = time.monotonic() - started
            stop.set()
            flood.join(timeout=60)
            if flood.is_alive():
                flood.kill()
        time.sleep(2)  # the flood's connections close
        waited_s = max(0.0, (during.first_chunk_p50_ms - base.first_chunk_p50_ms) / 1e3)
        paced = _api_steps(url, swarm.source.name, tokens, answers, honest_key, pause_s=waited_s)
        print(f"  {name}: {sent.value} hostile requests sent, {refused.value} refused (a 4xx, or the connection "
              "closed on them before their body was sent)", flush=True)
        print(f"  CPU seconds while the honest caller was timed under the flood ({wall:.1f} s wall, 2 cores = "
              f"{2 * wall:.1f} CPU s): " + ", ".join(f"{name} {cpu:.1f}" for name, cpu in spent.items()), flush=True)
        print(f"  honest request to first chunk, p50: {base.first_chunk_p50_ms:.0f} ms without the flood, "
              f"{during.first_chunk_p50_ms:.0f} ms under it", flush=True)
        print(f"  honest step p50 without the flood, each request after {waited_s:.1f} s (the wait it had under the "
              f"flood): {paced.p50_ms:.1f} ms; under the flood {during.p50_ms:.1f} ms "
              f"({during.p50_ms / paced.p50_ms:.2f}x)", flush=True)
        alive = api.poll() is None
    finally:
        api.terminate()
        api.wait(timeout=60)
    return Row(name, rss.idle / 2**20, rss.peak / 2**20, base.p50_ms, during.p50_ms, during.opened,
               during.tried, crashes(swarm) + (not alive), note=f"{setup.describe()}; step = streamed chunk",
               cpu_s={"wall": round(wall, 2), **{part: round(cpu, 2) for part, cpu in spent.items()}},
               hostile_requests=sent.value,
               first_chunk_p50_ms={"base": round(base.first_chunk_p50_ms, 1),
                                   "attack": round(during.first_chunk_p50_ms, 1)},
               step_p50_paced_ms=paced.p50_ms)


@dataclass
class _ApiSteps:
    steps_s: list[float]
    opened: int
    tried: int
    first_chunk_s: list[float]  # request sent to first chunk: includes any wait for a connection to be served

    @property
    def p50_ms(self) -> float:
        return 1e3 * statistics.median(self.steps_s) if self.steps_s else float("nan")

    @property
    def first_chunk_p50_ms(self) -> float:
        return 1e3 * statistics.median(self.first_chunk_s) if self.first_chunk_s else float("nan")


def _api_steps(url: str, model: str, tokens: int, answers: int, api_key: str, pause_s: float = 0.0) -> _ApiSteps:
    """`answers` streamed completions, one after another, each `pause_s` after the previous one."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=120)
    steps, opened, firsts = [], 0, []
    for _ in range(answers):
        time.sleep(pause_s)
        sent = time.perf_counter()
        try:
            stream = client.completions.create(model=model, prompt="hello hello", max_tokens=tokens, temperature=0,
                                               stream=True)
        except openai.APIError:
            continue
        opened += 1
        arrived = [time.perf_counter() for _chunk in stream]
        if arrived:
            firsts.append(arrived[0] - sent)
        if len(arrived) > 1:  # chunks come in bursts: the answer's mean step, as for the node attacks
            steps.append((arrived[-1] - arrived[0]) / (len(arrived) - 1))
    return _ApiSteps(steps, opened, answers, firsts)


def _api_flood_process(port: int, stop, sent, refused, threads: int, niceness: int = 0,
                       api_key: str | None = None, source: str = "127.0.0.1") -> None:
    """`threads` flooders against the API at `port` until `stop` (a multiprocessing Event) is set, counting the
    requests sent and those the API answered with a 4xx in `sent` and `refused` (multiprocessing Values); at
    `niceness` (os.nice), sending `api_key` as a bearer token if given, from the address `source`."""
    os.nice(niceness)
    flooders = [threading.Thread(target=_api_flood, args=(port, stop, sent, refused, api_key, source), daemon=True)
                for _ in range(threads)]
    for thread in flooders:
        thread.start()
    for thread in flooders:
        thread.join()


def _api_flood(port: int, stop, sent, refused, api_key: str | None, source: str) -> None:
    start = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + (
        f"Authorization: Bearer {api_key}\r\n" if api_key else "")
    heads = [start + "Content-Length: 104857600\r\n\r\n", start + "Transfer-Encoding: chunked\r\n\r\n"]
    big_prompt = json.dumps({"model": "x", "prompt": "hello " * 33_000, "max_tokens": 2}).encode()
    chunk = b"x" * (1 << 20)
    while not stop.is_set():
        for kind in range(3):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=30,
                                                                      source_address=(source, 0)) as sock:
                with sent.get_lock():
                    sent.value += 1
                try:
                    if kind == 2:
                        sock.sendall(f"{start}Content-Length: {len(big_prompt)}\r\n\r\n".encode() + big_prompt)
                    else:
                        sock.sendall(heads[kind].encode())
                        for _ in range(64 if kind == 1 else 100):
                            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if kind == 1 else chunk)
                except (BrokenPipeError, ConnectionResetError):  # refused, and the connection closed on us
                    with refused.get_lock():
                        refused.value += 1
                    continue
                if sock.recv(4096).startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")):
                    with refused.get_lock():
                        refused.value += 1


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` and their descendants have used so far (a negative pid:
    that process alone)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(abs(pid))
            for each in [process, *(process.children(recursive=True) if pid > 0 else [])]:
                with contextlib.suppress(psutil.Error):
                    times = each.cpu_times()
                    total += times.user + times.system
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_api(url: str, api_key: str, timeout_s: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=5).ok:
                return
        time.sleep(1)
    raise TimeoutError(f"the API at {url} did not come up")


def table(rows: list[Row]) -> str:
    lines = [f"{'attack':14} {'idle RSS':>9} {'peak RSS':>9} {'ratio':>6} {'p50 base':>9} {'p50 attack':>10} "
             f"{'ratio':>6} {'vs paced':>8} {'opens':>7} {'crashes':>7}"]
    for r in rows:
        paced = f"{r.step_p50_attack_ms / r.step_p50_paced_ms:8.2f}" if r.step_p50_paced_ms else f"{'-':>8}"
        lines.append(f"{r.attack:14} {r.idle_rss_mb:8.0f}M {r.peak_rss_mb:8.0f}M {r.peak_rss_mb / r.idle_rss_mb:6.2f} "
                     f"{r.step_p50_base_ms:8.1f}ms {r.step_p50_attack_ms:9.1f}ms "
                     f"{r.step_p50_attack_ms / r.step_p50_base_ms:6.2f} {paced} "
                     f"{r.opens_admitted:>3}/{r.opens_tried:<3} {r.crashes:>7}  {r.note}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=6, help="honest answers for the baseline")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per honest answer")
    parser.add_argument("--attacks", default=",".join([*ATTACKS, *API_FLOODS]))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tests.conftest import build_tiny_checkpoint

    model = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="hostile-tiny-")), "llama", num_layers=4)
    rows: list[Row] = []
    with LocalSwarm(str(model), [(0, 2), (2, 4)], threads_per_node=1,
                    node_args=["--kv-budget-mb", str(KV_BUDGET_MB)]) as swarm:
        print(f"swarm online; logs in {swarm.log_dir}", flush=True)
        for name in args.attacks.split(","):
            baseline = HonestLoad(swarm, args.tokens)
            baseline.run(args.answers)  # measured next to each attack: the machine's load drifts
            print(f"{name}: honest step p50 without attack {baseline.p50_ms:.1f} ms", flush=True)
            if name in API_FLOODS:
                rows.append(run_api_attack(swarm, name, args.tokens, args.answers))
            else:
                rows.append(run_node_attack(swarm, name, ATTACKS[name], args.tokens, baseline.p50_ms))
            print(table(rows[-1:]).splitlines()[1], flush=True)
            for index, process in enumerate(swarm.processes):  # a crashed node is replaced for the next attack
                if process.poll() is not None:
                    swarm.respawn(index)
                    swarm.wait_until_covered(180)
            time.sleep(5)  # the attack's sessions and streams end
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
