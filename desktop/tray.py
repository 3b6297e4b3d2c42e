"""The tray icon and its menu: what the node serves and has contributed, pause/resume, snooze, a memory cap,
chat, the swarm map, quit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from PySide6.QtCore import QTimer
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from desktop.bridge import NodeBridge
from desktop.icons import FAILED, IDLE, SERVING, hive_icon
from desktop.settings import AppSettings
from desktop.wording import layer_range, plural
from node.app.controller import NodeStatus

_ACTIVE = ("starting", "joining", "online", "draining")


def describe(status: NodeStatus) -> tuple[str, str]:
    """(what the node does now, what it has contributed) in words for the menu."""
    if status.state == "online" and status.layers is not None:
        doing = f"Serving {layer_range(*status.layers)} · {plural(status.sessions, 'open session')}"
    elif status.state == "failed":
        doing = f"Stopped by an error: {status.error or 'unknown'}"
    else:
        doing = {"stopped": "Not started", "starting": "Starting…", "joining": "Joining the swarm…",
                 "draining": "Pausing: finishing open answers…", "paused": "Paused"}.get(status.state, status.state)
    minutes = status.online_s / 60
    contributed = (f"Contributed {status.tokens_served:,} tokens to {status.sessions_opened:,} sessions "
                   f"in {minutes:.0f} min online")
    return doing, contributed


MEMORY_CAPS_GB = (None, 2, 4, 8, 16, 32)  # None: no cap
SNOOZES = (("for 1 hour", 3600.0), ("for 4 hours", 4 * 3600.0), ("for 12 hours", 12 * 3600.0))


class Tray(QSystemTrayIcon):
    def __init__(self, bridge: NodeBridge, settings: AppSettings, *, open_chat: Callable[[], None],
                 open_map: Callable[[], None], quit_app: Callable[[], None],
                 snoozes: Sequence[tuple[str, float]] = SNOOZES,
                 memory_caps_gb: Sequence[float | None] = MEMORY_CAPS_GB) -> None:
        icons = {"online": hive_icon(SERVING), "failed": hive_icon(FAILED), "idle": hive_icon(IDLE)}
        super().__init__(icons["idle"])
        self._icons, self._icon_shown = icons, "idle"
        self.bridge, self.settings = bridge, settings
        self.menu = QMenu()
        self.doing_action = self._info_action()
        self.contributed_action = self._info_action()
        self.menu.addSeparator()
        self.toggle_action = self.menu.addAction("Pause contributing")
        self.toggle_action.triggered.connect(self.toggle)
        self.snooze_menu = self.menu.addMenu("Snooze")
        for label, seconds in snoozes:
            self.snooze_menu.addAction(label).triggered.connect(lambda _=False, s=seconds: self.snooze(s))
        self._wake = QTimer(self)  # ends a snooze
        self._wake.setSingleShot(True)
        self._wake.timeout.connect(self._end_snooze)
        self.memory_menu = self.menu.addMenu("Memory for the swarm")
        self._memory_group = QActionGroup(self)
        for gigabytes in memory_caps_gb:
            action = self.memory_menu.addAction("No cap" if gigabytes is None else f"At most {gigabytes:g} GB")
            action.setCheckable(True)
            cap = None if gigabytes is None else int(gigabytes * 1e9)
            action.setChecked(cap == bridge.controller.config.max_memory_bytes)
            self._memory_group.addAction(action)
            action.triggered.connect(lambda _=False, c=cap: self.set_memory_cap(c))
        self.menu.addAction("Open chat").triggered.connect(open_chat)
        self.menu.addAction("Swarm map").triggered.connect(open_map)
        self.menu.addSeparator()
        self.menu.addAction("Quit Layerhive").triggered.connect(quit_app)
        self.setContextMenu(self.menu)
        self.activated.connect(lambda reason: open_chat() if reason == QSystemTrayIcon.ActivationReason.Trigger
                               else None)
        bridge.status_changed.connect(self.show_status)
        bridge.failed.connect(lambda text: self.showMessage("Layerhive", text, QSystemTrayIcon.MessageIcon.Warning))
        self.show_status(bridge.status())

    def _info_action(self) -> QAction:
        action = self.menu.addAction("")
        action.setEnabled(False)
        return action

    @property
    def snoozed_until(self) -> datetime | None:
        """When the running snooze ends; None: none runs. Kept in the settings, so a relaunch keeps it."""
        return self.settings.snoozed_until

    def start(self) -> None:
        """Starts contributing at launch, unless the contributor paused last time or a snooze still runs."""
        until = self.snoozed_until
        if until is not None and until > datetime.now():
            self._wake.start(int((until - datetime.now()).total_seconds() * 1000))
        else:
            self.settings.snoozed_until = None
            if not self.settings.paused:
                self.bridge.start()
        self.show_status(self.bridge.status())

    def show_status(self, status: NodeStatus) -> None:
        doing, contributed = describe(status)
        if status.state in ("paused", "stopped") and self.snoozed_until is not None:
            doing = f"Snoozed until {self.snoozed_until:%H:%M}"
        elif status.state == "stopped" and self.settings.paused:
            doing = "Paused"
        self.doing_action.setText(doing)
        self.contributed_action.setText(contributed)
        self.toggle_action.setText("Pause contributing" if status.state in _ACTIVE else "Resume contributing")
        self.toggle_action.setEnabled(status.state != "draining")
        self.snooze_menu.setEnabled(status.state in _ACTIVE and status.state != "draining")
        icon = status.state if status.state in ("online", "failed") else "idle"
        if icon != self._icon_shown:  # status arrives every second: repaint the tray only on a change
            self._icon_shown = icon
            self.setIcon(self._icons[icon])
        self.setToolTip(f"Layerhive: {doing}")

    def toggle(self) -> None:
        """Pause is a graceful drain: answers in flight finish first. Resume rejoins with a new assignment."""
        self._cancel_snooze()
        if self.bridge.status().state in _ACTIVE:
            self.settings.paused = True  # remembered: the next launch stays paused
            self.bridge.pause()
        else:
            self.settings.paused = False
            self._contribute()

    def snooze(self, seconds: float) -> None:
        """Pauses (the same graceful drain) and resumes by itself after `seconds`, across a restart too."""
        self.settings.snoozed_until = datetime.now() + timedelta(seconds=seconds)
        self._wake.start(int(seconds * 1000))
        self.bridge.pause()

    def set_memory_cap(self, max_memory_bytes: int | None) -> None:
        self.settings.memory_cap_bytes = max_memory_bytes
        self.bridge.set_memory_cap(max_memory_bytes)

    def _contribute(self) -> None:
        """Starts a node never started, resumes a paused one (after a pause still draining: the controller
        runs them in order)."""
        if self.bridge.status().state == "stopped":
            self.bridge.start()
        else:
            self.bridge.resume()

    def _end_snooze(self) -> None:
        self._cancel_snooze()
        if self.bridge.status().state in ("paused", "draining", "stopped"):
            self._contribute()

    def _cancel_snooze(self) -> None:
        self._wake.stop()
        self.settings.snoozed_until = None
