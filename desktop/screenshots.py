"""Renders the first-run window, the settings window and the tray menu to PNGs, offscreen, over real parts:
the model given (default: the embedded one) and a real benchmark, and for the menu a node serving in a
local swarm. For docs/screenshots:

    QT_QPA_PLATFORM=offscreen python -m desktop.screenshots docs/screenshots [--model M] [--menu-model M]
    QT_QPA_PLATFORM=offscreen python -m desktop.screenshots docs/screenshots --settings-only

The benchmark runs for real (its cache lives in a temporary home; the model is shared from the usual one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _settle(seconds: float = 0.5) -> None:
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)


def first_run_and_settings(out: Path, model: str) -> None:
    from PySide6.QtCore import QSettings

    from desktop.first_run import FirstRunWindow
    from desktop.machine import GB, memory
    from desktop.settings import AppSettings

    settings = AppSettings(QSettings(str(Path(tempfile.mkdtemp()) / "s.conf"), QSettings.Format.IniFormat))
    window = FirstRunWindow(model, settings, memory())
    window.show()
    window.begin()
    shot_mid = False
    deadline = time.monotonic() + 600
    while window.bench is None and not window.error_label.isVisible() and time.monotonic() < deadline:
        _settle(0.05)
        if not shot_mid and window.progress_bar.value() >= 600:  # measuring: the figures are not in yet
            _settle()
            window.grab().save(str(out / "first_run_measuring.png"))
            shot_mid = True
    window.memory_picker.no_cap.setChecked(False)
    window.memory_picker.slider.setValue(int(4 * GB / (GB / 2)))
    _settle()
    window.grab().save(str(out / "first_run.png"))
    window.swarm_picker.invite.setChecked(True)
    window.swarm_picker.invite_text.setPlainText("layerhive://join?peers=/ip4/203.0.113.7/tcp/31337")
    _settle()
    window.grab().save(str(out / "first_run_bad_invite.png"))
    settings_window(out, settings)


def settings_window(out: Path, settings) -> None:
    """The settings window with a few rules ticked and 8-bit weights chosen."""
    from desktop.machine import memory
    from desktop.sensors import read_conditions
    from desktop.settings_window import SettingsWindow

    window = SettingsWindow(settings, memory(), conditions=read_conditions)
    window.show()
    window.only_when_idle.setChecked(True)
    window.use_schedule.setChecked(True)
    window.quant.setCurrentIndex(window.quant.findData("int8"))
    _settle()
    window.grab().save(str(out / "settings.png"))


def tray_menu(out: Path, model: str) -> None:
    from PySide6.QtCore import QPoint, QSettings

    from desktop.bridge import NodeBridge
    from desktop.contribution import LifetimeContribution
    from desktop.settings import AppSettings
    from desktop.swarm_choice import DEMO_LABEL
    from desktop.tray import Tray
    from node.app.controller import NodeController
    from node.app.local_swarm import LocalSwarm
    from node.client.chat import Message
    from node.model.checkpoint import resolve_model
    from node.model.sampling import SamplingParams
    from node.serve.node import NodeConfig

    source = resolve_model(model)
    half = source.num_layers // 2
    home = Path(tempfile.mkdtemp())
    with LocalSwarm(source.name, ranges=[(half, source.num_layers)], threads_per_node=1) as swarm:
        controller = NodeController(source, NodeConfig(start=0, end=half, initial_peers=swarm.initial_peers,
                                                       bench=False, max_memory_bytes=4_000_000_000))
        bridge = NodeBridge(controller)
        try:
            settings = AppSettings(QSettings(str(home / "s.conf"), QSettings.Format.IniFormat))
            tray = Tray(bridge, settings, open_chat=lambda: None, open_map=lambda: None, quit_app=lambda: None,
                        open_settings=lambda: None, open_log=lambda: None, swarm_label=DEMO_LABEL,
                        lifetime=LifetimeContribution(home / "contribution.json"))
            bridge.start().result(timeout=300)
            bridge.chat([Message("user", "Hello!")], SamplingParams(max_new_tokens=16)).result(timeout=300)
            bridge.refresh()
            _settle(1.5)
            tray.menu.popup(QPoint(0, 0))
            _settle()
            tray.menu.grab().save(str(out / "tray_menu.png"))
            tray.menu.hide()
        finally:
            bridge.stop().result(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="SmolLM2-135M", help="the model the first-run window prepares")
    parser.add_argument("--menu-model", default="SmolLM2-135M", help="the model the tray's node serves")
    parser.add_argument("--settings-only", action="store_true",
                        help="only the settings window (no model, no benchmark, no swarm: seconds)")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])  # noqa: F841 (lives while windows paint)
    args.out.mkdir(parents=True, exist_ok=True)
    from node.model.checkpoint import layerhive_home

    home = Path(tempfile.mkdtemp(prefix="layerhive-shots-"))  # no bench cache: the window measures for real
    (layerhive_home() / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(layerhive_home() / "models")
    os.environ["LAYERHIVE_HOME"] = str(home)
    if args.settings_only:
        from PySide6.QtCore import QSettings

        from desktop.settings import AppSettings

        settings_window(args.out, AppSettings(QSettings(str(home / "s.conf"), QSettings.Format.IniFormat)))
    else:
        first_run_and_settings(args.out, args.model)
        tray_menu(args.out, args.menu_model)
    print(f"wrote {sorted(p.name for p in args.out.glob('*.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
