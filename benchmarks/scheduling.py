"""Scheduling benchmark: every policy on every scenario in benchmarks/scenarios/.

    python benchmarks/scheduling.py [--scenario NAME ...] [--policy NAME ...] [--jobs N]
                                    [--no-capacity] [--capacity-sessions N] [--capacity-steps N]

Two parts, both printed as a table per scenario, with the ratios the scheduler is judged by:

1. *At the scenario's load*: each policy runs the scenario as written (churn included). Throughput
   here is the offered load whenever a policy keeps up, so the throughput ratio is judged in part 2.
2. *Sustainable capacity* (swarm/sim/capacity.py): the highest arrival rate each policy carries on
   the scenario's t=0 swarm (no churn) while meeting a latency target, found by doubling then
   bisecting the rate over short runs (warm-up and cool-down of one unloaded session; latencies of
   the sessions arriving in between, at least --capacity-sessions of them). Two targets:
   own  - degrades at most 2x: p95 per-token <= 2x and p95 TTFT <= 2x the policy's own unloaded p95s;
   SLO  - one target for all: p95 per-token <= 2x and p95 TTFT <= 2x the best unloaded p50 token /
          p95 TTFT of any policy;
   both with failed + pending < 1%. Capacity tok/s = rate x output tokens (all but < 1% complete).
   "-peak" scenarios share their swarm with the base scenario, so they get no capacity search; the
   exact MILP ("optimal") is searched only on swarms of at most --optimal-capacity-nodes nodes (a
   probe costs it a MILP solve: ~20 s on 12 nodes).

Nothing is capped or sampled: every run simulates its scenario's whole duration, and ours routes every
request with the full DP (best unloaded chains are remembered per plan, and loads are read as arrays).
Writes benchmarks/out/scheduling.json and PNG plots of latency and throughput (capacity) against swarm
size to benchmarks/out/ (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.baselines.optimal import MAX_NODES  # noqa: E402
from swarm.sim.capacity import common_slo, own_slo, search_capacity, unloaded_run  # noqa: E402
from swarm.sim.engine import POLICY_NAMES, simulate  # noqa: E402
from swarm.sim.scenario import Scenario, parse_scenario  # noqa: E402

SCENARIOS = ROOT / "benchmarks" / "scenarios"
OUT = ROOT / "benchmarks" / "out"
OURS = "layerhive"


def load(path: Path) -> Scenario:
    return parse_scenario(json.loads(path.read_text()))


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_one(path: str, policy: str) -> tuple[str, str, dict, float, float]:
    sc = load(Path(path))
    metrics, wall, cpu = _timed(lambda: simulate(sc, policy))
    return sc.name, policy, metrics, wall, cpu


def run_unloaded(path: str, policy: str) -> tuple[str, str, dict, float]:
    sc = load(Path(path))
    metrics, _, cpu = _timed(lambda: unloaded_run(sc, policy))
    return sc.name, policy, metrics, cpu


def run_capacity(path: str, policy: str, unloaded: dict, slo: dict, min_sessions: int, steps: int
                 ) -> tuple[str, str, dict, float, float]:
    from swarm.sim.capacity import Slo

    sc = load(Path(path))
    runs: dict[float, dict] = {}  # probes shared by the two searches

    def both() -> dict:
        own = search_capacity(sc, policy, own_slo(unloaded), unloaded, min_sessions=min_sessions, steps=steps,
                              runs=runs)
        common = search_capacity(sc, policy, Slo(**slo), unloaded, min_sessions=min_sessions, steps=steps,
                                 runs=runs)
        return {"own": own.as_dict(), "slo": common.as_dict(), "probes": len(runs)}

    out, wall, cpu = _timed(both)
    return sc.name, policy, out, wall, cpu


def _pool_map(jobs: int, fn, tasks: list[tuple]) -> list:
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(fn, *zip(*tasks, strict=True)))
    return [fn(*t) for t in tasks]


# --- tables ----------------------------------------------------------------------------------------


def table(name: str, n_nodes: int, results: dict[str, dict], wall: dict[str, float], cpu: dict[str, float]) -> str:
    head = (f"{'policy':<10} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'ttft50':>8} {'ttft95':>8} "
            f"{'done':>6} {'fail':>6} {'pend':>5} {'uncov s':>7} {'moved':>6} {'alloc ms':>9} "
            f"{'route ms':>8} {'wall s':>6} {'cpu s':>6}")
    lines = [f"\n## {name} ({n_nodes} nodes) - at the scenario's load", head, "-" * len(head)]
    for pol, m in results.items():
        lines.append(
            f"{pol:<10} {m['throughput_tokens_per_s']:>8.1f} {m['per_token_latency_ms']['p50']:>8.1f} "
            f"{m['per_token_latency_ms']['p95']:>8.1f} {m['ttft_ms']['p50']:>8.0f} {m['ttft_ms']['p95']:>8.0f} "
            f"{m['completed']:>6} {m['failed']:>6} {m['pending']:>5} {m['uncovered_s']:>7.1f} "
            f"{m['layers_moved']:>6} {m['scheduler_ms']['allocate']:>9.1f} "
            f"{m['scheduler_ms']['route_p50']:>8.3f} {wall[pol]:>6.1f} {cpu[pol]:>6.1f}"
        )
    return "\n".join(lines)


def capacity_table(name: str, caps: dict[str, dict], output_tokens: int, wall: dict, cpu: dict) -> str:
    any_cap = next(iter(caps.values()))
    slo = any_cap["slo"]["slo"]
    head = (f"{'policy':<10} {'own req/s':>9} {'own tok/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'ttft95':>7} | "
            f"{'SLO req/s':>9} {'SLO tok/s':>9} | {'probes':>6} {'wall s':>6} {'cpu s':>6}")
    lines = [f"## {name} - sustainable capacity (no churn; SLO: p95 token <= {slo['token_p95_ms']:.0f} ms, "
             f"p95 TTFT <= {slo['ttft_p95_ms']:.0f} ms)", head, "-" * len(head)]
    for pol, c in caps.items():
        own, common = c["own"], c["slo"]
        at = own["at_capacity"] or {"per_token_latency_ms": {"p50": math.nan, "p95": math.nan},
                                    "ttft_ms": {"p95": math.nan}}
        lines.append(
            f"{pol:<10} {own['rate_per_s']:>9.2f} {own['rate_per_s'] * output_tokens:>9.0f} "
            f"{at['per_token_latency_ms']['p50']:>7.1f} {at['per_token_latency_ms']['p95']:>7.1f} "
            f"{at['ttft_ms']['p95']:>7.0f} | {common['rate_per_s']:>9.2f} "
            f"{common['rate_per_s'] * output_tokens:>9.0f} | {c['probes']:>6} {wall[pol]:>6.1f} {cpu[pol]:>6.1f}"
        )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def ratios(name: str, results: dict[str, dict], caps: dict[str, dict] | None) -> list[str]:
    if OURS not in results:
        return []
    ours = results[OURS]
    out = []
    if name.endswith("-peak") and "petals" in results:  # offered load above capacity: throughput = capacity
        r = _ratio(ours["throughput_tokens_per_s"], results["petals"]["throughput_tokens_per_s"])
        out.append(f"throughput at saturating load ours/petals = {r:.2f}x (target >= 1.3x) "
                   f"{'OK' if r >= 1.3 else 'MISS'}")
    for pol, m in results.items():
        if pol == OURS:
            continue
        p_ours, p_base = ours["per_token_latency_ms"]["p50"], m["per_token_latency_ms"]["p50"]
        verdict = "lower" if p_ours < p_base else "NOT lower"
        out.append(f"p50 per-token latency ours/{pol} = {p_ours / p_base:.3f} ({verdict})")
    if "optimal" in results:
        opt = results["optimal"]
        lat = ours["per_token_latency_ms"]["p50"] / opt["per_token_latency_ms"]["p50"]
        thr = ours["throughput_tokens_per_s"] / opt["throughput_tokens_per_s"]
        ok = lat <= 1.05 and thr >= 0.95
        out.append(f"at load vs optimal: p50 latency {lat:.3f}x, throughput {thr:.3f}x "
                   f"(within 5%: {'OK' if ok else 'MISS'})")
    if caps and OURS in caps:
        mine = caps[OURS]
        for kind, label in (("own", "capacity (own 2x)"), ("slo", "capacity (common SLO)")):
            if "petals" in caps:
                r = _ratio(mine[kind]["rate_per_s"], caps["petals"][kind]["rate_per_s"])
                out.append(f"{label} ours/petals = {r:.2f}x (target >= 1.3x) {'OK' if r >= 1.3 else 'MISS'}")
            others = [p for p in caps if p not in (OURS, "petals", "optimal")]
            if others:
                out.append(f"{label} ours/" + ", ours/".join(
                    f"{p} = {_ratio(mine[kind]['rate_per_s'], caps[p][kind]['rate_per_s']):.2f}x" for p in others))
            if "optimal" in caps:
                r = _ratio(mine[kind]["rate_per_s"], caps["optimal"][kind]["rate_per_s"])
                out.append(f"{label} ours/optimal = {r:.3f}x (within 5%: {'OK' if r >= 0.95 else 'MISS'})")
    return out


# --- plots -----------------------------------------------------------------------------------------


def plot(summary: dict[str, dict], capacity: dict[str, dict], sizes: dict[str, int],
         output_tokens: dict[str, int]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: pip install matplotlib (plots skipped)")
        return []
    OUT.mkdir(parents=True, exist_ok=True)
    written = []
    # One point per size: the "-peak" variants (same swarm, saturating load) stay in the tables only.
    names = sorted((s for s in summary if not s.endswith("-peak")), key=lambda s: sizes[s])
    policies = [p for p in POLICY_NAMES if any(p in summary[s] for s in names)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol in policies:
        pts = [(sizes[s], summary[s][pol]["per_token_latency_ms"]["p50"]) for s in names if pol in summary[s]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=pol, linewidth=2.5 if pol == OURS else 1.2)
    ax.set(xscale="log", yscale="log", xlabel="swarm size (nodes)", ylabel="p50 per-token latency (ms)",
           title="p50 per-token latency at the scenario's load vs swarm size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = OUT / "latency_vs_size.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    cap_names = sorted((s for s in capacity if s in sizes), key=lambda s: sizes[s])
    if cap_names:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, pol in enumerate(p for p in POLICY_NAMES if any(p in capacity[s] for s in cap_names)):
            color = f"C{i}"
            for kind, style, tag in (("own", "-", "own 2x"), ("slo", "--", "common SLO")):
                pts = [(sizes[s], capacity[s][pol][kind]["rate_per_s"] * output_tokens[s]) for s in cap_names
                       if pol in capacity[s] and capacity[s][pol][kind]["rate_per_s"] > 0]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=color, label=f"{pol} ({tag})",
                            linewidth=2.5 if pol == OURS else 1.2)
        ax.set(xscale="log", yscale="log", xlabel="swarm size (nodes)", ylabel="sustainable throughput (tokens/s)",
               title="Sustainable capacity vs swarm size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = OUT / "throughput_vs_size.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", help="scenario name (file stem); default: all")
    ap.add_argument("--policy", action="append", choices=POLICY_NAMES, help="default: all")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel simulations (default: 2; scheduler timings get noisier)")
    ap.add_argument("--no-capacity", action="store_true", help="skip the sustainable-capacity search")
    ap.add_argument("--capacity-sessions", type=int, default=400,
                    help="at least this many measured arrivals per capacity probe")
    ap.add_argument("--capacity-steps", type=int, default=3, help="bisection steps (resolution 2**(1/2**N))")
    ap.add_argument("--optimal-capacity-nodes", type=int, default=6,
                    help="search optimal's capacity only on swarms of at most this many nodes")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    files = sorted(SCENARIOS.glob("*.json"))
    if args.scenario:
        files = [f for f in files if f.stem in args.scenario]
    scenarios = {f: load(f) for f in files}
    by_size = sorted(scenarios.items(), key=lambda kv: len(kv[1].nodes))
    policies = args.policy or list(POLICY_NAMES)
    jobs = []
    for f, sc in by_size:
        initial = sum(1 for n in sc.nodes if n.join_s <= 0)
        for pol in policies:
            if pol == "optimal" and initial > MAX_NODES:
                continue  # the exact MILP refuses large swarms
            jobs.append((str(f), pol))
    summary: dict[str, dict] = {}
    wall: dict[str, dict] = {}
    cpu: dict[str, dict] = {}
    for name, pol, metrics, secs, cpus in _pool_map(args.jobs, run_one, jobs):
        summary.setdefault(name, {})[pol] = metrics
        wall.setdefault(name, {})[pol] = secs
        cpu.setdefault(name, {})[pol] = cpus
    sizes = {sc.name: len(sc.nodes) for sc in scenarios.values()}
    output_tokens = {sc.name: sc.workload.output_tokens for sc in scenarios.values()}

    capacity: dict[str, dict] = {}
    cap_wall: dict[str, dict] = {}
    cap_cpu: dict[str, dict] = {}
    if not args.no_capacity:
        cap_jobs = []
        for f, sc in by_size:
            if sc.name.endswith("-peak"):
                continue
            initial = sum(1 for n in sc.nodes if n.join_s <= 0)
            for pol in policies:
                if pol == "optimal" and initial > args.optimal_capacity_nodes:
                    continue
                cap_jobs.append((str(f), pol))
        unloaded: dict[str, dict] = {}
        for name, pol, metrics, _ in _pool_map(args.jobs, run_unloaded, cap_jobs):
            unloaded.setdefault(name, {})[pol] = metrics
        slos = {name: common_slo(runs) for name, runs in unloaded.items()}
        # Largest first, so that the long searches start early and the pool stays busy.
        tasks = [(f, pol, unloaded[load(Path(f)).name][pol], slos[load(Path(f)).name].__dict__,
                  args.capacity_sessions, args.capacity_steps) for f, pol in reversed(cap_jobs)]
        for name, pol, out, secs, cpus in _pool_map(args.jobs, run_capacity, tasks):
            capacity.setdefault(name, {})[pol] = out
            cap_wall.setdefault(name, {})[pol] = secs
            cap_cpu.setdefault(name, {})[pol] = cpus

    print(f"# Scheduling benchmark: {len(scenarios)} scenarios x {len(policies)} policies, {args.jobs} jobs; "
          f"full durations, full routing (no caps); capacity probes: warm-up and cool-down of one unloaded "
          f"session, >= {args.capacity_sessions} measured arrivals, {args.capacity_steps} bisection steps")
    for name in sorted(summary, key=lambda s: (sizes[s], s)):
        print(table(name, sizes[name], summary[name], wall[name], cpu[name]))
        caps = capacity.get(name)
        if caps:
            ordered = {p: caps[p] for p in POLICY_NAMES if p in caps}
            print(capacity_table(name, ordered, output_tokens[name], cap_wall[name], cap_cpu[name]))
        for line in ratios(name, summary[name], caps):
            print("  " + line)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scheduling.json").write_text(json.dumps({"at_load": summary, "capacity": capacity}, indent=2) + "\n")
    for path in plot(summary, capacity, sizes, output_tokens):
        print(f"wrote {path.relative_to(ROOT)}")
    print(f"total wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
