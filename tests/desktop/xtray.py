"""Driving the real app from outside, as a user would: an X server (Xvfb) with a system tray (trayer), the app
(`tray_probe.py`) in it, and real mouse and keyboard events (xdotool). Used by test_real_tray.py and by
take_screenshots.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

NEEDED = ("Xvfb", "trayer", "xdotool")
PROBE = Path(__file__).with_name("tray_probe.py")
ROOT = Path(__file__).resolve().parents[2]
TRAY_HEIGHT = 32


def missing_tools() -> list[str]:
    return [tool for tool in NEEDED if shutil.which(tool) is None]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        time.sleep(every_s)
    return result


class TrayDisplay:
    """Xvfb on a free display, with trayer docked along its bottom edge, icons from the right, 32 px tall: with no
    window manager, windows open at the top left corner, and would cover a tray there."""

    def __init__(self, workdir: Path, size: str = "1280x800") -> None:
        self.workdir, self.size = workdir, size
        self.processes: list[subprocess.Popen] = []
        self.display = ""

    def __enter__(self) -> TrayDisplay:
        try:
            self.display = self._start_x()
            self._spawn(["trayer", "--edge", "bottom", "--align", "right", "--widthtype", "request", "--height",
                         str(TRAY_HEIGHT), "--SetDockType", "true", "--transparent", "false"], "trayer.log")
            wait_for(lambda: self.xdotool("search", "--class", "trayer", check=False), 30, "trayer's window")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_x(self, attempts: int = 5) -> str:
        """Xvfb on a free display number, high and random: other programs on this machine may start and stop X
        servers on the low ones (and remove their sockets) meanwhile."""
        for _ in range(attempts):
            number = random.randrange(200, 2000)
            if os.path.exists(f"/tmp/.X{number}-lock"):
                continue
            read, write = os.pipe()
            self._spawn(["Xvfb", f":{number}", "-displayfd", str(write), "-screen", "0", f"{self.size}x24",
                         "-nolisten", "tcp"], "xvfb.log", pass_fds=(write,))
            os.close(write)
            with os.fdopen(read) as ready:  # Xvfb writes its display number once it accepts clients
                if ready.readline().strip() == str(number):
                    return f":{number}"
            self.processes.pop().wait()  # it could not take that display
        raise RuntimeError(f"Xvfb did not start; see {self.workdir / 'xvfb.log'}")

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()

    def _spawn(self, command: Sequence[str], log: str, **kwargs) -> subprocess.Popen:
        with open(self.workdir / log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env(), **kwargs)
        self.processes.append(process)
        return process

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(base if base is not None else os.environ)
        env["DISPLAY"] = self.display
        return env

    def xdotool(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["xdotool", *args], env=self.env(), capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"xdotool {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def visible_windows(self, title: str) -> list[str]:
        return self.xdotool("search", "--onlyvisible", "--name", title, check=False).split()


class AppUnderTest:
    """The real app, started in `display` with a home of its own, probed (`tray_probe.py`)."""

    def __init__(self, display: TrayDisplay, home: Path, args: Sequence[str]) -> None:
        self.display, self.home = display, home
        self.report = home / "probe.jsonl"
        env = display.env()
        for name in ("LAYERHIVE_HOME", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS"):
            env.pop(name, None)  # no tray over D-Bus: the X tray (XEmbed) is the one under test
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_CACHE_HOME=str(home / ".cache"), XDG_STATE_HOME=str(home / ".local/state"),
                   QT_QPA_PLATFORM="xcb", LAYERHIVE_PROBE=str(self.report), PYTHONPATH=str(ROOT))
        self.log = home / "app.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen([sys.executable, str(PROBE), *args], env=env, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT)

    def seen(self) -> list[dict]:
        if not self.report.exists():
            return []
        return [json.loads(line) for line in self.report.read_text().splitlines() if line.strip()]

    def last_seen(self, kind: str, after: int = 0) -> dict | None:
        """The last window of class `kind` shown or hidden, among reports from index `after` on."""
        return next((seen for seen in reversed(self.seen()[after:]) if seen["class"] == kind), None)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tray_icon_center(self, timeout_s: float) -> tuple[int, int]:
        """Where the app's icon sits in the tray, once it is docked there."""
        def docked() -> tuple[int, int] | None:
            assert self.alive(), f"the app exited ({self.process.returncode}); see {self.log}"
            icon = self.last_seen("QSystemTrayIconSys")
            if icon is None or not icon["visible"]:
                return None
            x, y, width, height = icon["rect"]
            return x + width // 2, y + height // 2

        return wait_for(docked, timeout_s, "the app's icon in the tray", every_s=0.5)

    def open_menu(self, icon: tuple[int, int]) -> dict:
        """Right-clicks the tray icon; returns the menu as shown (its entries and where each is)."""
        before = len(self.seen())
        self.display.xdotool("mousemove", str(icon[0]), str(icon[1]), "click", "3")
        return wait_for(lambda: self._shown_menu(before), 20, "the tray menu")

    def _shown_menu(self, after: int) -> dict | None:
        menu = self.last_seen("QMenu", after)
        return menu if menu is not None and menu["visible"] else None

    def close_menu(self) -> None:
        self.display.xdotool("key", "Escape")
        time.sleep(0.3)

    def choose(self, menu: dict, text: str) -> dict | None:
        """Clicks the entry `text` of a shown menu; returns the submenu it opens, if it opens one."""
        entry = next((a for a in menu["actions"] if a["text"] == text), None)
        assert entry is not None, f"no {text!r} in the menu: {[a['text'] for a in menu['actions']]}"
        assert entry["enabled"], f"{text!r} is disabled"
        before = len(self.seen())
        self.display.xdotool("mousemove", str(entry["center"][0]), str(entry["center"][1]), "click", "1")
        with contextlib.suppress(TimeoutError):  # a plain entry opens nothing
            return wait_for(lambda: self._shown_menu(before), 1.5, "a submenu")
        return None

    def menu_until(self, icon: tuple[int, int], holds: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
        """Opens the menu every few seconds until what it shows satisfies `holds` (it is left open)."""
        def check() -> dict | None:
            menu = self.open_menu(icon)
            if holds(menu):
                return menu
            self.close_menu()
            time.sleep(1.5)
            return None

        return wait_for(check, timeout_s, what, every_s=0)

    def ask(self, line: str) -> None:
        with open(f"{self.report}.ask", "a") as out:
            out.write(line + "\n")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (the app leaves the swarm and stops its demo swarm, as on Quit), SIGKILL if it hangs."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
