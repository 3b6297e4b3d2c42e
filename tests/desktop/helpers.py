"""What the desktop tests share: running Qt's loop until something holds, and an answer read without the app."""

from __future__ import annotations

import asyncio
import time

from PySide6.QtWidgets import QApplication

from node.client.chat import ChatEngine, Message
from node.client.session import connect
from node.model.checkpoint import resolve_model
from node.model.sampling import SamplingParams


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Runs the Qt event loop (queued signals land) until `predicate()` holds. Not QTest.qWait: it keeps the
    GIL while it waits, which starves the node's threads in this process (16 s to a SmolLM2 answer's first
    piece, against 1 s under app.exec(), which releases it)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        QApplication.processEvents()
        time.sleep(0.02)


def headless_answer(initial_peers: list[str], model: str, messages: list[Message], params: SamplingParams) -> str:
    """The swarm's answer read by a client of its own, outside the app."""
    async def run() -> str:
        source = resolve_model(model)
        async with connect(initial_peers, source) as client:
            return "".join([piece async for piece in ChatEngine(client, source).stream_chat(messages, params)])

    return asyncio.run(run())
