"""`layerhive simulate SCENARIO.json --policy NAME [--policy NAME ...] [--json]`.

Runs the swarm simulator (swarm.sim) on a scenario file for one or more scheduling policies and
prints a table per policy, or with --json one object keyed by policy name. A malformed scenario is
reported on one line naming the bad key, with exit code 2. Also runnable as
`python -m node.app.cli_simulate ...` until the main CLI wires it in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarm.baselines.optimal import OptimalTooLarge
from swarm.sim.engine import POLICY_NAMES, simulate
from swarm.sim.scenario import ScenarioError, parse_scenario

EXIT_BAD_INPUT = 2


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a swarm scenario under scheduling policies",
        description="Simulate a swarm scenario (see shared/reference/scenario-format.md) under one or "
        "more scheduling policies and print their metrics.",
    )
    p.add_argument("scenario", metavar="SCENARIO.json", help="scenario file")
    p.add_argument(
        "--policy", action="append", choices=POLICY_NAMES, metavar="NAME",
        help=f"policy to run, repeatable ({', '.join(POLICY_NAMES)}); default: layerhive",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by policy name")
    p.set_defaults(func=run_simulate)
    return p


def load_scenario(path: str):
    """Read and validate a scenario file; raise ScenarioError with a one-line message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScenarioError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    return parse_scenario(obj)


def format_table(name: str, m: dict) -> str:
    rows = [
        ("throughput (tokens/s)", f"{m['throughput_tokens_per_s']:.1f}"),
        ("per-token latency p50 / p95 (ms)",
         f"{m['per_token_latency_ms']['p50']:.1f} / {m['per_token_latency_ms']['p95']:.1f}"),
        ("time to first token p50 / p95 (ms)", f"{m['ttft_ms']['p50']:.0f} / {m['ttft_ms']['p95']:.0f}"),
        ("completed / failed / pending", f"{m['completed']} / {m['failed']} / {m['pending']}"),
        ("uncovered (s)", f"{m['uncovered_s']:.1f}"),
        ("layers moved", str(m["layers_moved"])),
        ("scheduler: allocate / route p50 (ms)",
         f"{m['scheduler_ms']['allocate']:.1f} / {m['scheduler_ms']['route_p50']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"== {name}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def run_simulate(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as e:
        print(f"layerhive simulate: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    results: dict[str, dict] = {}
    for name in args.policy or ["layerhive"]:
        if name in results:
            continue
        try:
            results[name] = simulate(scenario, name)
        except OptimalTooLarge as e:
            print(f"layerhive simulate: {name}: {e}", file=sys.stderr)
            return 1
        if not args.json:
            print(format_table(name, results[name]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerhive")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
