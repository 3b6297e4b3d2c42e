"""Installs Layerhive for the current user (no root), from the wheel that sits beside this package (see build.py).

1. stops a running Layerhive of an earlier install (it is being replaced),
2. makes a virtual environment in the user's data directory,
3. installs torch for this machine's accelerator (installer/torch_source.py), then the Layerhive wheel with its
   dependencies, from the user's own pip settings,
4. checks the system libraries Qt needs (installer/syslibs.py),
5. adds the menu entry and, if the person agrees (or `--login-item yes`), the login item (installer/recipes.py),
6. starts the app and checks it keeps running.

Every change is recorded (installer/changes.py): if a step fails or the person cancels, all of it is undone and
an earlier install comes back as it was. pip's output goes to the install log, which failures name.
`--uninstall` (installer/uninstall.py) removes what the manifest of the install lists.

Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from contextlib import contextmanager
from pathlib import Path

from installer import processes
from installer.changes import Changes, missing_parents, read_manifest, write_manifest
from installer.commands import InstallError, pip_install, run_logged
from installer.layout import APP, Layout, layout_for
from installer.progress import Cancelled, Log, Progress, QtWindow, TkWindow, has_display, tk_available
from installer.recipes import integration_items
from installer.syslibs import qt_problem
from installer.torch_source import choose_torch, detect_accelerator, pip_flag

PAYLOAD = Path(__file__).resolve().parent.parent  # the unpacked installer: this package, the wheel, the icon
ICON = "layerhive.png"
STARTUP_CHECK_S = 180.0  # the first start imports torch and Qt from a cold disk
STARTED = "layerhive-app started"  # the line desktop/app.py logs once Qt has its display


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerhive-install", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uninstall", action="store_true", help="stop Layerhive and remove it")
    parser.add_argument("--login-item", choices=("yes", "no"), default=None,
                        help="start Layerhive at login, without asking (default: ask)")
    parser.add_argument("--remove-data", choices=("yes", "no"), default=None,
                        help="with --uninstall: also remove settings, identity key and models, without asking")
    parser.add_argument("--no-launch", action="store_true", help="do not start the app afterwards")
    parser.add_argument("--no-gui", action="store_true", help="no progress window, even with a display")
    parser.add_argument("--offline", action="store_true",
                        help="install only the wheel; its dependencies must already be importable (see next)")
    parser.add_argument("--system-site-packages", action="store_true",
                        help="let the environment see this Python's packages (e.g. a torch already installed)")
    parser.add_argument("--startup-check-s", type=float, default=STARTUP_CHECK_S,
                        help="how long to wait for the started app to say it is up")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = layout_for(sys.platform, os.environ)
    state_parents = missing_parents(Path(layout.state))
    log = Log(Path(layout.install_log))
    log.write(f"=== layerhive-install {' '.join(sys.argv[1:])} (Python {sys.version.split()[0]}, {sys.executable})")
    title = f"{'Uninstall' if args.uninstall else 'Install'} {APP.name}"
    progress = Progress(log, title)

    def work() -> int:
        return run(args, layout, progress, state_parents)

    if not args.no_gui and has_display() and tk_available():
        window = TkWindow(title, progress)
        progress.window = window
        with cancel_on_signals(progress, interrupt=False):
            return window.run(work)
    with cancel_on_signals(progress, interrupt=True):
        return work()


def run(args: argparse.Namespace, layout: Layout, progress: Progress, state_parents: list[Path]) -> int:
    try:
        if args.uninstall:
            from installer.uninstall import uninstall

            text, code = uninstall(layout, progress, remove_data=yes_no(args.remove_data), state_parents=state_parents)
        else:
            text, code = install(args, layout, progress, state_parents)
        progress.finish(code == 0, text)
        return code
    except (Cancelled, KeyboardInterrupt):
        progress.finish(False, f"Stopped: everything this run changed was undone. The log: {progress.log.path}")
        return 130
    except InstallError as e:
        progress.finish(False, f"{e}\nNothing is half-installed. The log: {progress.log.path}")
        return 1
    except Exception as e:  # a bug: the person gets a sentence, the log gets the traceback
        progress.log.write(traceback.format_exc())
        progress.finish(False, f"Unexpected error: {type(e).__name__}: {e}\n"
                               f"Nothing is half-installed. The log: {progress.log.path}")
        return 1
    finally:
        if isinstance(progress.window, QtWindow):
            progress.window.wait_closed()


@contextmanager
def cancel_on_signals(progress: Progress, *, interrupt: bool):
    """SIGTERM and Ctrl-C cancel like the window's Cancel: the work stops and is undone. `interrupt`: the work runs
    on this (the main) thread, so stop it where it is; else (a window's loop runs here) the worker sees the flag."""
    def cancel(*_):
        if progress.cancelled.is_set():
            return  # already stopping: a second signal must not interrupt the undoing
        progress.cancelled.set()
        if interrupt:
            raise Cancelled()

    previous = {number: signal.signal(number, cancel) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def yes_no(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def find_wheel() -> Path:
    wheels = sorted(PAYLOAD.glob("layerhive-*.whl"))
    if not wheels:
        raise InstallError(f"There is no Layerhive wheel beside the installer in {PAYLOAD}: build the installer "
                           "with `python installer/build.py`.")
    return wheels[-1]


def install(args: argparse.Namespace, layout: Layout, progress: Progress, state_parents: list[Path]
            ) -> tuple[str, int]:
    wheel = find_wheel()
    icon = (PAYLOAD / ICON).read_bytes()
    root = Path(layout.root)
    progress.step(0.01, "Looking for a running Layerhive")
    previous = read_manifest(Path(layout.manifest))
    was_running = bool(processes.stop_app(root))
    if was_running:
        progress.say("Stopped the running Layerhive: it is being replaced.")
    changes = Changes(previous["dirs"] if previous else [])
    try:
        install_environment(args, layout, progress, changes, wheel)
        progress.step(0.92, "Checking the system libraries Qt needs")
        problem = qt_problem(str(layout.python)) if layout.platform == "linux" else None
        progress.step(0.94, "Adding Layerhive to the menu")
        login_item = choose_login_item(args, progress, previous, layout)
        for item in integration_items(layout, icon, login_item=login_item):
            changes.apply(item)
        write_manifest(Path(layout.manifest), changes.manifest(state_parents))
        progress.check()
    except BaseException:
        undone = changes.rollback()
        progress.log.write("rolled back" + "".join(f"\n  could not undo {p}" for p in undone))
        if was_running and not undone:  # the earlier install is back as it was: so is its app
            start_app(layout)
        raise
    changes.commit()
    added = "the menu entry" + (" and the login item" if login_item else "")
    text = f"Layerhive is installed in {root}, with {added}."
    if problem:
        return f"{text}\n\n{problem}\nThen start Layerhive from the menu.", 0
    if args.no_launch:
        return f"{text} Start it from the menu.", 0
    if not has_display() and not os.environ.get("QT_QPA_PLATFORM"):
        return f"{text} There is no display here: start it from the menu of your desktop session.", 0
    progress.step(0.97, "Starting Layerhive")
    failure = check_started(layout, args.startup_check_s)
    if failure:
        return f"{text}\n\nBut {failure}", 1
    return f"{text}\nLayerhive is running: look for the amber honeycomb in your tray.", 0


def install_environment(args, layout: Layout, progress: Progress, changes: Changes, wheel: Path) -> None:
    progress.step(0.03, "Making a private Python environment")
    changes.make_tree(Path(layout.root))
    venv = [sys.executable, "-m", "venv", *(["--system-site-packages"] if args.system_site_packages else []),
            str(layout.venv)]
    run_logged(venv, progress, what="Making the Python environment")
    python = str(layout.python)
    pip = pip_install(python)
    open_qt_window(progress, python)  # PySide6 may already be visible (--system-site-packages)
    if args.offline:
        progress.step(0.10, "Installing Layerhive")
        run_logged([*pip, "--no-deps", "--no-index", str(wheel)], progress, what="Installing Layerhive")
        return
    progress.step(0.06, "Looking for this computer's GPU")
    choice = choose_torch(detect_accelerator(), pip_no_index=pip_flag(python, "no-index"), log=progress.log.write)
    progress.say(f"torch build: {choice.note}")
    if progress.window is None and has_display():  # no Tk: install Qt first, then show progress in a Qt window
        progress.step(0.08, "Installing Qt, to show this progress in a window")
        run_logged([*pip, qt_requirement(wheel)], progress, what="Installing Qt (PySide6)", span=(0.08, 0.15))
        open_qt_window(progress, python)
    progress.step(0.15, f"Installing torch ({choice.requirement.partition('==')[2] or 'from your package index'})")
    install_torch(pip, choice, progress)
    progress.step(0.60, "Installing Layerhive and the libraries it uses")
    run_logged([*pip, str(wheel)], progress, what="Installing Layerhive's libraries", span=(0.60, 0.91))


def install_torch(pip: list[str], choice, progress: Progress) -> None:
    """From torch's index for the accelerator when it answered; from the user's index if that fails midway."""
    if choice.extra_index:
        try:
            run_logged([*pip, choice.requirement, "--extra-index-url", choice.extra_index], progress,
                       what=f"Installing {choice.requirement}", span=(0.15, 0.59))
            return
        except InstallError as e:
            progress.say(f"torch's index failed ({str(e).splitlines()[0]}): trying your package index instead.")
    run_logged([*pip, "torch"], progress, what="Installing torch", span=(0.15, 0.59))


def qt_requirement(wheel: Path) -> str:
    """PySide6 as the wheel requires it (one source of truth: pyproject.toml, via the wheel's metadata)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(metadata).decode().splitlines():
            if line.lower().startswith("requires-dist: pyside6"):
                return line.split(":", 1)[1].split(";")[0].strip()
    return "pyside6"


def open_qt_window(progress: Progress, python: str) -> None:
    """A Qt progress window when there is a display, no window yet, and PySide6 in the environment."""
    if progress.window is not None or not has_display():
        return
    found = subprocess.run([python, "-c", "import importlib.util as u; print(bool(u.find_spec('PySide6')))"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    if found == "True":
        progress.window = QtWindow(python, progress.title, progress)
        progress.window.send({"step": [progress.fraction, progress.text]})


def choose_login_item(args, progress: Progress, previous: dict | None, layout: Layout) -> bool:
    """The flag; else the person's answer; else (nobody to ask) what the earlier install had; else no."""
    if args.login_item is not None:
        return args.login_item == "yes"
    answer = progress.ask("Start Layerhive when you log in, so it contributes while your computer is on? "
                          "(You can pause it from its menu at any time.)")
    if answer is not None:
        return answer
    had = previous is not None and (str(layout.login_item) in previous.get("files", []) or previous.get("run_keys"))
    progress.say("Nobody to ask about starting at login: " + ("kept as before." if had else "not added."))
    return bool(had)


def start_app(layout: Layout) -> subprocess.Popen:
    """The app, detached from the installer (its own session), its output in the launch log."""
    with open(Path(layout.launch_log), "w") as output:
        return subprocess.Popen([str(layout.app_executable)], stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, cwd=Path.home(), start_new_session=True)


def check_started(layout: Layout, wait_s: float) -> str | None:
    """Starts the app detached, its output in the launch log, and waits until it says it is up (None), or ends
    (what it said), or `wait_s` passes (None: still starting, which a slow first start may be)."""
    log_path = Path(layout.launch_log)
    process = start_app(layout)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        said = log_path.read_text(errors="replace")
        if STARTED in said:
            return None
        if process.poll() is not None:
            tail = "\n  ".join(said.strip().splitlines()[-8:])
            return (f"it stopped at once (exit code {process.returncode}). It said:\n  {tail}\n"
                    f"Its output: {log_path}")
        time.sleep(0.25)
    return None

if __name__ == "__main__":
    sys.exit(main())
