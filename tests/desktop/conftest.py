"""Fixtures of the desktop tests: Qt offscreen, and a local swarm of a tiny model with the app's own node."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt starts: no display needed

from PySide6.QtWidgets import QApplication  # noqa: E402

from desktop.bridge import NodeBridge  # noqa: E402
from node.app.controller import NodeController  # noqa: E402
from node.app.local_swarm import LocalSwarm  # noqa: E402
from node.serve.node import NodeConfig  # noqa: E402


@pytest.fixture(scope="module")
def app():
    yield QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def hive(tiny_checkpoint, app):
    """A local swarm of a tiny 4-layer model (nodes on 0:2 and 2:4), and the app's own node serving 0:2 of it."""
    path = str(tiny_checkpoint("llama", num_layers=4))
    with LocalSwarm(path, ranges=[(0, 2), (2, 4)], threads_per_node=1) as swarm:
        controller = NodeController(path, NodeConfig(start=0, end=2, initial_peers=swarm.initial_peers,
                                                     bench=False, ttl_s=6.0))
        bridge = NodeBridge(controller, poll_ms=200)
        try:
            yield swarm, bridge
        finally:
            bridge.stop().result(timeout=60)
