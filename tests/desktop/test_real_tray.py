"""The real app in a real system tray: Xvfb with trayer, the app (`layerhive-app`, its demo swarm of a tiny model)
docked there, driven with real clicks on its icon and menu (xdotool). .ci/run installs the X tools, so CI runs
this; elsewhere it is skipped only when they are missing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.desktop.xtray import AppUnderTest, TrayDisplay, missing_tools, wait_for

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} (see .ci/run)")]


# How long the node stays paused. Past the records' TTL (30 s) resume never finished once a node had re-joined
# (issue 18, item 1, fixed on another branch): raise this to 35 once that fix is in, to hold it here too.
PAUSE_S = 3.0


def doing(menu: dict) -> str:
    """The menu's first line: what the node does now."""
    return menu["actions"][0]["text"]


def own_leftovers(marker: str) -> list[int]:
    """Processes still running whose command line names `marker` (this test's model directory): the demo swarm's
    nodes, should the app have died before stopping them."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_the_tray_menu_opens_the_windows_pauses_caps_the_memory_and_resumes(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint("llama", num_layers=4))
    home = tmp_path / "home"
    home.mkdir()
    with TrayDisplay(tmp_path) as display:
        app = AppUnderTest(display, home, ["--model", model, "--identity", "tray-test"])  # no swarm known: the demo
        try:
            icon = app.tray_icon_center(180)
            menu = app.menu_until(icon, lambda m: doing(m).startswith("Serving layers"), 240, "the node serving")
            assert display.visible_windows("Layerhive chat")  # the chat opens at launch

            app.choose(menu, "Swarm map")
            wait_for(lambda: display.visible_windows("Layerhive swarm map"), 20, "the swarm map shown")
            chat = display.visible_windows("Layerhive chat")[0]
            display.xdotool("windowfocus", "--sync", chat, "key", "ctrl+w")
            wait_for(lambda: not display.visible_windows("Layerhive chat"), 20, "the chat closed")
            app.choose(app.open_menu(icon), "Open chat")
            wait_for(lambda: display.visible_windows("Layerhive chat"), 20, "the chat open again")

            memory = app.choose(app.open_menu(icon), "Memory for the swarm")
            assert memory is not None and next(a for a in memory["actions"] if a["text"] == "No cap")["checked"]
            app.choose(memory, "At most 2 GB")  # the node drains and rejoins with the cap
            menu = app.open_menu(icon)
            memory = app.choose(menu, "Memory for the swarm")
            assert next(a for a in memory["actions"] if a["text"] == "At most 2 GB")["checked"]
            app.close_menu()
            app.close_menu()
            menu = app.menu_until(icon, lambda m: doing(m).startswith("Serving layers"), 180, "serving with the cap")

            app.choose(menu, "Pause contributing")
            menu = app.menu_until(icon, lambda m: doing(m) == "Paused", 120, "the node paused")
            app.close_menu()
            time.sleep(PAUSE_S)
            menu = app.open_menu(icon)
            assert [a["text"] for a in menu["actions"] if a["text"].endswith("contributing")] == ["Resume contributing"]
            app.choose(menu, "Resume contributing")
            menu = app.menu_until(icon, lambda m: doing(m).startswith("Serving layers"), 180, "the node back")

            app.choose(menu, "Quit Layerhive")
            assert app.process.wait(timeout=90) == 0
            time.sleep(1)
            assert own_leftovers(model) == []  # the demo swarm stopped with the app
            # The chat history, closed at quit: its file alone, in the user's data directory.
            assert [p.name for p in (home / ".local/share/Layerhive").iterdir()] == ["chats.sqlite"]
        finally:
            app.stop()
            for pid in own_leftovers(model):
                os.kill(pid, signal.SIGKILL)
