"""Churn soak: a swarm of tiny-model nodes where a random node is killed or restarted every ~10 s, while
clients chat through it continuously.

Twelve node processes (layers 0:2, 2:4 and 4:6 of a 6-layer tiny model, four replicas each, 6 s record TTL)
run for `--minutes`. Every `--interval` seconds one live node, chosen at random, is either SIGKILLed with its
process group (it comes back as a fresh peer `--down` seconds later) or stopped with SIGTERM and restarted at
once. Meanwhile `--clients` clients each generate greedy ring answers to their own prompt, one after another,
through `ResilientSession` (failover and replay), each answer compared with the reference the same model gives
in one process. Reported: answers done, answers failed (goal 0), answers differing from the reference
(goal 0), seconds during which some layer had no live node, and the RSS drift of every node process that lived
at least `--min-life` seconds (its RSS with its DHT process and p2p daemon, last sample minus the one a minute after
start), in all and by part; every minute, the median RSS by part of the nodes up since the start. The node
process's anonymous memory (its heap: `Anonymous` in /proc/PID/smaps_rollup, Linux) is reported beside its RSS,
which tells heap growth from file pages (libraries paged in). `--spare N` keeps the first N nodes out of the churn
(they still serve, and carry the load of the churned ones), so that every run has N drifts of its full length.

Usage: python benchmarks/soak.py [--minutes 15] [--interval 10] [--clients 4] [--tokens 24] [--spare 0]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.client.failover import ResilientSession  # noqa: E402
from node.client.generate import generate  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.checkpoint import resolve_model  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.sampling import SamplingParams  # noqa: E402
from node.model.stage import Stage  # noqa: E402

RANGES = [(0, 2), (2, 4), (4, 6)]
REPLICAS = 4
TTL_S = 6.0


@dataclass
class Lifetime:
    """One node process from start to end: its RSS samples (seconds since start, bytes)."""

    slot: int
    pid: int
    started: float
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (s since start, RSS by PARTS)

    def drift_mb(self, min_life_s: float, part: str | None = None) -> float | None:
        """RSS growth from a minute after start to the last sample, of one part or (None) all, if it lived long."""
        settled = [rss for t, rss in self.samples if t >= 60]
        if not self.samples or self.samples[-1][0] < min_life_s or not settled:
            return None
        return (_part_bytes(self.samples[-1][1], part) - _part_bytes(settled[0], part)) / 2**20


PARTS = ("node", "dht", "p2pd")  # a node's process, its DHT process, the DHT's p2p daemon
HEAP = "node_anon"  # also sampled, not a part (it is inside "node"): the node process's anonymous memory


def anonymous_bytes(pid: int) -> int | None:
    """A process's anonymous memory (heap, stacks, anonymous mmaps) from /proc/PID/smaps_rollup; None elsewhere."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _part_bytes(rss: dict[str, int], part: str | None) -> int:
    return sum(rss.get(name, 0) for name in PARTS) if part is None else rss.get(part, 0)


@dataclass
class Tally:
    answers: int = 0
    failed: int = 0
    differing: int = 0
    failovers: int = 0
    errors: Counter = field(default_factory=Counter)


class Churn:
    """Kills or restarts a random live node every interval; brings killed ones back after `down_s`."""

    def __init__(self, swarm: LocalSwarm, interval_s: float, down_s: float, seed: int = 7, spare: int = 0) -> None:
        self.swarm, self.interval_s, self.down_s, self.spare = swarm, interval_s, down_s, spare
        self.rng = random.Random(seed)
        self.down_until: dict[int, float] = {}
        self.kills = self.restarts = 0
        self.lifetimes: list[Lifetime] = [Lifetime(i, p.pid, time.monotonic()) for i, p in enumerate(swarm.processes)]

    def step(self) -> None:
        now = time.monotonic()
        for slot, until in list(self.down_until.items()):
            if now >= until:
                self._start(slot)
                del self.down_until[slot]
        live = [i for i, p in enumerate(self.swarm.processes)
                if i >= self.spare and p.poll() is None and i not in self.down_until]
        if not live:
            return
        victim = self.rng.choice(live)
        if self.rng.random() < 0.5:
            self.swarm.kill(victim)  # SIGKILL of its process group, as a crash of its machine
            self.down_until[victim] = now + self.down_s
            self.kills += 1
        else:
            process = self.swarm.processes[victim]
            process.send_signal(signal.SIGTERM)  # a graceful restart
            try:
                process.wait(timeout=30)
            except Exception:
                self.swarm.kill(victim)
            self._start(victim)
            self.restarts += 1

    def _start(self, slot: int) -> None:
        self.swarm.respawn(slot)
        self.lifetimes.append(Lifetime(slot, self.swarm.processes[slot].pid, time.monotonic()))

    def sample_rss(self) -> None:
        now = time.monotonic()
        for life in self.lifetimes:
            try:
                process = psutil.Process(life.pid)
                rss = dict.fromkeys(PARTS, 0)
                rss["node"] = process.memory_info().rss
                for child in process.children(recursive=True):
                    rss["p2pd" if child.name().startswith("p2pd") else "dht"] += child.memory_info().rss
                rss[HEAP] = anonymous_bytes(life.pid) or 0
            except psutil.Error:
                continue
            if process.status() != psutil.STATUS_ZOMBIE:
                life.samples.append((now - life.started, rss))

    def uncovered(self) -> bool:
        """Whether some layer has no live node: a process that runs and has printed that it serves."""
        serving = set()
        for slot, process in enumerate(self.swarm.processes):
            if process.poll() is None and self._serves(slot):
                serving.add(self.swarm.ranges[slot])
        return any(span not in serving for span in RANGES)

    def _serves(self, slot: int) -> bool:
        try:
            self.swarm.peer_id(slot, timeout_s=0)
            return True
        except TimeoutError:
            return False


def reference_answers(source, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    stage = Stage(source, 0, source.num_layers, dtype=torch.float32, device=torch.device("cpu"))
    head = ClientHead(source)
    params = SamplingParams(max_new_tokens=tokens)

    class Whole:
        def __init__(self) -> None:
            self.cache = stage.new_cache()

        async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
            return stage.forward(hidden, position, self.cache)

    async def one(prompt: list[int]) -> list[int]:
        return [t async for t in generate(Whole(), head, prompt, params)]

    return [asyncio.run(one(p)) for p in prompts]


def chat_forever(swarm: LocalSwarm, prompt: list[int], reference: list[int], tokens: int, tally: Tally,
                 stop: threading.Event) -> None:
    async def run() -> None:
        async with connect(swarm.initial_peers, swarm.source) as client:
            params = SamplingParams(max_new_tokens=tokens)
            while not stop.is_set():
                session = ResilientSession(client, max_length=len(prompt) + tokens, step_timeout_s=20,
                                           max_failovers=8)
                try:
                    answer = [t async for t in session.generate(prompt, params, None)]
                    tally.differing += answer != reference
                except Exception as e:
                    tally.failed += 1
                    tally.errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
                finally:
                    tally.answers += 1
                    tally.failovers += len(session.events)
                    await session.close()

    asyncio.run(run())


def rss_report(lifetimes: list[Lifetime], elapsed_s: float) -> str:
    """The median RSS by part of the nodes up since the start (still alive), as it stands now."""
    originals = [life.samples[-1][1] for life in lifetimes
                 if life.samples and life.samples[-1][0] >= elapsed_s - 5 and life.pid in _first_pids(lifetimes)]
    if not originals:
        return "RSS: no node has lived since the start"
    medians = {part: statistics.median(rss.get(part, 0) for rss in originals) / 2**20 for part in (*PARTS, HEAP)}
    return (f"RSS of the {len(originals)} nodes up since the start (median MB): "
            + ", ".join(f"{part} {mb:.0f}" for part, mb in medians.items()))


def _first_pids(lifetimes: list[Lifetime]) -> set[int]:
    first: dict[int, int] = {}
    for life in lifetimes:
        first.setdefault(life.slot, life.pid)
    return set(first.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between kills/restarts")
    parser.add_argument("--down", type=float, default=20.0, help="seconds a killed node stays down")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--min-life", type=float, default=300.0,
                        help="seconds a node must have lived for its RSS drift to be reported")
    parser.add_argument("--spare", type=int, default=0, help="the first N nodes are never killed or restarted")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tests.conftest import build_tiny_checkpoint

    model = build_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="soak-tiny-")), "llama", num_layers=6)
    source = resolve_model(str(model))
    prompts = [[5 + i, 17, 3 + i, 99, 42 - i] for i in range(args.clients)]
    references = reference_answers(source, prompts, args.tokens)
    tallies = [Tally() for _ in prompts]
    stop = threading.Event()
    with LocalSwarm(str(model), RANGES * REPLICAS, threads_per_node=1, node_args=["--ttl", str(TTL_S)]) as swarm:
        print(f"{len(swarm.processes)} nodes online; logs in {swarm.log_dir}", flush=True)
        churn = Churn(swarm, args.interval, args.down, spare=args.spare)
        clients = [threading.Thread(target=chat_forever, args=(swarm, p, r, args.tokens, t, stop), daemon=True)
                   for p, r, t in zip(prompts, references, tallies, strict=True)]
        for thread in clients:
            thread.start()
        started = time.monotonic()
        next_churn, next_report = started + args.interval, started + 60
        uncovered_s = 0
        while (now := time.monotonic()) < started + 60 * args.minutes:
            if now >= next_churn:
                churn.step()
                next_churn += args.interval
            churn.sample_rss()
            uncovered_s += churn.uncovered()
            if now >= next_report:
                next_report += 60
                done = sum(t.answers for t in tallies)
                errors = sum((t.errors for t in tallies), Counter()).most_common(1)
                print(f"{(now - started) / 60:5.1f} min: {done} answers, {sum(t.failed for t in tallies)} failed, "
                      f"{churn.kills} kills, {churn.restarts} restarts, {uncovered_s} s uncovered"
                      + (f"; most frequent error ({errors[0][1]}x): {errors[0][0]}" if errors else ""), flush=True)
                print("  " + rss_report(churn.lifetimes, now - started), flush=True)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    drifts = {f"slot {life.slot} pid {life.pid}": round(d, 1) for life in churn.lifetimes
              if (d := life.drift_mb(args.min_life)) is not None}
    drift_by_part = {part: [round(d, 1) for life in churn.lifetimes if (d := life.drift_mb(args.min_life, part))
                            is not None] for part in (*PARTS, HEAP)}
    errors = sum((t.errors for t in tallies), Counter())
    summary = {
        "minutes": args.minutes, "spare": args.spare, "nodes": len(RANGES) * REPLICAS, "clients": args.clients,
        "kills": churn.kills, "restarts": churn.restarts,
        "answers": sum(t.answers for t in tallies), "answers_failed": sum(t.failed for t in tallies),
        "answers_differing": sum(t.differing for t in tallies), "failovers": sum(t.failovers for t in tallies),
        "seconds_uncovered": uncovered_s, "rss_drift_mb": drifts,
        "rss_drift_mb_median": statistics.median(drifts.values()) if drifts else None,
        "rss_drift_mb_by_part": drift_by_part,
        "errors": dict(errors.most_common(5)),
    }
    print()
    for key, value in summary.items():
        print(f"{key:22} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
