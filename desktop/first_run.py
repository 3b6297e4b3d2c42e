"""The first-run window: on screen at once, it fetches the model and measures this computer (with progress),
says what is shared, shows what was measured (device, ms per layer, memory, uplink), and lets the user
choose the swarm and the memory to offer before anything is served."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from desktop.icons import SERVING, hive_icon
from desktop.machine import Memory, format_gb
from desktop.settings import AppSettings
from desktop.swarm_choice import SwarmChoice
from desktop.widgets import MemoryPicker, SwarmPicker, note_label
from node.model.checkpoint import ModelSource, resolve_model
from node.serve.benchmark import BenchResult, measure_network, run_bench

logger = logging.getLogger(__name__)

SHARED = (
    "<p><b>What is shared.</b> While Layerhive runs, this computer holds some of the model's layers and computes "
    "them for other people's chats (and yours): it uses the processor or GPU below, the memory you choose, and "
    "your network (it passes its layers' outputs on: kilobytes per token). Pause, snooze or quit from the tray "
    "at any time.</p>"
    "<p><b>What is not.</b> None of your files. But the chats you type pass through other volunteers' computers, "
    "as theirs pass through yours: do not type secrets.</p>"
)


@dataclass(frozen=True)
class FirstRunResult:
    source: ModelSource
    bench: BenchResult
    swarm: SwarmChoice
    memory_cap_bytes: int | None


class Preparation(QObject):
    """Fetches the model and measures this computer on a worker thread; reports through queued signals."""

    progress = Signal(str, float)
    finished = Signal(object, object)  # ModelSource, BenchResult
    failed = Signal(str)

    def __init__(self, model: str, device: str | None) -> None:
        super().__init__()
        self.model, self.device = model, device

    def start(self) -> None:
        threading.Thread(target=self._run, name="layerhive-first-run", daemon=True).start()

    def _run(self) -> None:
        try:
            source = resolve_model(self.model, progress=lambda text, f: self.progress.emit(
                f"Preparing the model: {text}", 0.5 * f))
            bench = run_bench(source, device=self.device, progress=lambda text, f: self.progress.emit(
                f"Measuring this computer: {text}", 0.5 + 0.5 * f))
        except Exception as e:
            logger.exception("first-run preparation failed")
            self.failed.emit(f"{type(e).__name__}: {e}")
            return
        self.finished.emit(source, bench)


class UplinkProbe(QObject):
    """Measures the uplink to a swarm's peers on a worker thread (a few seconds)."""

    measured = Signal(str)  # the words to show

    def start(self, peers: list[str], model: str) -> None:
        def run() -> None:
            try:
                result = asyncio.run(measure_network(peers, model))
                text = (f"{result.uplink_bps / 1e6:.1f} Mbit/s" if result.uplink_bps is not None else
                        "not measured: " + (result.notes[-1] if result.notes else "no peer answered"))
            except Exception as e:
                text = f"not measured: {type(e).__name__}: {e}"
            self.measured.emit(text)

        threading.Thread(target=run, name="layerhive-uplink", daemon=True).start()


class FirstRunWindow(QWidget):
    accepted = Signal(object)  # FirstRunResult, once the user clicks Start
    quit_requested = Signal()

    def __init__(self, model: str, settings: AppSettings, machine: Memory, *,
                 open_log: Callable[[], None] | None = None, auto_accept: bool = False,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model, self.settings, self.machine, self.auto_accept = model, settings, machine, auto_accept
        self.source: ModelSource | None = None
        self.bench: BenchResult | None = None
        self.result: FirstRunResult | None = None
        self._probed: tuple[str, ...] | None = None
        self.setWindowTitle("Welcome to Layerhive")
        self.setWindowIcon(hive_icon(SERVING))

        title = QLabel("Welcome to Layerhive")
        font = QFont(title.font())
        font.setPointSizeF(font.pointSizeF() * 1.6)
        font.setBold(True)
        title.setFont(font)
        intro = QLabel("Layerhive runs a language model across many volunteers' computers: each holds a few of "
                       "its layers, and together they answer everyone's chats.")
        intro.setWordWrap(True)
        shared = QLabel(SHARED)
        shared.setWordWrap(True)
        shared.setTextFormat(Qt.TextFormat.RichText)

        self.step_label = QLabel("Starting…")
        self.step_label.setWordWrap(True)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.device_value, self.speed_value = QLabel("measuring…"), QLabel("measuring…")
        self.memory_value, self.uplink_value = QLabel("measuring…"), QLabel("chosen swarm first")
        for label in (self.device_value, self.speed_value, self.memory_value, self.uplink_value):
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        figures = QFormLayout()
        figures.addRow("Device:", self.device_value)
        figures.addRow("Speed:", self.speed_value)
        figures.addRow("Memory:", self.memory_value)
        figures.addRow("Uplink:", self.uplink_value)
        computer = QGroupBox("This computer")
        computer_layout = QVBoxLayout(computer)
        computer_layout.addWidget(self.step_label)
        computer_layout.addWidget(self.progress_bar)
        computer_layout.addLayout(figures)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #c0392b;")
        self.error_label.hide()

        self.swarm_picker = SwarmPicker(settings.swarm if settings.first_run_done else None)
        swarm_box = QGroupBox("Swarm")
        QVBoxLayout(swarm_box).addWidget(self.swarm_picker)
        self.memory_picker = MemoryPicker(machine, settings.memory_cap_bytes)
        memory_box = QGroupBox("Memory to offer")
        QVBoxLayout(memory_box).addWidget(self.memory_picker)

        self.start_button = QPushButton("Measuring…")
        self.start_button.setMinimumWidth(160)
        self.start_button.setDefault(True)
        self.start_button.setEnabled(False)
        self.retry_button = QPushButton("Try again")
        self.retry_button.hide()
        self.log_button = QPushButton("Open log")
        self.log_button.setVisible(open_log is not None)
        quit_button = QPushButton("Quit")
        buttons = QHBoxLayout()
        buttons.addWidget(self.log_button)
        buttons.addStretch(1)
        buttons.addWidget(quit_button)
        buttons.addWidget(self.retry_button)
        buttons.addWidget(self.start_button)

        left = QVBoxLayout()
        left.addWidget(title)
        left.addWidget(intro)
        left.addWidget(shared)
        left.addWidget(computer)
        left.addWidget(self.error_label)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addWidget(swarm_box)
        right.addWidget(memory_box)
        right.addWidget(note_label("You can change all of this later in Settings, from the tray icon."))
        right.addStretch(1)
        columns = QHBoxLayout()
        columns.addLayout(left, 1)
        columns.addSpacing(12)
        columns.addLayout(right, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(columns, 1)
        layout.addLayout(buttons)
        self.resize(940, 600)

        self.preparation = Preparation(model, settings.device)
        self.preparation.progress.connect(self._on_progress)
        self.preparation.finished.connect(self._on_prepared)
        self.preparation.failed.connect(self._on_failed)
        self.uplink_probe = UplinkProbe()
        self.uplink_probe.measured.connect(self._on_uplink)
        self.swarm_picker.changed.connect(self._on_swarm_changed)
        self.start_button.clicked.connect(self.accept)
        self.retry_button.clicked.connect(self.begin)
        quit_button.clicked.connect(self.quit_requested.emit)
        if open_log is not None:
            self.log_button.clicked.connect(open_log)
        self._on_swarm_changed()

    # --- the work -------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Starts fetching and measuring (the window stays responsive)."""
        self.error_label.hide()
        self.retry_button.hide()
        self.start_button.setText("Measuring…")
        self.preparation.start()

    def _on_progress(self, text: str, fraction: float) -> None:
        self.step_label.setText(text)
        self.progress_bar.setValue(int(1000 * fraction))

    def _on_prepared(self, source: ModelSource, bench: BenchResult) -> None:
        self.source, self.bench = source, bench
        self.progress_bar.setValue(1000)
        self.step_label.setText(f"Ready: {source.name} ({source.num_layers} layers) is prepared and this computer "
                                "is measured.")
        self.device_value.setText(f"{bench.device_name} · {bench.dtype}")
        speed = f"{bench.stage_layer_latency_s() * 1e3:.2f} ms per layer per token"
        busy = [note for note in bench.notes if note.startswith("other programs")]
        if busy:  # a loaded machine measures slow: say so rather than show the figure as this computer's best
            speed += f" ({busy[0].split(':')[0]}: a pessimistic figure)"
        self.speed_value.setText(speed)
        self.memory_value.setText(f"{format_gb(self.machine.total_bytes)} in all, "
                                  f"{format_gb(bench.memory_available_bytes)} free; "
                                  f"one layer takes {bench.layer_bytes / 1e6:.1f} MB")
        self.memory_picker.set_bench(bench)
        self._on_swarm_changed()
        if self.auto_accept:  # scripted start: take the choices shown
            QTimer.singleShot(0, self.accept)

    def _on_failed(self, text: str) -> None:
        self.step_label.setText("Stopped.")
        self.error_label.setText(f"Layerhive could not prepare this computer: {text}\n"
                                 "The log has the details; try again, or quit.")
        self.error_label.show()
        self.retry_button.show()
        self.start_button.setText("Start contributing")
        self.start_button.setEnabled(False)

    def _on_swarm_changed(self) -> None:
        choice = self.swarm_picker.choice()
        ready = self.bench is not None and choice is not None
        self.start_button.setEnabled(ready)
        if self.bench is not None:
            self.start_button.setText("Start contributing" if choice is None or not choice.is_demo
                                      else "Start the demo")
        if choice is None:
            self.uplink_value.setText("measured once a swarm is chosen")
        elif choice.is_demo:
            self.uplink_value.setText("not used: the demo swarm runs on this computer only")
        elif self.source is not None:
            try:
                peers = tuple(choice.initial_peers())
            except Exception as e:
                self.uplink_value.setText(f"not measured: {e}")
                return
            if peers != self._probed:
                self._probed = peers
                self.uplink_value.setText("measuring to the swarm's peers…")
                self.uplink_probe.start(list(peers), self.source.name)

    def _on_uplink(self, text: str) -> None:
        self.uplink_value.setText(text)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if self.result is None:  # closed before starting: the user leaves
            self.quit_requested.emit()
        super().closeEvent(event)

    def accept(self) -> None:
        choice = self.swarm_picker.choice()
        if self.source is None or self.bench is None or choice is None:
            return
        self.result = FirstRunResult(self.source, self.bench, choice, self.memory_picker.cap_bytes())
        self.start_button.setEnabled(False)
        self.start_button.setText("Starting…")
        self.accepted.emit(self.result)
