"""Where a ring's token goes: each step's moments at each stage of a local ring, segment by segment.

`benchmarks/pipeline.py` times whole tokens, and on this shared VM a run's figures drift by 5-15%, more than the
few milliseconds a token spends on anything but compute and legs. This runs the same ring (head shared, greedy,
`--delay-ms` on every leg) with the nodes marking each step's moments (`node.net.steptrace`, one clock for the
machine) and prints, for every segment of a decode token's way round the ring, its median over all tokens of all
runs: the stages' layers, each leg (its emulated delay included), parsing, digesting and verifying what arrived,
signing and packing what leaves, and the head's two shares. Medians of segments hold steady where whole tokens
do not.

Baseline, in the same run, after the ring: each stage's layers as a decode step in a fresh process with one thread,
back to back (what the single-process limit pays) and after idling as long as a stage idles in the ring.

Usage: python benchmarks/ring_timeline.py [--delay-ms 20] [--runs 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from idle_cost import timed  # noqa: E402
from pipeline import swarm_run  # noqa: E402

from node.app.local_swarm import LocalSwarm, even_split  # noqa: E402
from node.client.chat import Message, chat_template_ids  # noqa: E402
from node.client.session import connect  # noqa: E402
from node.model.checkpoint import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402
from node.model.head import ClientHead  # noqa: E402
from node.model.stage import Stage  # noqa: E402

Marks = dict[str, dict[int, int]]  # event -> position -> ns (positioned events of one stage in one run)


async def run_ring(swarm: LocalSwarm, prompt_ids: list[int], new_tokens: int, runs: int, delay_s: float,
                   baseline: Callable[[], list[tuple[float, float]]]) -> tuple[list[tuple[int, int]], list]:
    """The (start, end) ns of each measured run, on the nodes' clock, and the baseline's figures before each run and
    after the last (the nodes idle meanwhile)."""
    windows, baselines = [], []
    async with connect(swarm.initial_peers, swarm.source, send_delay_s=delay_s) as client:
        head = ClientHead(swarm.source)
        await swarm_run(client, head, prompt_ids, 4, "ring")  # warm-up: connections, direct links
        for _ in range(runs):
            baselines.append(baseline())
            start = time.monotonic_ns()
            await swarm_run(client, head, prompt_ids, new_tokens, "ring")
            windows.append((start, time.monotonic_ns()))
        baselines.append(baseline())
    return windows, baselines


def read_marks(prefix: str, pids: list[int]) -> list[list[tuple[int, str, int]]]:
    """Each stage's marks, in the order of `pids` (the nodes' processes, first stage first), sorted by time."""
    stages = []
    for pid in pids:
        path, marks = f"{prefix}.{pid}", []
        if os.path.exists(path):  # a node that never marked (it ran no step) wrote no file
            with open(path) as lines:
                marks = [(int(at), event, int(position)) for at, event, position in map(str.split, lines)]
        stages.append(sorted(marks))
    return stages


def cycles(stages: list[list[tuple[int, str, int]]], window: tuple[int, int]) -> list[list[tuple[str, int]]]:
    """Each decode token's segments [(name, ns)], from the first stage's step at p to its step at p + 1."""
    positioned: list[Marks] = []
    arrivals: list[list[int]] = []
    for marks in stages:
        events: Marks = defaultdict(dict)
        rx = []
        for at, event, position in marks:
            if not window[0] <= at <= window[1]:
                continue
            if event == "rx":
                rx.append(at)
            elif position >= 0:
                events[event].setdefault(position, at)
        positioned.append(events)
        arrivals.append(rx)

    def arrival(stage: int, before: int) -> int | None:
        """The last frame read at `stage` before `before` (the message it then parsed)."""
        index = bisect.bisect_left(arrivals[stage], before)
        return arrivals[stage][index - 1] if index else None

    last = len(stages) - 1
    found = []
    for position in sorted(positioned[0]["run"]):
        try:
            moments = [("", positioned[0]["run"][position])]
            for stage in range(len(stages)):
                marks = positioned[stage]
                if stage:
                    parsed = marks["parsed"][position]
                    moments += [(f"link {stage}->{stage + 1} (delay included)", arrival(stage, parsed)),
                                (f"stage {stage + 1}: parse", parsed),
                                (f"stage {stage + 1}: digest, verify receipt", marks["run"][position])]
                moments.append((f"stage {stage + 1}: layers", marks["computed"][position]))
                sent = marks["push"][position] if stage < last else marks["push_head"][position + 1]
                moments.append((f"stage {stage + 1}: digest, sign, pack", sent))
            first = positioned[0]
            head_in = first["head_in"][position + 1]
            moments += [(f"link {last + 1}->1 (delay included)", arrival(0, head_in)),
                        ("stage 1: parse head input", head_in),
                        ("stage 1: its share of the head", first["head_own"][position + 1]),
                        ("stage 1: wait for the other share, merge", first["token"][position + 1]),
                        ("stage 1: token to next step", first["run"][position + 1])]
        except KeyError:
            continue  # not a shared-head decode token (the prompt, the first token, the last)
        if any(at is None for _, at in moments):
            continue
        found.append([(name, at - before) for (_, before), (name, at) in zip(moments, moments[1:], strict=False)])
    return found


_stages: list[tuple[Stage, torch.Tensor]] = []  # the baseline worker's copies of the parts


def _load_parts(model: str, parts: list[tuple[int, int]]) -> None:
    torch.set_num_threads(1)
    source = resolve_model(model)
    for start, end in parts:
        _stages.append((Stage(source, start, end, dtype=torch.float32, device=torch.device("cpu")),
                        torch.randn(1, 1, source.config.hidden_size)))


def layers_baseline(legs_s: float, steps: int = 20) -> list[tuple[float, float]]:
    """Per part: median ms of its layers' decode step (1 thread), back to back and after idling as a stage of the
    ring idles (the legs and the other parts' time). Runs in the baseline worker (`_load_parts`), a fresh process:
    the benchmark's own has client threads and torch state a node has not."""
    hot = [_step_times(stage, hidden, steps, 0.0) for stage, hidden in _stages]
    idle_s = legs_s + (len(hot) - 1) / len(hot) * sum(hot) / 1e3
    return [(h, _step_times(stage, hidden, steps, idle_s)) for h, (stage, hidden) in zip(hot, _stages, strict=True)]


def _step_times(stage: Stage, hidden: torch.Tensor, steps: int, idle_s: float) -> float:
    cache = stage.new_cache(steps + 4)
    return timed(lambda position: stage.forward(hidden, position, cache), steps, time.sleep if idle_s else None, idle_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    source = resolve_model(args.model)
    parts = even_split(source.num_layers, args.nodes)
    prompt_ids = chat_template_ids(load_tokenizer(source),
                                   [Message("user", "Explain pipeline parallelism in three sentences.")])
    node_args = ["--emulate-delay-ms", str(args.delay_ms)] if args.delay_ms else []
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "steps")
        os.environ["LAYERHIVE_STEP_TRACE"] = prefix  # the nodes' environment, not this process's (loaded already)
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as LocalSwarm sets it for its nodes
        with mp.get_context("spawn").Pool(1, _load_parts, (args.model, parts)) as pool, \
                LocalSwarm(args.model, parts, threads_per_node=1, node_args=node_args) as swarm:
            pids = [process.pid for process in swarm.processes]
            delay_s = args.delay_ms / 1000
            windows, brackets = asyncio.run(run_ring(swarm, prompt_ids, args.new_tokens, args.runs, delay_s,
                                                     lambda: pool.apply(layers_baseline, (args.nodes * delay_s,))))
        del os.environ["LAYERHIVE_STEP_TRACE"]
        stages = read_marks(prefix, pids)  # the nodes wrote their marks on their way out
    tokens = [cycle for window in windows for cycle in cycles(stages, window)]
    if not tokens:
        sys.exit("no decode token was marked at every stage: are the nodes this tree's code?")
    segments: dict[str, list[float]] = defaultdict(list)
    for cycle in tokens:
        for name, ns in cycle:
            segments[name].append(ns / 1e6)
    totals = [sum(ns for _, ns in cycle) / 1e6 for cycle in tokens]
    print(f"model {source.name}, {args.nodes}-node ring sharing the head, {args.delay_ms:g} ms legs, "
          f"{len(tokens)} decode tokens of {args.runs} runs; ms")
    print(f"{'segment':44} {'median':>8} {'p10':>8} {'p90':>8}")
    for name, values in segments.items():
        deciles = statistics.quantiles(values, n=10)
        print(f"{name:44} {statistics.median(values):8.3f} {deciles[0]:8.3f} {deciles[-1]:8.3f}")
    medians = {name: statistics.median(values) for name, values in segments.items()}
    layers = sum(v for k, v in medians.items() if k.endswith(": layers"))
    links = sum(v for k, v in medians.items() if k.startswith("link"))
    head = medians["stage 1: its share of the head"] + medians["stage 1: wait for the other share, merge"]
    legs = args.nodes * args.delay_ms
    rest = sum(medians.values()) - layers - links - head
    print(f"token: median {statistics.median(totals):.2f} ms (sum of the segments' medians "
          f"{sum(medians.values()):.2f}): layers {layers:.2f}, head {head:.2f}, legs {legs:.2f} + "
          f"{links - legs:.2f} beyond their delay, the stages' message work {rest:.2f}")
    baseline = [tuple(statistics.median(run[part][kind] for run in brackets) for kind in (0, 1))
                for part in range(args.nodes)]
    print("baseline: each stage's layers as a decode step in a fresh process (1 thread), back to back and after "
          "idling as a stage of the ring idles; measured before each run and after the last, medians")
    for index, ((start, end), (hot, cold)) in enumerate(zip(parts, baseline, strict=True)):
        ring = medians[f"stage {index + 1}: layers"]
        print(f"stage {index + 1} layers {start}-{end - 1}: ring {ring:.2f} ms, back to back {hot:.2f} ms "
              f"(ring {ring / hot:.2f}x), after idle {cold:.2f} ms (ring {ring / cold:.2f}x)")
    hot_all, cold_all = sum(h for h, _ in baseline), sum(c for _, c in baseline)
    print(f"all layers: ring {layers:.2f} ms against {hot_all:.2f} back to back ({layers / hot_all:.2f}x) and "
          f"{cold_all:.2f} after idle ({layers / cold_all:.2f}x)")


if __name__ == "__main__":
    main()
