"""The settings window: swarm, memory, CPU threads and device, when to run (idle, battery, GPU temperature,
a daily schedule), start at login. Saved to desktop.settings (and the login item to the system); what
needs the node restarted (swarm, threads, device) says so and offers a restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import time

from PySide6.QtCore import QTime, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTimeEdit,
    QVBoxLayout,
    QWidget,
)

from desktop import login_item
from desktop.icons import SERVING, hive_icon
from desktop.machine import Memory, cpu_threads, devices
from desktop.policy import Conditions
from desktop.settings import AppSettings
from desktop.widgets import MemoryPicker, SwarmPicker, note_label

RESTART_KEYS = ("swarm", "threads", "device")  # read when the node starts: they apply after a restart


class SettingsWindow(QWidget):
    saved = Signal(object)  # the set of setting names that changed
    restart_requested = Signal()

    def __init__(self, settings: AppSettings, machine: Memory, *, conditions: Callable[[], Conditions] | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings, self.machine = settings, machine
        self.setWindowTitle("Layerhive settings")
        self.setWindowIcon(hive_icon(SERVING))
        readings = conditions() if conditions is not None else None

        self.swarm_picker = SwarmPicker(settings.swarm)
        swarm_box = QGroupBox("Swarm")
        QVBoxLayout(swarm_box).addWidget(self.swarm_picker)

        self.memory_picker = MemoryPicker(machine, settings.memory_cap_bytes)
        self.threads = QSpinBox()
        self.threads.setRange(0, cpu_threads())
        self.threads.setSpecialValueText(f"All ({cpu_threads()})")  # 0: torch's default
        self.threads.setValue(settings.threads or 0)
        self.device = QComboBox()
        self.device.addItem("Automatic (the fastest found)", None)
        for name, label in devices():
            self.device.addItem(label, name)
        self.device.setCurrentIndex(max(0, self.device.findData(settings.device)))
        resources = QGroupBox("What to lend")
        resources_form = QFormLayout(resources)
        resources_form.addRow("Memory:", self.memory_picker)
        resources_form.addRow("CPU threads:", self.threads)
        resources_form.addRow("Run layers on:", self.device)

        self.only_when_idle = QCheckBox("Only when the computer is not in use, after")
        self.only_when_idle.setChecked(settings.only_when_idle)
        self.idle_minutes = QSpinBox()
        self.idle_minutes.setRange(1, 240)
        self.idle_minutes.setSuffix(" min without input")
        self.idle_minutes.setValue(settings.idle_minutes)
        self.pause_on_battery = QCheckBox("Pause on battery power")
        self.pause_on_battery.setChecked(settings.pause_on_battery)
        self.limit_temperature = QCheckBox("Pause when the GPU is hotter than")
        self.limit_temperature.setChecked(settings.max_gpu_temp_c is not None)
        self.max_temperature = QSpinBox()
        self.max_temperature.setRange(50, 100)
        self.max_temperature.setSuffix(" °C")
        self.max_temperature.setValue(settings.max_gpu_temp_c or 80)
        self.use_schedule = QCheckBox("Only between")
        self.schedule_start, self.schedule_end = QTimeEdit(), QTimeEdit()
        for edit in (self.schedule_start, self.schedule_end):
            edit.setDisplayFormat("HH:mm")
        start, end = settings.schedule or (time(22, 0), time(7, 0))
        self.use_schedule.setChecked(settings.schedule is not None)
        self.schedule_start.setTime(QTime(start.hour, start.minute))
        self.schedule_end.setTime(QTime(end.hour, end.minute))
        when = QGroupBox("When to run")
        when_layout = QVBoxLayout(when)
        when_layout.addLayout(_row(self.only_when_idle, self.idle_minutes))
        when_layout.addWidget(self.pause_on_battery)
        when_layout.addLayout(_row(self.limit_temperature, self.max_temperature))
        when_layout.addLayout(_row(self.use_schedule, self.schedule_start, QLabel("and"), self.schedule_end))
        if readings is not None:
            for note in _sensor_notes(readings):
                when_layout.addWidget(note_label(note))

        self.start_at_login = QCheckBox("Start Layerhive when I log in")
        self.start_at_login.setChecked(login_item.is_enabled())

        self.restart_note = note_label()
        self.restart_note.hide()
        self.restart_button = QPushButton("Restart now")
        self.restart_button.hide()
        self.save_button = QPushButton("Save")
        self.save_button.setDefault(True)
        close_button = QPushButton("Close")
        buttons = QHBoxLayout()
        buttons.addWidget(self.restart_note)
        buttons.addStretch(1)
        buttons.addWidget(self.restart_button)
        buttons.addWidget(close_button)
        buttons.addWidget(self.save_button)

        left, right = QVBoxLayout(), QVBoxLayout()
        left.addWidget(swarm_box)
        left.addWidget(self.start_at_login)
        left.addStretch(1)
        right.addWidget(resources)
        right.addWidget(when)
        right.addStretch(1)
        columns = QHBoxLayout()
        columns.addLayout(left, 2)
        columns.addLayout(right, 3)
        layout = QVBoxLayout(self)
        layout.addLayout(columns, 1)
        layout.addLayout(buttons)
        self.resize(960, 540)

        self.only_when_idle.toggled.connect(self._update)
        self.limit_temperature.toggled.connect(self._update)
        self.use_schedule.toggled.connect(self._update)
        self.swarm_picker.changed.connect(self._update)
        self.save_button.clicked.connect(self.save)
        close_button.clicked.connect(self.close)
        self.restart_button.clicked.connect(self.restart_requested.emit)
        self._update()

    def _update(self) -> None:
        self.idle_minutes.setEnabled(self.only_when_idle.isChecked())
        self.max_temperature.setEnabled(self.limit_temperature.isChecked())
        self.schedule_start.setEnabled(self.use_schedule.isChecked())
        self.schedule_end.setEnabled(self.use_schedule.isChecked())
        self.save_button.setEnabled(self.swarm_picker.choice() is not None)

    def save(self) -> set[str]:
        """Writes every setting; returns (and emits) the names of those that changed."""
        s = self.settings
        before = {name: getattr(s, name) for name in _SAVED}
        swarm = self.swarm_picker.choice()
        if swarm is not None:
            s.swarm = swarm
        s.memory_cap_bytes = self.memory_picker.cap_bytes()
        s.threads = self.threads.value() or None
        s.device = self.device.currentData()
        s.only_when_idle = self.only_when_idle.isChecked()
        s.idle_minutes = self.idle_minutes.value()
        s.pause_on_battery = self.pause_on_battery.isChecked()
        s.max_gpu_temp_c = self.max_temperature.value() if self.limit_temperature.isChecked() else None
        s.schedule = ((_time(self.schedule_start.time()), _time(self.schedule_end.time()))
                      if self.use_schedule.isChecked() else None)
        changed = {name for name in _SAVED if getattr(s, name) != before[name]}
        if self.start_at_login.isChecked() != login_item.is_enabled():
            try:
                login_item.set_enabled(self.start_at_login.isChecked())
                changed.add("start_at_login")
            except OSError as e:
                QMessageBox.warning(self, "Layerhive", f"Could not change the login item: {e}")
                self.start_at_login.setChecked(login_item.is_enabled())
        pending = [_NAMES[key] for key in RESTART_KEYS if key in changed]
        self.restart_note.setText(f"Saved. The change of {' and '.join(pending)} applies once Layerhive restarts."
                                  if pending else "Saved.")
        self.restart_note.show()
        self.restart_button.setVisible(bool(pending))
        self.saved.emit(changed)
        return changed


_NAMES = {"swarm": "swarm", "threads": "CPU threads", "device": "device"}
_SAVED = ("swarm", "memory_cap_bytes", "threads", "device", "only_when_idle", "idle_minutes", "pause_on_battery",
          "max_gpu_temp_c", "schedule")


def _time(value: QTime) -> time:
    return time(value.hour(), value.minute())


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    row.addStretch(1)
    return row


def _sensor_notes(readings: Conditions) -> list[str]:
    """What this machine cannot report, so the rule depending on it is known to have no effect."""
    notes = []
    if readings.idle_s is None:
        notes.append("This desktop does not report idle time: 'not in use' cannot be checked here.")
    if readings.on_battery is None:
        notes.append("No battery found: the battery rule never pauses this computer.")
    if readings.gpu_temp_c is None:
        notes.append("No NVIDIA GPU sensor found: the temperature rule is not checked here.")
    return notes
