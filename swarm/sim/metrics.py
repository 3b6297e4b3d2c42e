"""Collect a run's measurements and turn them into the metrics of scenario-format.md."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def weighted_percentile(values: list[float], weights: list[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q (0..1) of the total; nan when empty."""
    if not values:
        return float("nan")
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    idx = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(v[order][min(idx, len(v) - 1)])


@dataclass
class Recorder:
    """Raw measurements of one simulation run."""

    duration_s: float
    arrivals: int = 0
    completed: int = 0
    failed: int = 0
    window_tokens: int = 0  # output tokens produced inside [0, duration_s]
    token_latency: list[float] = field(default_factory=list)  # per-token decode time (s) ...
    token_weight: list[float] = field(default_factory=list)  # ... and how many tokens it covers
    ttft: list[float] = field(default_factory=list)
    uncovered_s: float = 0.0
    layers_moved: int = 0
    failovers: int = 0
    allocate_s: float = 0.0
    route_s: list[float] = field(default_factory=list)

    def tokens(self, per_token_s: float, start: float, count: int, *, measured: bool = True) -> None:
        """Record `count` decode tokens at `per_token_s` each, produced from time `start` on.

        Every token counts towards throughput; only `measured` ones towards the latency percentiles.
        """
        if count <= 0:
            return
        if measured:
            self.token_latency.append(per_token_s)
            self.token_weight.append(count)
        if start < self.duration_s:
            in_window = count if per_token_s <= 0 else int((self.duration_s - start) / per_token_s)
            self.window_tokens += min(count, in_window)

    def summary(self, pending: int) -> dict:
        def ms(x: float) -> float:
            return round(x * 1000.0, 3)

        lat, w = self.token_latency, self.token_weight
        return {
            "throughput_tokens_per_s": round(self.window_tokens / self.duration_s, 3),
            "per_token_latency_ms": {
                "p50": ms(weighted_percentile(lat, w, 0.50)),
                "p95": ms(weighted_percentile(lat, w, 0.95)),
            },
            "ttft_ms": {
                "p50": ms(weighted_percentile(self.ttft, [1.0] * len(self.ttft), 0.50)),
                "p95": ms(weighted_percentile(self.ttft, [1.0] * len(self.ttft), 0.95)),
            },
            "completed": self.completed,
            "failed": self.failed,
            "pending": pending,  # still waiting or running when the drain period ran out
            "arrivals": self.arrivals,
            "uncovered_s": round(self.uncovered_s, 3),
            "layers_moved": self.layers_moved,
            "failovers": self.failovers,
            "scheduler_ms": {
                "allocate": round(self.allocate_s * 1000.0, 3),
                "route_p50": round(float(np.median(self.route_s)) * 1000.0, 4) if self.route_s else 0.0,
            },
        }
