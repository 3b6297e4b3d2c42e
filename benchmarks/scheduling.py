"""Scheduling benchmark: every policy on every scenario in benchmarks/scenarios/.

Prints a table per scenario, the ratios the scheduler is judged by (ours vs Petals throughput, our
p50 per-token latency vs every baseline, ours vs the exact optimum where it runs), writes all
metrics to benchmarks/out/scheduling.json and PNG plots of latency and throughput against swarm
size to benchmarks/out/ (needs matplotlib: pip install matplotlib).

    python benchmarks/scheduling.py [--scenario NAME ...] [--policy NAME ...] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.baselines.optimal import MAX_NODES  # noqa: E402
from swarm.sim.engine import simulate  # noqa: E402
from swarm.sim.policies import POLICY_NAMES  # noqa: E402
from swarm.sim.scenario import Scenario, parse_scenario  # noqa: E402

SCENARIOS = ROOT / "benchmarks" / "scenarios"
OUT = ROOT / "benchmarks" / "out"
OURS = "layerhive"


def load(path: Path) -> Scenario:
    return parse_scenario(json.loads(path.read_text()))


def run_one(path: str, policy: str) -> tuple[str, str, dict, float]:
    sc = load(Path(path))
    t0 = time.perf_counter()
    metrics = simulate(sc, policy)
    return sc.name, policy, metrics, time.perf_counter() - t0


def table(name: str, n_nodes: int, results: dict[str, dict], wall: dict[str, float]) -> str:
    head = (f"{'policy':<10} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'ttft50':>8} {'ttft95':>8} "
            f"{'done':>6} {'fail':>6} {'pend':>5} {'uncov s':>7} {'moved':>6} {'alloc ms':>9} "
            f"{'route ms':>8} {'sim s':>6}")
    lines = [f"\n## {name} ({n_nodes} nodes)", head, "-" * len(head)]
    for pol, m in results.items():
        lines.append(
            f"{pol:<10} {m['throughput_tokens_per_s']:>8.1f} {m['per_token_latency_ms']['p50']:>8.1f} "
            f"{m['per_token_latency_ms']['p95']:>8.1f} {m['ttft_ms']['p50']:>8.0f} {m['ttft_ms']['p95']:>8.0f} "
            f"{m['completed']:>6} {m['failed']:>6} {m['pending']:>5} {m['uncovered_s']:>7.1f} "
            f"{m['layers_moved']:>6} {m['scheduler_ms']['allocate']:>9.1f} "
            f"{m['scheduler_ms']['route_p50']:>8.3f} {wall[pol]:>6.1f}"
        )
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> list[str]:
    if OURS not in results:
        return []
    ours = results[OURS]
    out = []
    if "petals" in results:
        base = results["petals"]["throughput_tokens_per_s"]
        r = ours["throughput_tokens_per_s"] / base if base else float("inf")
        out.append(f"throughput ours/petals = {r:.2f}x (target >= 1.3x) {'OK' if r >= 1.3 else 'MISS'}")
    for pol, m in results.items():
        if pol == OURS:
            continue
        p_ours, p_base = ours["per_token_latency_ms"]["p50"], m["per_token_latency_ms"]["p50"]
        verdict = "lower" if p_ours < p_base else "NOT lower"
        out.append(f"p50 latency ours/{pol} = {p_ours / p_base:.3f} ({verdict})")
    if "optimal" in results:
        opt = results["optimal"]
        lat = ours["per_token_latency_ms"]["p50"] / opt["per_token_latency_ms"]["p50"]
        thr = ours["throughput_tokens_per_s"] / opt["throughput_tokens_per_s"]
        ok = lat <= 1.05 and thr >= 0.95
        out.append(f"vs optimal: p50 latency {lat:.3f}x, throughput {thr:.3f}x (within 5%: {'OK' if ok else 'MISS'})")
    return out


def plot(summary: dict[str, dict], sizes: dict[str, int]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: pip install matplotlib (plots skipped)")
        return []
    OUT.mkdir(parents=True, exist_ok=True)
    # One point per size: the "-peak" variants (same swarm, saturating load) stay in the tables only.
    names = sorted((s for s in summary if not s.endswith("-peak")), key=lambda s: sizes[s])
    policies = [p for p in POLICY_NAMES if any(p in summary[s] for s in names)]
    written = []
    for key, label, fname in (
        (lambda m: m["per_token_latency_ms"]["p50"], "p50 per-token latency (ms)", "latency_vs_size.png"),
        (lambda m: m["throughput_tokens_per_s"], "throughput (tokens/s)", "throughput_vs_size.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for pol in policies:
            xs = [sizes[s] for s in names if pol in summary[s]]
            ys = [key(summary[s][pol]) for s in names if pol in summary[s]]
            ax.plot(xs, ys, marker="o", label=pol, linewidth=2.5 if pol == OURS else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("swarm size (nodes)")
        ax.set_ylabel(label)
        ax.set_title(label + " vs swarm size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = OUT / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", help="scenario name (file stem); default: all")
    ap.add_argument("--policy", action="append", choices=POLICY_NAMES, help="default: all")
    ap.add_argument("--jobs", type=int, default=1, help="parallel simulations (scheduler timings get noisier)")
    args = ap.parse_args(argv)
    files = sorted(SCENARIOS.glob("*.json"))
    if args.scenario:
        files = [f for f in files if f.stem in args.scenario]
    scenarios = {f: load(f) for f in files}
    jobs = []
    for f, sc in sorted(scenarios.items(), key=lambda kv: len(kv[1].nodes)):
        for pol in args.policy or POLICY_NAMES:
            initial = sum(1 for n in sc.nodes if n.join_s <= 0)
            if pol == "optimal" and initial > MAX_NODES:
                continue  # the exact MILP refuses large swarms
            jobs.append((str(f), pol))
    summary: dict[str, dict] = {}
    wall: dict[str, dict] = {}
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            done = list(pool.map(run_one, *zip(*jobs, strict=True)))
    else:
        done = [run_one(f, p) for f, p in jobs]
    for name, pol, metrics, secs in done:
        summary.setdefault(name, {})[pol] = metrics
        wall.setdefault(name, {})[pol] = secs
    sizes = {sc.name: len(sc.nodes) for sc in scenarios.values()}
    for name in sorted(summary, key=lambda s: sizes[s]):
        print(table(name, sizes[name], summary[name], wall[name]))
        for line in ratios(summary[name]):
            print("  " + line)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scheduling.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in plot(summary, sizes):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
