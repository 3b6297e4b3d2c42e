"""Takes docs/screenshots/ of the real app under Xvfb with a tray (trayer): the tray menu, the chat mid-answer, the
answer's chain and the swarm map, on the demo swarm of SmolLM2 (the default model), driven with real clicks and
keys (xdotool).

    PYTHONPATH=$PWD python tests/desktop/take_screenshots.py [--out docs/screenshots] [--model NAME]

Needs Xvfb, trayer and xdotool (see .ci/run). The chat is shot every second while it answers; one showing part
of the answer is kept, the others stay in the work directory it prints."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # this process only crops images

from PySide6.QtCore import QRect  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402

from node.model.checkpoint import DEFAULT_MODEL  # noqa: E402
from tests.desktop.xtray import AppUnderTest, TrayDisplay, wait_for  # noqa: E402

QUESTION = "Explain in a short paragraph how several home computers can run one language model together."


def crop_around(screen: Path, rects: list[list[int]], out: Path, pad: int = 24) -> None:
    """Keeps the part of a screen shot around `rects` ([x, y, w, h] each), with `pad` pixels around."""
    box = QRect(*rects[0])
    for rect in rects[1:]:
        box = box.united(QRect(*rect))
    image = QImage(str(screen))
    image.copy(box.adjusted(-pad, -pad, pad, pad).intersected(image.rect())).save(str(out))


def shoot(app: AppUnderTest, request: str, path: Path, timeout_s: float = 60) -> Path:
    app.ask(f"{request} {path}")
    wait_for(path.exists, timeout_s, f"the shot {path.name}")
    time.sleep(0.3)  # written in full
    return path


def shoot_while_answering(app: AppUnderTest, work: Path, out: Path, timeout_s: float = 300) -> dict:
    """Shoots the chat every second until the answer is done (its "Show chain" link is drawn); keeps as
    `out` a shot two thirds through those that show part of the answer. Returns where "Show chain" is."""
    shots: list[Path] = []
    before = len(app.seen())
    deadline = time.monotonic() + timeout_s
    while (link := app.last_seen("link", before)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer within {timeout_s:.0f} s")
        shots.append(shoot(app, "window Layerhive chat", work / f"chat-{len(shots)}.png"))
        app.ask("link Layerhive chat|Show chain")  # answered only once the link is there
        time.sleep(1)
    images = [QImage(str(shot)) for shot in shots]
    done = QImage(str(shoot(app, "window Layerhive chat", work / "chat-done.png")))
    partial = [shot for shot, image in zip(shots, images, strict=True) if image not in (images[0], done)]
    shutil.copy(partial[len(partial) * 2 // 3] if partial else shots[-1], out)
    return link


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="layerhive-shots-"))
    home = work / "home"
    home.mkdir()
    # The model's files are not fetched again: the new home links to the converted copy in the usual one.
    cache = Path(os.environ.get("LAYERHIVE_HOME") or Path.home() / ".cache/layerhive") / "models"
    if cache.exists():
        (home / ".cache/layerhive").mkdir(parents=True)
        (home / ".cache/layerhive/models").symlink_to(cache)
    print(f"working in {work}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with TrayDisplay(work) as display:
        app = AppUnderTest(display, home, ["--model", args.model, "--identity", "screenshots"])
        try:
            icon = app.tray_icon_center(600)
            app.menu_until(icon, lambda m: m["actions"][0]["text"].startswith("Serving layers"), 600,
                           "the node serving")
            screen = shoot(app, "screen", work / "screen-menu.png")
            icon_rect = next(s["rect"] for s in reversed(app.seen()) if s["class"] == "QSystemTrayIconSys")
            menu_rect = next(s["rect"] for s in reversed(app.seen()) if s["class"] == "QMenu")
            crop_around(screen, [menu_rect, icon_rect], args.out / "tray-menu.png")
            app.close_menu()

            chat = display.visible_windows("Layerhive chat")[0]
            display.xdotool("windowfocus", "--sync", chat)
            display.xdotool("type", "--delay", "20", QUESTION)
            display.xdotool("key", "Return")
            link = shoot_while_answering(app, work, args.out / "chat-mid-answer.png")
            display.xdotool("mousemove", *map(str, link["center"]), "click", "1")  # "Show chain"
            time.sleep(1)
            shoot(app, "window Layerhive chat", args.out / "chat-chain.png")
            # The map opens over the chat: last.
            app.choose(app.open_menu(icon), "Swarm map")
            wait_for(lambda: display.visible_windows("Layerhive swarm map"), 20, "the swarm map")
            time.sleep(6)  # a read of the swarm or two
            shoot(app, "window Layerhive swarm map", args.out / "swarm-map.png")
        finally:
            print("app exited with", app.stop(), flush=True)
    print(f"shots in {args.out}; the chat's series in {work}")


if __name__ == "__main__":
    main()
