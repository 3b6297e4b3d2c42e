"""Sustainable capacity: the highest arrival rate a policy carries while still meeting a latency target.

Throughput measured at a scenario's own arrival rate is the offered load whenever the swarm keeps up,
so it says nothing about the scheduler. This module searches the arrival rate instead:

    unloaded_run(scenario, policy) -> dict                         # metrics at ~no load
    own_slo(unloaded) -> Slo        # the policy's own unloaded p95s x 2: "degrades at most 2x"
    common_slo(unloaded_by_policy) -> Slo   # the best unloaded p50 token / p95 TTFT of all policies x 2
    search_capacity(scenario, policy, slo, unloaded, *, min_sessions=400, steps=3, runs=None) -> Capacity

A run *meets* an Slo when failed + still pending < 1% of arrivals, p95 per-token latency <= its bound,
and p95 time to first token <= its bound (a policy that queues instead of failing, like ours, must not
pass by letting its queue grow). Runs use the swarm as it stands at t=0 (later joins and all departures
dropped: the capacity of a static swarm) under the scenario's Poisson arrivals (same clients, prompt
and output lengths, seed) at the probed rate, for warm-up + measured interval + cool-down: latencies
count only for sessions arriving in the measured interval, so that they run under full load from start
to end. Warm-up and cool-down last one unloaded session (TTFT + output x per-token time, from the
policy's unloaded run); the measured interval lasts as long, and at least `min_sessions` arrivals.

Why two targets. The issue's suggestion, "p95 <= 2x the policy's own unloaded p50", fails some
policies at *zero* load on swarms whose clients sit at different distances (their unloaded p95 already
exceeds 2x their p50), and it is lenient to a policy that is slow even unloaded. So `own_slo` bounds the
degradation (loaded p95 against unloaded p95, per policy), and `common_slo` holds every policy to the
same user-facing target (twice what the best policy delivers unloaded): goodput at a common SLO.

The search starts from the unloaded run (rate UNLOADED_RATE_PER_S: if even it misses the target, the
capacity is 0), doubles the rate from the scenario's own until a rate misses (halving instead, down to
the unloaded rate, if the first misses), then bisects geometrically `steps` times: the answer is within
a factor 2**(1 / 2**steps) (9% for steps=3) below the threshold. Deterministic; probes are cached in
`runs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm.sim.engine import simulate
from swarm.sim.scenario import Scenario

UNLOADED_RATE_PER_S = 0.25  # one request every four seconds: no batching, no queue
UNLOADED_WINDOW_S = 400.0  # ~100 requests: a stable p95
MAX_FAILED_SHARE = 0.01
FACTOR = 2.0


@dataclass(frozen=True)
class Slo:
    """What a run must meet to count as sustained."""

    token_p95_ms: float
    ttft_p95_ms: float
    max_failed_share: float = MAX_FAILED_SHARE

    def why_not(self, metrics: Mapping) -> str:
        """Why the run misses this target ('' when it meets it)."""
        arrivals = max(1, metrics["arrivals"])
        lost = metrics["failed"] + metrics["pending"]
        if lost > self.max_failed_share * arrivals:
            return f"failed+pending {lost}/{arrivals}"
        p95 = metrics["per_token_latency_ms"]["p95"]
        if not p95 <= self.token_p95_ms:  # also catches nan (no token produced)
            return f"p95 per-token {p95:.0f} > {self.token_p95_ms:.0f} ms"
        ttft = metrics["ttft_ms"]["p95"]
        if not ttft <= self.ttft_p95_ms:
            return f"p95 TTFT {ttft:.0f} > {self.ttft_p95_ms:.0f} ms"
        return ""


@dataclass
class Capacity:
    policy: str
    slo: Slo
    rate_per_s: float  # highest rate that met the target (0: none of the probes did)
    tokens_per_s: float  # output tokens per second measured at that rate
    at_capacity: dict | None  # metrics of the run at `rate_per_s`
    probes: list[tuple[float, str]] = field(default_factory=list)  # (rate, why it missed; '' = met)

    def as_dict(self) -> dict:
        return {
            "rate_per_s": round(self.rate_per_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "slo": dataclasses.asdict(self.slo),
            "at_capacity": self.at_capacity,
            "probes": [{"rate_per_s": round(r, 3), "missed": why} for r, why in self.probes],
        }


def static_swarm(scenario: Scenario, rate_per_s: float, window_s: float) -> Scenario:
    """The scenario's t=0 swarm with no churn, under `rate_per_s` arrivals for `window_s` seconds."""
    nodes = tuple(dataclasses.replace(n, leave_s=None) for n in scenario.nodes if n.join_s <= 0)
    workload = dataclasses.replace(scenario.workload, arrival_rate_per_s=rate_per_s, duration_s=window_s)
    return dataclasses.replace(scenario, nodes=nodes, workload=workload)


def unloaded_run(scenario: Scenario, policy: str) -> dict:
    """The policy's metrics at about no load (a request every few seconds) on the static swarm."""
    return simulate(static_swarm(scenario, UNLOADED_RATE_PER_S, UNLOADED_WINDOW_S), policy)


def own_slo(unloaded: Mapping, factor: float = FACTOR) -> Slo:
    """Degrade at most `factor` x: the policy's own unloaded p95 per-token latency and TTFT."""
    return Slo(factor * unloaded["per_token_latency_ms"]["p95"], factor * unloaded["ttft_ms"]["p95"])


def common_slo(unloaded_by_policy: Mapping[str, Mapping], factor: float = FACTOR) -> Slo:
    """One target for all: `factor` x the best unloaded p50 per-token latency and p95 TTFT of any policy."""
    runs = [m for m in unloaded_by_policy.values() if m["completed"] > 0]
    if not runs:
        return Slo(0.0, 0.0)
    return Slo(factor * min(m["per_token_latency_ms"]["p50"] for m in runs),
               factor * min(m["ttft_ms"]["p95"] for m in runs))


def probe_plan(unloaded: Mapping, output_tokens: int, rate_per_s: float, min_sessions: int) -> tuple[float, float]:
    """(warm-up = cool-down, measured interval) in seconds for a probe at `rate_per_s`."""
    session_s = (unloaded["ttft_ms"]["p50"] + output_tokens * unloaded["per_token_latency_ms"]["p50"]) / 1000
    session_s = session_s if math.isfinite(session_s) and session_s > 0 else 60.0
    return session_s, max(session_s, min_sessions / rate_per_s)


def search_capacity(
    scenario: Scenario,
    policy: str,
    slo: Slo,
    unloaded: Mapping,
    *,
    min_sessions: int = 400,
    steps: int = 3,
    max_doublings: int = 10,
    runs: dict[float, dict] | None = None,
) -> Capacity:
    """The highest arrival rate at which `policy` meets `slo` (see the module docstring)."""
    runs = {} if runs is None else runs  # rate -> metrics; pass the same dict to reuse probes
    probes: list[tuple[float, str]] = []

    def meets(rate: float) -> bool:
        if rate not in runs:
            edge, measured = probe_plan(unloaded, scenario.workload.output_tokens, rate, min_sessions)
            runs[rate] = simulate(static_swarm(scenario, rate, 2 * edge + measured), policy,
                                  measure_from_s=edge, measure_until_s=edge + measured)
        why = slo.why_not(runs[rate])
        probes.append((rate, why))
        return not why

    missed = slo.why_not(unloaded)
    if missed:  # more load only makes it slower: not even the unloaded run meets the target
        return Capacity(policy, slo, 0.0, 0.0, None, [(UNLOADED_RATE_PER_S, "unloaded: " + missed)])
    good, bad = UNLOADED_RATE_PER_S, math.inf  # the unloaded run is a probe that met the target
    runs.setdefault(good, dict(unloaded))
    rate = scenario.workload.arrival_rate_per_s
    if meets(rate):
        good = rate
        for _ in range(max_doublings):
            rate *= 2
            if not meets(rate):
                bad = rate
                break
            good = rate
    else:
        bad = rate
        while rate / 2 > good:
            rate /= 2
            if meets(rate):
                good = rate
                break
            bad = rate
    if math.isfinite(bad):
        for _ in range(steps):
            mid = math.sqrt(good * bad)
            good, bad = (mid, bad) if meets(mid) else (good, mid)
    at = runs.get(good)
    return Capacity(policy, slo, good, at["throughput_tokens_per_s"] if at else 0.0, at, probes)
