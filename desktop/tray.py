"""The tray icon and its menu: what the node serves, on which swarm, what it has contributed (this run and
over its lifetime), pause/resume, snooze, a memory cap, settings, chat, the swarm map, the log, quit.

Three things may pause the node, and the menu says which: the contributor (Pause, remembered across
launches once it takes effect), a snooze (ends by itself), and the rules of desktop.policy (on battery,
in use, too hot, outside the schedule), which resume the node themselves once they allow it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from PySide6.QtCore import QTimer
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from desktop.bridge import NodeBridge
from desktop.contribution import LifetimeContribution
from desktop.contribution import describe as describe_lifetime
from desktop.icons import FAILED, IDLE, SERVING, hive_icon
from desktop.machine import format_gb, memory, memory_caps_gb
from desktop.policy import Decision
from desktop.settings import AppSettings
from desktop.wording import layer_range, plural
from node.app.controller import NodeStatus

_ACTIVE = ("starting", "joining", "online", "draining")


def describe(status: NodeStatus) -> tuple[str, str]:
    """(what the node does now, what it has contributed this run) in words for the menu."""
    if status.state == "online" and status.layers is not None:
        doing = f"Serving {layer_range(*status.layers)} · {plural(status.sessions, 'open session')}"
    elif status.state == "failed":
        doing = f"Stopped by an error: {status.error or 'unknown'}"
    else:
        doing = {"stopped": "Not started", "starting": "Starting…", "joining": "Joining the swarm…",
                 "draining": "Pausing: finishing open answers…", "paused": "Paused"}.get(status.state, status.state)
    minutes = status.online_s / 60
    contributed = (f"Contributed {status.tokens_for_others:,} tokens to others this run "
                   f"· {minutes:.0f} min online")
    return doing, contributed


SNOOZES = (("for 1 hour", 3600.0), ("for 4 hours", 4 * 3600.0), ("for 12 hours", 12 * 3600.0))


class Tray(QSystemTrayIcon):
    def __init__(self, bridge: NodeBridge, settings: AppSettings, *, open_chat: Callable[[], None],
                 open_map: Callable[[], None], quit_app: Callable[[], None],
                 open_settings: Callable[[], None] | None = None, open_log: Callable[[], None] | None = None,
                 swarm_label: str = "", lifetime: LifetimeContribution | None = None,
                 snoozes: Sequence[tuple[str, float]] = SNOOZES,
                 caps_gb: Sequence[float | None] | None = None) -> None:
        icons = {"online": hive_icon(SERVING), "failed": hive_icon(FAILED), "idle": hive_icon(IDLE)}
        super().__init__(icons["idle"])
        self._icons, self._icon_shown = icons, "idle"
        self.bridge, self.settings, self.lifetime, self.swarm_label = bridge, settings, lifetime, swarm_label
        self.held_by_policy: str | None = None  # why the rules keep the node paused; None: they do not
        self.policy_notes: tuple[str, ...] = ()
        self._overridden = False  # the contributor resumed against the rules: they wait until they allow it
        self._pause_pending = False  # a pause asked while starting: remembered once it took effect
        self.menu = QMenu()
        self.doing_action = self._info_action()
        self.swarm_action = self._info_action()
        self.contributed_action = self._info_action()
        self.lifetime_action = self._info_action()
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
        if caps_gb is None:  # round caps below what this machine has, and no cap
            caps_gb = [None, *memory_caps_gb(memory(settings.device).total_bytes)]
        self._add_memory_caps(caps_gb)
        self.menu.addSeparator()
        self.menu.addAction("Open chat").triggered.connect(open_chat)
        self.menu.addAction("Swarm map").triggered.connect(open_map)
        if open_settings is not None:
            self.menu.addAction("Settings…").triggered.connect(open_settings)
        if open_log is not None:
            self.menu.addAction("Open log").triggered.connect(open_log)
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

    def _add_memory_caps(self, caps_gb: Sequence[float | None]) -> None:
        """One checkable entry per cap, and the current cap even when it is not a round one (set in Settings)."""
        current = self.bridge.controller.config.max_memory_bytes
        caps = [None if gb is None else int(gb * 1e9) for gb in caps_gb]
        if current not in caps:
            caps.append(current)
        for cap in caps:
            action = self.memory_menu.addAction("No cap: what is free" if cap is None else f"At most {cap / 1e9:g} GB")
            action.setCheckable(True)
            action.setChecked(cap == current)
            self._memory_group.addAction(action)
            action.triggered.connect(lambda _=False, c=cap: self.set_memory_cap(c))

    @property
    def snoozed_until(self) -> datetime | None:
        """When the running snooze ends; None: none runs. Kept in the settings, so a relaunch keeps it."""
        return self.settings.snoozed_until

    def start(self) -> None:
        """Starts contributing at launch, unless the contributor paused last time, a snooze still runs, or
        the rules hold the node (call `apply_policy` first)."""
        until = self.snoozed_until
        if until is not None and until > datetime.now():
            self._wake.start(int((until - datetime.now()).total_seconds() * 1000))
        else:
            self.settings.snoozed_until = None
            if not self.settings.paused and self.held_by_policy is None:
                self.bridge.start()
        self.show_status(self.bridge.status())

    def show_status(self, status: NodeStatus) -> None:
        if self._pause_pending and status.state == "paused":
            self._pause_pending = False
            self.settings.paused = True  # the pause took effect: the next launch stays paused
        doing, contributed = describe(status)
        if status.state in ("paused", "stopped"):
            if self.snoozed_until is not None:
                doing = f"Snoozed until {self.snoozed_until:%H:%M}"
            elif self.settings.paused:
                doing = "Paused"
            elif self.held_by_policy is not None:
                doing = f"Paused: {self.held_by_policy}"
        self.doing_action.setText(doing)
        offered = "" if status.offered_memory_bytes is None else f"Offering {format_gb(status.offered_memory_bytes)} · "
        self.swarm_action.setText(offered + (self.swarm_label or "Swarm"))
        self.contributed_action.setText(contributed)
        if self.lifetime is not None:
            self.lifetime_action.setText(describe_lifetime(self.lifetime.add(status)))
        self.lifetime_action.setVisible(self.lifetime is not None)
        self.toggle_action.setText("Pause contributing" if status.state in _ACTIVE else "Resume contributing")
        self.toggle_action.setEnabled(status.state != "draining")
        self.snooze_menu.setEnabled(status.state in _ACTIVE and status.state != "draining")
        icon = status.state if status.state in ("online", "failed") else "idle"
        if icon != self._icon_shown:  # status arrives every second: repaint the tray only on a change
            self._icon_shown = icon
            self.setIcon(self._icons[icon])
        self.setToolTip(f"Layerhive: {doing}\n{self.swarm_label}".strip())

    def toggle(self) -> None:
        """Pause is a graceful drain: answers in flight finish first. Resume rejoins with a new assignment."""
        self._cancel_snooze()
        state = self.bridge.status().state
        if state in _ACTIVE:
            if state == "starting":  # the pause runs once the node has started: remember it when it has
                self._pause_pending = True
            else:
                self.settings.paused = True  # remembered: the next launch stays paused
            self.bridge.pause()
        else:
            self._pause_pending = False
            self.settings.paused = False
            self._overridden = self.held_by_policy is not None  # resumed against the rules: they wait
            self.held_by_policy = None
            self._contribute()

    def snooze(self, seconds: float) -> None:
        """Pauses (the same graceful drain) and resumes by itself after `seconds`, across a restart too."""
        self.settings.snoozed_until = datetime.now() + timedelta(seconds=seconds)
        self._wake.start(int(seconds * 1000))
        self.bridge.pause()

    def set_memory_cap(self, max_memory_bytes: int | None) -> None:
        self.settings.memory_cap_bytes = max_memory_bytes
        for action in self._memory_group.actions():  # Settings may change it too: keep the menu in step
            label = "No cap: what is free" if max_memory_bytes is None else f"At most {max_memory_bytes / 1e9:g} GB"
            action.setChecked(action.text() == label)
        self.bridge.set_memory_cap(max_memory_bytes)

    def apply_policy(self, decision: Decision) -> None:
        """Pauses the node when the rules say so and resumes it when they allow it again; the contributor's
        own pause and snooze come first, and a Resume clicked against the rules holds until they allow it."""
        self.policy_notes = decision.notes
        if decision.run:
            self._overridden = False
        if self.settings.paused or self.snoozed_until is not None or self._overridden:
            return
        state = self.bridge.status().state
        if not decision.run:
            first = self.held_by_policy is None
            self.held_by_policy = decision.reason
            if first and state in ("starting", "joining", "online"):
                self.bridge.pause()
        elif self.held_by_policy is not None:
            self.held_by_policy = None
            if state in ("paused", "draining", "stopped"):
                self._contribute()
        self.show_status(self.bridge.status())

    def _contribute(self) -> None:
        """Starts a node never started, resumes a paused one (after a pause still draining: the controller
        runs them in order)."""
        if self.bridge.status().state == "stopped":
            self.bridge.start()
        else:
            self.bridge.resume()

    def _end_snooze(self) -> None:
        self._cancel_snooze()
        if self.held_by_policy is None and self.bridge.status().state in ("paused", "draining", "stopped"):
            self._contribute()

    def _cancel_snooze(self) -> None:
        self._wake.stop()
        self.settings.snoozed_until = None
