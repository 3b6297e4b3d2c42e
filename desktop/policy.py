"""When the node may run: the contributor's rules (only when idle, not on battery, not when the GPU is hot,
within a daily schedule) applied to what the machine reports now. A pure function, so it is tested
directly; the app calls it from a timer with fresh readings (desktop.sensors) and pauses or resumes.

A reading the machine cannot give (no battery, no NVIDIA GPU, idle time unknown on this desktop) turns
its rule off, with a note saying so, rather than stopping the node for ever or failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time

TEMPERATURE_HYSTERESIS_C = 5.0  # a node paused for heat resumes only this far below the limit: no flapping


@dataclass(frozen=True)
class Policy:
    only_when_idle: bool = False
    idle_after_s: float = 300.0  # no keyboard or mouse input for this long counts as idle
    pause_on_battery: bool = True
    max_gpu_temp_c: float | None = None  # None: no limit
    schedule: tuple[time, time] | None = None  # run only from the first time to the second (may wrap midnight)


@dataclass(frozen=True)
class Conditions:
    now: datetime
    idle_s: float | None = None  # seconds since the last input; None: this desktop cannot tell
    on_battery: bool | None = None  # None: no battery, or unknown
    gpu_temp_c: float | None = None  # the hottest GPU; None: no sensor


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str = ""  # why not, in words for the tray ("on battery power")
    notes: tuple[str, ...] = ()  # rules that could not be checked here


def in_schedule(now: time, start: time, end: time) -> bool:
    """Whether `now` falls in [start, end); a window whose end is before its start runs over midnight."""
    if start == end:
        return True  # an empty window would never run: read it as "all day"
    if start < end:
        return start <= now < end
    return now >= start or now < end


def decide(policy: Policy, conditions: Conditions, *, running: bool) -> Decision:
    """Run or pause now. `running`: whether the node runs at the moment (for the temperature hysteresis)."""
    notes: list[str] = []
    reasons: list[str] = []
    if policy.schedule is not None:
        start, end = policy.schedule
        if not in_schedule(conditions.now.time(), start, end):
            reasons.append(f"outside the schedule ({start:%H:%M}–{end:%H:%M})")
    if policy.pause_on_battery and conditions.on_battery:
        reasons.append("on battery power")
    if policy.max_gpu_temp_c is not None:
        if conditions.gpu_temp_c is None:
            notes.append("no GPU temperature sensor found: the temperature limit is not checked")
        else:
            limit = policy.max_gpu_temp_c if running else policy.max_gpu_temp_c - TEMPERATURE_HYSTERESIS_C
            if conditions.gpu_temp_c > limit:
                reasons.append(f"GPU at {conditions.gpu_temp_c:.0f} °C (limit {policy.max_gpu_temp_c:.0f} °C)")
    if policy.only_when_idle:
        if conditions.idle_s is None:
            notes.append("this desktop does not report idle time: 'only when idle' is not checked")
        elif conditions.idle_s < policy.idle_after_s:
            reasons.append("the computer is in use")
    return Decision(not reasons, "; ".join(reasons), tuple(notes))
