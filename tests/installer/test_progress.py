"""What the person installing sees: the terminal line without pip's output, the Qt window (in this process,
offscreen, its question answered by clicking Yes; and as the helper process the installer starts), and the Tk
window on a real X server (Xvfb) run by a Python that has Tk."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer.progress import Log, Progress, QtWindow

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt starts: no display needed
REPO = Path(__file__).parents[2]


def test_the_terminal_gets_steps_and_sentences_and_the_log_gets_everything(tmp_path):
    shown = io.StringIO()
    progress = Progress(Log(tmp_path / "install.log"), "Install Layerhive", stream=shown)
    progress.step(0.15, "Installing torch")
    progress.detail("torch-2.9.1+cpu (180 MB)")
    progress.advance(0.3)
    progress.say("torch build: no GPU found: CPU")
    progress.log.write("  Successfully installed torch-2.9.1")
    assert shown.getvalue() == "[ 15%] Installing torch\ntorch build: no GPU found: CPU\n"
    logged = (tmp_path / "install.log").read_text()
    assert "[ 15%] Installing torch" in logged and "Successfully installed torch" in logged
    assert progress.ask("Start at login?") is None, "no window, no terminal: nobody to ask"


@pytest.fixture
def qapp():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def test_the_qt_window_shows_progress_asks_and_keeps_the_final_message(qapp, capsys):
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox

    from installer.progress_qt import ProgressWindow

    window = ProgressWindow("Install Layerhive")
    window.show()
    window.handle({"step": [0.42, "Installing torch"]})
    window.handle({"detail": "torch-2.9.1+cpu (180 MB)"})
    assert (window.bar.value(), window.step.text(), window.detail.text()) == (42, "Installing torch",
                                                                               "torch-2.9.1+cpu (180 MB)")
    asked = []

    def click_yes() -> None:
        box = QApplication.activeModalWidget()
        if box is None:
            QTimer.singleShot(50, click_yes)
            return
        asked.append(box.text())
        box.button(QMessageBox.StandardButton.Yes).click()

    QTimer.singleShot(50, click_yes)
    window.handle({"ask": "Start Layerhive when you log in?"})
    assert asked == ["Start Layerhive when you log in?"]
    assert json.loads(capsys.readouterr().out) == {"answer": True}
    window.handle({"finish": [True, "Layerhive is installed.\nsudo apt-get install libxcb-cursor0"]})
    assert window.message.isVisible() and "apt-get install" in window.message.toPlainText()
    assert window.button.text() == "Close" and window.close()


def test_the_qt_helper_waits_for_the_person_after_the_end_and_leaves_if_the_installer_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    progress = Progress(Log(tmp_path / "install.log"), "Install Layerhive", stream=io.StringIO())
    gone = QtWindow(sys.executable, "Install Layerhive", progress)
    gone.send({"step": [0.1, "Making a private Python environment"]})
    gone._process.stdin.close()  # the installer went away before its final message
    assert gone._process.wait(timeout=60) == 0

    finished = QtWindow(sys.executable, "Install Layerhive", progress)
    finished.send({"finish": [True, "Layerhive is installed."]})
    finished._process.stdin.close()
    time.sleep(3)
    assert finished._process.poll() is None, "the final message stays until the person closes it"
    finished._process.terminate()
    finished._process.wait(timeout=30)


def tk_python() -> str | None:
    """A Python that has Tk (this one, or another on the machine)."""
    for candidate in (sys.executable, *(shutil.which(f"python3.{m}") for m in range(10, 15)), "/usr/bin/python3"):
        if candidate and subprocess.run([candidate, "-c", "import tkinter"], capture_output=True).returncode == 0:
            return candidate
    return None


TK_SCRIPT = """
import json, sys
from pathlib import Path
from installer.progress import Log, Progress, TkWindow

progress = Progress(Log(Path(sys.argv[1])), "Install Layerhive")
window = progress.window = TkWindow("Install Layerhive", progress)
seen = {}

def press_yes():  # the question is Tk's message box (Tcl's ::tk::MessageBox on X11): press its Yes button
    try:
        window.root.tk.call(".__tk__messagebox.yes", "invoke")
    except Exception:
        window.root.after(100, press_yes)

def work():
    progress.step(0.3, "Installing torch")
    progress.detail("torch-2.9.1+cpu (180 MB)")
    seen["answer"] = progress.ask("Start Layerhive when you log in?")
    progress.finish(True, "Layerhive is installed.")
    return 0

def read_and_close():
    if window._button["text"] != "Close":
        window.root.after(100, read_and_close)
        return
    seen.update(mapped=window.root.winfo_ismapped(), step=window._step["text"], bar=window._bar["value"],
                message=window._message.get("1.0", "end").strip(), title=window.root.title())
    window._button.invoke()

window.root.after(300, press_yes)
window.root.after(300, read_and_close)
seen["code"] = window.run(work)
print(json.dumps(seen))
"""


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb for a real X display")
def test_the_tk_window_on_a_real_display(tmp_path):
    python = tk_python()
    assert python is not None, "no Python with Tk on this machine"
    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        display = ":" + os.read(read, 16).decode().strip()
        ran = subprocess.run([python, "-c", TK_SCRIPT, str(tmp_path / "install.log")], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "DISPLAY": display, "PYTHONPATH": str(REPO)})
    finally:
        os.close(read)
        xvfb.terminate()
        xvfb.wait(timeout=30)
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen == {"answer": True, "mapped": 1, "step": "Done.", "bar": 100.0, "message": "Layerhive is installed.",
                    "title": "Install Layerhive", "code": 0}
