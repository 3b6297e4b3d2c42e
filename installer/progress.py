"""What the person installing sees: one progress line in a terminal, and a window when there is a display
(Tk when this Python has it; else Qt, from the new environment, as soon as PySide6 is in it). pip's own output
never reaches them: it goes to the install log, whose path every failure message names.

Standard library only (Qt runs in a separate process, installer/progress_qt.py, under the new environment's Python).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class Cancelled(Exception):
    """The person installing asked to stop (the window's Cancel, Ctrl-C, SIGTERM)."""


class Log:
    """The install log: everything, with times; the person sees only steps and messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (lives with the run)
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if self._file.closed:  # the uninstaller removed the log's directory at the very end
                return
            for line in text.rstrip("\n").splitlines() or [""]:
                self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def tk_available() -> bool:
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Steps (a fraction and a sentence), details (what pip is fetching), questions and the final message,
    to the terminal, the log and the window if one is open. Safe to call from the installer's worker thread."""

    def __init__(self, log: Log, title: str, *, stream: IO[str] = sys.stdout) -> None:
        self.log, self.title, self.stream = log, title, stream
        self.window: Window | None = None
        self.cancelled = threading.Event()
        self.fraction, self.text = 0.0, ""
        self._tty = stream.isatty()

    def step(self, fraction: float, text: str) -> None:
        self.check()
        self.fraction, self.text = fraction, text
        self.log.write(f"[{fraction:4.0%}] {text}")
        self._print(f"[{fraction:4.0%}] {text}", final=not self._tty)
        if self.window:
            self.window.send({"step": [fraction, text]})

    def advance(self, fraction: float) -> None:
        """Moves the bar within the current step (not logged, not printed line after line)."""
        self.fraction = fraction
        if self._tty:
            self._print(f"[{fraction:4.0%}] {self.text}", final=False)
        if self.window:
            self.window.send({"step": [fraction, self.text]})

    def detail(self, text: str) -> None:
        """A passing detail: shown in place (terminal line, window), not printed line after line."""
        if self._tty:
            self._print(f"[{self.fraction:4.0%}] {self.text} ({text[:60]})", final=False)
        if self.window:
            self.window.send({"detail": text})

    def say(self, text: str) -> None:
        """A sentence the person should read (kept on screen)."""
        self.log.write(text)
        self._print(text, final=True)
        if self.window:
            self.window.send({"detail": text.splitlines()[0]})

    def ask(self, question: str) -> bool | None:
        """Yes or no from the person; None when nobody can be asked (no window and no terminal)."""
        self.log.write(f"asking: {question}")
        answer = None
        if self.window:
            answer = self.window.ask(question)
        elif self._tty and sys.stdin.isatty():
            self._print("", final=True)
            answer = input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
        self.log.write(f"answer: {answer}")
        return answer

    def finish(self, ok: bool, text: str) -> None:
        self.log.write(("done: " if ok else "failed: ") + text)
        self._print(text, final=True, error=not ok)
        if self.window:
            self.window.send({"finish": [ok, text]})

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()

    def _print(self, text: str, *, final: bool, error: bool = False) -> None:
        stream = sys.stderr if error else self.stream
        if self._tty:
            self.stream.write("\r\033[K")
        stream.write(text + ("\n" if final else ""))
        stream.flush()


class Window:
    """A progress window in a helper process or thread, spoken to with small JSON messages."""

    def send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def ask(self, question: str) -> bool | None:
        raise NotImplementedError


class QtWindow(Window):
    """installer/progress_qt.py run by the new environment's Python; it answers on its stdout."""

    def __init__(self, python: str, title: str, progress: Progress) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self._process = subprocess.Popen([python, "-m", "installer.progress_qt", title], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self._answers: queue.Queue[bool | None] = queue.Queue()
        self._progress = progress
        threading.Thread(target=self._read, daemon=True, name="installer-qt-window").start()

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "answer" in message:
                self._answers.put(bool(message["answer"]))
            elif message.get("cancel"):
                self._progress.cancelled.set()
        self._answers.put(None)  # the window went away: nobody answers any more

    def send(self, message: dict[str, Any]) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # closed by the person: the terminal and the log still get everything

    def ask(self, question: str) -> bool | None:
        self.send({"ask": question})
        return self._answers.get()

    def wait_closed(self) -> None:
        """After the final message: the person reads it and closes the window."""
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        self._process.wait()


class TkWindow(Window):
    """A Tk window on the main thread, while the install runs on a worker thread."""

    def __init__(self, title: str, progress: Progress) -> None:
        import tkinter as tk
        from tkinter import messagebox, ttk

        self._tk, self._messagebox, self._progress = tk, messagebox, progress
        self._inbox: queue.Queue[tuple[dict[str, Any], queue.Queue | None]] = queue.Queue()
        self._finished = False
        root = self.root = tk.Tk()
        root.title(title)
        root.minsize(460, 0)
        frame = ttk.Frame(root, padding=16)
        frame.pack(fill="both", expand=True)
        self._step = ttk.Label(frame, text="Starting…", wraplength=440)
        self._step.pack(anchor="w")
        self._bar = ttk.Progressbar(frame, maximum=100, length=440)
        self._bar.pack(fill="x", pady=8)
        self._detail = ttk.Label(frame, text="", foreground="#666", wraplength=440)
        self._detail.pack(anchor="w")
        self._message = tk.Text(frame, height=8, width=60, wrap="word", relief="flat")  # selectable: commands
        self._button = ttk.Button(frame, text="Cancel", command=self._close)
        self._button.pack(anchor="e", pady=(8, 0))
        root.protocol("WM_DELETE_WINDOW", self._close)

    def send(self, message: dict[str, Any]) -> None:
        self._inbox.put((message, None))

    def ask(self, question: str) -> bool | None:
        reply: queue.Queue = queue.Queue()
        self._inbox.put(({"ask": question}, reply))
        return reply.get()

    def run(self, work: Callable[[], int]) -> int:
        """Runs `work` on a worker thread and the window until the person closes it; returns work's result."""
        result: list[int] = []

        def worker() -> None:
            try:
                result.append(work())
            finally:
                self._inbox.put(({"worker_done": True}, None))

        thread = threading.Thread(target=worker, name="installer-work")
        thread.start()
        self.root.after(100, self._poll)
        self.root.mainloop()
        self._progress.cancelled.set()  # closed before the end: the worker stops at its next step and undoes
        thread.join()
        return result[0] if result else 1

    def _poll(self) -> None:
        while True:
            try:
                message, reply = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(message, reply)
        self.root.after(100, self._poll)

    def _handle(self, message: dict[str, Any], reply: queue.Queue | None) -> None:
        if "step" in message:
            fraction, text = message["step"]
            self._bar["value"] = 100 * fraction
            self._step["text"] = text
            self._detail["text"] = ""
        elif "detail" in message:
            self._detail["text"] = message["detail"]
        elif "ask" in message and self._progress.cancelled.is_set():
            reply.put(None)
        elif "ask" in message:
            reply.put(self._messagebox.askyesno(self.root.title(), message["ask"], parent=self.root))
        elif "finish" in message:
            ok, text = message["finish"]
            self._finished = True
            self._bar["value"] = 100 if ok else self._bar["value"]
            self._step["text"] = "Done." if ok else "It did not work."
            self._message.insert("1.0", text)
            self._message.configure(state="disabled")
            self._message.pack(fill="both", expand=True, before=self._button)
            self._button["text"] = "Close"
            self._button.state(["!disabled"])

    def _close(self) -> None:
        if self._finished:
            self.root.destroy()
        elif self._progress.cancelled.is_set():
            return  # already stopping: the final message follows
        elif self._messagebox.askyesno(self.root.title(), "Stop now? Nothing stays half-installed.",
                                       parent=self.root):
            self._progress.cancelled.set()
            self._step["text"] = "Stopping and undoing what was done…"
            self._button.state(["disabled"])
