"""What the app remembers between runs: the memory cap, whether the contributor paused, and when a snooze
ends. Kept with QSettings, in the platform's usual place (~/.config/Layerhive/Layerhive.conf on Linux, the
registry on Windows, a plist on macOS)."""

from __future__ import annotations

from datetime import datetime

from PySide6.QtCore import QSettings


class AppSettings:
    def __init__(self, settings: QSettings | None = None) -> None:
        self._settings = settings if settings is not None else QSettings("Layerhive", "Layerhive")

    @property
    def memory_cap_bytes(self) -> int | None:
        """The most memory offered to the swarm; None: no cap."""
        value = self._settings.value("memory_cap_bytes", "")
        return int(value) if str(value).isdigit() and int(value) > 0 else None

    @memory_cap_bytes.setter
    def memory_cap_bytes(self, value: int | None) -> None:
        self._settings.setValue("memory_cap_bytes", str(value or ""))
        self._settings.sync()

    @property
    def paused(self) -> bool:
        """The contributor paused, and did not resume: the next start stays paused."""
        return str(self._settings.value("paused", "false")).lower() == "true"

    @paused.setter
    def paused(self, value: bool) -> None:
        self._settings.setValue("paused", "true" if value else "false")
        self._settings.sync()

    @property
    def snoozed_until(self) -> datetime | None:
        value = str(self._settings.value("snoozed_until", ""))
        try:
            return datetime.fromisoformat(value) if value else None
        except ValueError:  # a hand-edited file: forget the snooze rather than fail to start
            return None

    @snoozed_until.setter
    def snoozed_until(self, value: datetime | None) -> None:
        self._settings.setValue("snoozed_until", value.isoformat() if value else "")
        self._settings.sync()
