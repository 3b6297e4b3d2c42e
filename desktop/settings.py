"""What the app remembers between runs: the swarm chosen, the memory cap, CPU threads and device, the
rules of when to run (idle, battery, GPU temperature, a daily schedule), whether the contributor
paused, when a snooze ends, and whether the first run is done. Kept with QSettings, in the platform's
usual place (~/.config/Layerhive/Layerhive.conf on Linux, the registry on Windows, a plist on macOS).
Start at login is not kept here: desktop.login_item reads it from the system itself.

Values are stored as text and read defensively: a hand-edited file falls back to the default for the
value it broke, never stops the app from starting.
"""

from __future__ import annotations

from datetime import datetime, time

from PySide6.QtCore import QSettings

from desktop.policy import Policy
from desktop.swarm_choice import KINDS, SwarmChoice


class AppSettings:
    def __init__(self, settings: QSettings | None = None) -> None:
        self._settings = settings if settings is not None else QSettings("Layerhive", "Layerhive")

    # --- plumbing -------------------------------------------------------------------------------------

    def _text(self, key: str) -> str:
        return str(self._settings.value(key, "") or "")

    def _set(self, key: str, value: object) -> None:
        self._settings.setValue(key, "" if value is None else str(value))
        self._settings.sync()

    def _bool(self, key: str, default: bool) -> bool:
        text = self._text(key).lower()
        return default if text not in ("true", "false") else text == "true"

    def _set_bool(self, key: str, value: bool) -> None:
        self._set(key, "true" if value else "false")

    def _positive_int(self, key: str) -> int | None:
        text = self._text(key)
        return int(text) if text.isdigit() and int(text) > 0 else None

    # --- the swarm and the first run ------------------------------------------------------------------

    @property
    def first_run_done(self) -> bool:
        return self._bool("first_run_done", False)

    @first_run_done.setter
    def first_run_done(self, value: bool) -> None:
        self._set_bool("first_run_done", value)

    @property
    def swarm(self) -> SwarmChoice:
        kind = self._text("swarm/kind")
        peers = tuple(p for p in self._text("swarm/peers").split() if p)
        if kind not in KINDS or (kind == "invite" and not peers):
            return SwarmChoice("demo")
        return SwarmChoice(kind, peers if kind == "invite" else ())

    @swarm.setter
    def swarm(self, choice: SwarmChoice) -> None:
        self._set("swarm/kind", choice.kind)
        self._set("swarm/peers", " ".join(choice.peers))

    # --- resources ------------------------------------------------------------------------------------

    @property
    def memory_cap_bytes(self) -> int | None:
        """The most memory offered to the swarm; None: no cap."""
        return self._positive_int("memory_cap_bytes")

    @memory_cap_bytes.setter
    def memory_cap_bytes(self, value: int | None) -> None:
        self._set("memory_cap_bytes", value or None)

    @property
    def threads(self) -> int | None:
        """CPU threads for the layers; None: torch's default (all cores)."""
        return self._positive_int("threads")

    @threads.setter
    def threads(self, value: int | None) -> None:
        self._set("threads", value or None)

    @property
    def device(self) -> str | None:
        """Where layers run ("cpu", "cuda:0", "mps"); None: the best one found."""
        return self._text("device") or None

    @device.setter
    def device(self, value: str | None) -> None:
        self._set("device", value)

    # --- when to run ----------------------------------------------------------------------------------

    @property
    def only_when_idle(self) -> bool:
        return self._bool("policy/only_when_idle", False)

    @only_when_idle.setter
    def only_when_idle(self, value: bool) -> None:
        self._set_bool("policy/only_when_idle", value)

    @property
    def idle_minutes(self) -> int:
        return self._positive_int("policy/idle_minutes") or 5

    @idle_minutes.setter
    def idle_minutes(self, value: int) -> None:
        self._set("policy/idle_minutes", value)

    @property
    def pause_on_battery(self) -> bool:
        return self._bool("policy/pause_on_battery", True)

    @pause_on_battery.setter
    def pause_on_battery(self, value: bool) -> None:
        self._set_bool("policy/pause_on_battery", value)

    @property
    def max_gpu_temp_c(self) -> int | None:
        """Pause above this GPU temperature; None: no limit."""
        return self._positive_int("policy/max_gpu_temp_c")

    @max_gpu_temp_c.setter
    def max_gpu_temp_c(self, value: int | None) -> None:
        self._set("policy/max_gpu_temp_c", value)

    @property
    def schedule(self) -> tuple[time, time] | None:
        """Run only from the first time of day to the second; None: any time."""
        try:
            start, end = (time.fromisoformat(self._text(f"policy/schedule_{k}")) for k in ("start", "end"))
        except ValueError:
            return None
        return start, end

    @schedule.setter
    def schedule(self, value: tuple[time, time] | None) -> None:
        self._set("policy/schedule_start", value[0].strftime("%H:%M") if value else None)
        self._set("policy/schedule_end", value[1].strftime("%H:%M") if value else None)

    def policy(self) -> Policy:
        return Policy(only_when_idle=self.only_when_idle, idle_after_s=60.0 * self.idle_minutes,
                      pause_on_battery=self.pause_on_battery,
                      max_gpu_temp_c=float(self.max_gpu_temp_c) if self.max_gpu_temp_c else None,
                      schedule=self.schedule)

    # --- the contributor's pause and snooze -----------------------------------------------------------

    @property
    def paused(self) -> bool:
        """The contributor paused, and did not resume: the next start stays paused."""
        return self._bool("paused", False)

    @paused.setter
    def paused(self, value: bool) -> None:
        self._set_bool("paused", value)

    @property
    def snoozed_until(self) -> datetime | None:
        value = self._text("snoozed_until")
        try:
            return datetime.fromisoformat(value) if value else None
        except ValueError:  # a hand-edited file: forget the snooze rather than fail to start
            return None

    @snoozed_until.setter
    def snoozed_until(self, value: datetime | None) -> None:
        self._set("snoozed_until", value.isoformat() if value else None)
