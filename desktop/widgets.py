"""Pickers shared by the first-run window and the settings window: which swarm, and how much memory."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QRadioButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from desktop.machine import GB, Memory, format_gb
from desktop.swarm_choice import DEMO_LABEL, InviteError, SwarmChoice, parse_invite, public_peers
from node.serve.benchmark import BenchResult
from swarm.costmodel import layer_capacity
from swarm.types import ModelSpec, NodeSpec

STEP_BYTES = int(0.5 * GB)  # the memory slider moves in half gigabytes


def note_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet("color: palette(placeholder-text);")
    return label


class SwarmPicker(QWidget):
    """Public swarm (from the network config), an invitation (link or peers), or the demo swarm."""

    changed = Signal()

    def __init__(self, choice: SwarmChoice | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.public_peers = public_peers()
        self.public = QRadioButton("Public swarm")
        self.invite = QRadioButton("A swarm I was invited to")
        self.demo = QRadioButton(DEMO_LABEL)
        self.group = QButtonGroup(self)
        for button in (self.public, self.invite, self.demo):
            self.group.addButton(button)
        public_note = (f"Joins through {len(self.public_peers)} bootstrap peer(s) from your network settings."
                       if self.public_peers else
                       "No public swarm is configured yet (none is published so far).")
        self.public.setEnabled(bool(self.public_peers))
        self.invite_text = QPlainTextEdit()
        self.invite_text.setPlaceholderText("Paste the invite link (layerhive://join?peers=…) or the peers' addresses")
        self.invite_text.setFixedHeight(54)
        self.invite_error = QLabel()
        self.invite_error.setWordWrap(True)
        self.invite_error.setStyleSheet("color: #c0392b;")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.public)
        layout.addWidget(_indented(note_label(public_note)))
        layout.addWidget(self.invite)
        layout.addWidget(_indented(self.invite_text))
        layout.addWidget(_indented(self.invite_error))
        layout.addWidget(self.demo)
        layout.addWidget(_indented(note_label("Starts a small swarm of the model on this computer, to try Layerhive "
                                              "alone. Nobody else is served, and nothing leaves this computer.")))
        self.set_choice(choice or SwarmChoice("public" if self.public_peers else "demo"))
        self.group.buttonToggled.connect(lambda *_: self._update())
        self.invite_text.textChanged.connect(self._update)

    def set_choice(self, choice: SwarmChoice) -> None:
        if choice.kind == "invite":
            self.invite_text.setPlainText("\n".join(choice.peers))
        button = {"public": self.public, "invite": self.invite, "demo": self.demo}[choice.kind]
        (button if button.isEnabled() else self.demo).setChecked(True)
        self._update()

    def choice(self) -> SwarmChoice | None:
        """The swarm chosen; None while the invitation given cannot be used (the reason is shown)."""
        if self.demo.isChecked():
            return SwarmChoice("demo")
        if self.public.isChecked():
            return SwarmChoice("public")
        try:
            return SwarmChoice("invite", parse_invite(self.invite_text.toPlainText()))
        except InviteError:
            return None

    def _update(self) -> None:
        self.invite_text.setEnabled(self.invite.isChecked())
        error = ""
        if self.invite.isChecked():
            try:
                parse_invite(self.invite_text.toPlainText())
            except InviteError as e:
                error = str(e) if self.invite_text.toPlainText().strip() else ""
        self.invite_error.setText(error)
        self.invite_error.setVisible(bool(error))
        self.changed.emit()


class MemoryPicker(QWidget):
    """How much memory to offer, from the machine's real totals: a slider up to what it can spare (never
    above what it has), or no cap (what is free when the node starts, less headroom)."""

    changed = Signal()

    def __init__(self, machine: Memory, cap_bytes: int | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.machine = machine
        self.bench: BenchResult | None = None
        self.no_cap = QCheckBox(f"No cap: what is free when it starts, less room for your programs "
                                f"({format_gb(machine.usable_bytes)} now)")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(2, max(2, machine.max_offer_bytes // STEP_BYTES))  # 1 GB .. what it can spare
        self.slider.setPageStep(2)
        self.value_label = QLabel()
        self.value_label.setMinimumWidth(120)
        self.fit_label = note_label()
        row = QHBoxLayout()
        row.addWidget(self.slider, 1)
        row.addWidget(self.value_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.no_cap)
        layout.addWidget(note_label(f"This computer ({machine.device}) has {format_gb(machine.total_bytes)}; "
                                    f"{format_gb(machine.free_bytes)} is free now."))
        layout.addWidget(self.fit_label)
        self.set_cap(cap_bytes)
        self.slider.valueChanged.connect(self._update)
        self.no_cap.toggled.connect(self._update)

    def set_cap(self, cap_bytes: int | None) -> None:
        self.no_cap.setChecked(cap_bytes is None)
        default = cap_bytes if cap_bytes is not None else min(self.machine.usable_bytes, self.machine.max_offer_bytes)
        self.slider.setValue(max(2, round(default / STEP_BYTES)))
        self._update()

    def cap_bytes(self) -> int | None:
        return None if self.no_cap.isChecked() else min(self.slider.value() * STEP_BYTES, self.machine.max_offer_bytes)

    def set_bench(self, bench: BenchResult) -> None:
        """With the model's sizes measured, says how many of its layers the offer holds."""
        self.bench = bench
        self._update()

    def _update(self) -> None:
        self.slider.setEnabled(not self.no_cap.isChecked())
        cap = self.cap_bytes()
        offer = self.machine.usable_bytes if cap is None else cap
        self.value_label.setText("No cap" if cap is None else f"At most {format_gb(cap)}")
        self.fit_label.setVisible(self.bench is not None)
        if self.bench is not None:
            fit = layers_that_fit(self.bench, offer)
            self.fit_label.setText(f"Room for {fit} of the model's {self.bench.num_layers} layers, with their cache "
                                   f"for {self.bench.kv_sessions} conversations.")
        self.changed.emit()


def layers_that_fit(bench: BenchResult, memory_bytes: int) -> int:
    """The model's layers `memory_bytes` holds with the KV budget the node uses (as `run_bench` counts them)."""
    spec = ModelSpec(bench.model, bench.num_layers, 1, bench.layer_bytes, bench.kv_bytes_per_token_per_layer)
    node = NodeSpec("self", "", memory_bytes=memory_bytes, layer_latency_s=1.0, prefill_s_per_token_per_layer=1.0)
    return layer_capacity(spec, node, sessions=bench.kv_sessions, context_tokens=bench.kv_context_tokens)


def _indented(widget: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(24, 0, 0, 0)
    layout.addWidget(widget)
    return holder
