"""The words of the chat and the map, and the drawing of the map, on `SwarmStatus` values built as a node
builds them."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from PySide6.QtGui import QColor

from desktop.bridge import explain_chat_failure
from desktop.chat_window import chain_html, speed_text
from desktop.icons import FAILED
from desktop.swarm_map import (
    SwarmMapView,
    describe_node,
    pack_rows,
    read_swarm_status,
    replicas_text,
    tick_layers,
    tooltip,
)
from desktop.wording import describe_chain, layer_list, layer_range, model_label, plural
from node.client.chat import AnswerStats
from node.client.session import NoChainError, StageFailure
from node.model.checkpoint import resolve_model
from node.net.credit import CheckedCredit
from node.serve.assignment import SwarmStatus, model_spec, swarm_status
from swarm.records import ServerRecord
from swarm.types import Hop


def test_layer_ranges_count_as_people_do():
    assert layer_range(0, 30) == "layers 0–29" and layer_range(5, 6) == "layer 5"
    assert layer_list([3, 2, 4, 7, 9, 10]) == "layers 2–4, 7, 9–10"
    assert layer_list([7]) == "layer 7" and layer_list([]) == "no layers"
    assert plural(1, "replica") == "1 replica" and plural(2, "replica") == "2 replicas"
    assert replicas_text(1, 1) == "1 replica" and replicas_text(1, 2) == "1–2 replicas"
    assert model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert describe_chain([Hop("QmAAAAAAAA111111", 0, 15), Hop("QmBBBBBBBB222222", 15, 30)], "QmBBBBBBBB222222") == \
        "layers 0–14 on …111111 → layers 15–29 on …222222 (your node)"


def test_an_answers_figures_and_chains_in_words():
    first, second = (Hop("QmA11111", 0, 2), Hop("QmB22222", 2, 4)), (Hop("QmA11111", 0, 2), Hop("QmC33333", 2, 4))
    stats = AnswerStats("org/m", tokens=1, elapsed_s=1.0, first_token_s=0.5, tokens_per_s=None, chains=(first,))
    assert speed_text(stats) == "1 token · first after 0.5 s"  # one token: no speed to speak of
    stats = AnswerStats("org/m", 30, 4.0, 0.9, 8.04, (first, second))
    assert speed_text(stats) == "30 tokens · 8.0 tokens/s · first after 0.9 s"
    assert chain_html(stats, "QmC33333") == ("Served by: layers 0–1 on …A11111 → layers 2–3 on …B22222<br>"
                                             "then, after a node failed: layers 0–1 on …A11111 → layers 2–3 on "
                                             "…C33333 (your node)")


def test_why_there_is_no_answer_in_words():
    gap = NoChainError("no chain covers layers 0:30 of org/SmolLM2 (ranges online: 0:15)", range(15, 30))
    assert explain_chat_failure(gap, "org/SmolLM2").startswith(
        "The swarm cannot answer right now: no node serves layers 15–29 of SmolLM2.")
    full = NoChainError("no chain covers layers 0:30 of org/SmolLM2 (ranges online: 0:30)")
    assert "full or failing" in explain_chat_failure(full, "org/SmolLM2")
    too_long = ValueError("prompt of 8000 tokens plus 512 new tokens exceeds the model's context of 8192")
    assert explain_chat_failure(too_long, "m").startswith("This conversation is too long for m: start a new chat.")
    assert explain_chat_failure(StageFailure("QmX", "no answer in 30 s", "timeout"), "m").startswith(
        "The swarm did not answer: a node stopped responding")
    assert explain_chat_failure(KeyError("x"), "m") == "No answer, because of an error: KeyError: 'x'"


def test_axis_labels_never_crowd_and_end_at_the_last_layer():
    for layers, width in [(4, 600), (30, 600), (30, 200), (80, 700), (1, 500), (2, 40)]:
        ticks = tick_layers(layers, width)
        assert ticks[0] == 0 and ticks[-1] == layers - 1 and ticks == sorted(set(ticks))
        if len(ticks) > 2:
            assert min(b - a for a, b in itertools.pairwise(ticks)) * width / layers >= 14


@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    return model_spec(resolve_model(str(tiny_checkpoint("llama", num_layers=4))))


def status_of(spec, records: list[tuple]) -> SwarmStatus:
    """What `NodeController.swarm_status` resolves to when the DHT holds these records: (peer, start, end, fields)."""
    return swarm_status(spec, [ServerRecord(peer_id=peer, model=spec.name, start=start, end=end, **fields)
                               for peer, start, end, fields in records])


def test_unmeasured_figures_say_so_and_measured_ones_have_units(spec):
    status = status_of(spec, [("QmFresh111111", 0, 2, {}),
                              ("QmMeasured22", 2, 4, dict(layer_latency_s=0.00042, uplink_bps=80e6, memory_bytes=2e9,
                                                          sessions=1, region="<b>x</b>"))])
    fresh, measured = read_swarm_status(status).nodes
    text = describe_node(fresh, own=True)
    assert text.startswith("This node (yours) QmFresh111111\nonline, layers 0–1, 0 open sessions, 0 steps queued")
    assert "speed unmeasured" in text and "uplink unmeasured" in text and "0.00" not in text
    text = describe_node(measured, own=False)
    assert "layers 2–3, 1 open session," in text and "region <b>x</b>" in text
    assert "region &lt;b&gt;x&lt;/b&gt;" in tooltip(measured, own=False)  # a peer's words are not markup
    assert "0.42 ms per layer" in text and "memory offered 2.0 GB" in text and "uplink 80 Mbit/s" in text
    assert "checked work: none yet" in text


def test_a_nodes_checked_work_is_shown_with_how_many_clients_vouch_for_it(spec):
    status = replace(status_of(spec, [("QmChecked333", 0, 4, {})]),
                     credit={"QmChecked333": CheckedCredit(tokens=1234, clients=3)})
    text = describe_node(read_swarm_status(status).nodes[0], own=False)
    assert text.endswith("checked work: 1,234 tokens, vouched for by 3 clients")


def test_rows_of_the_map_never_overlap(spec):
    ranges = [(0, 2), (1, 3), (2, 4), (0, 4), (3, 4)]
    status = status_of(spec, [(f"Qm{i}", a, b, {}) for i, (a, b) in enumerate(ranges)]
                       + [("QmJoining", 0, 4, dict(state="joining"))])
    rows = pack_rows(read_swarm_status(status).nodes)
    assert sum(len(row) for row in rows) == 5 and len(rows) == 3  # the joining node has no bar
    for row in rows:
        assert all(a.layers[1] <= b.layers[0] for a, b in itertools.pairwise(row))


def test_the_map_says_why_it_shows_no_bars(spec, app):
    view = SwarmMapView()
    assert view.message() == "Not connected to the swarm yet."
    view.set_error("TimeoutError: no DHT answer")
    assert view.message() == "Could not read the swarm: TimeoutError: no DHT answer" and view.rows == []
    view.set_status(status_of(spec, [("Qm1", 0, 4, dict(state="joining"))]))
    assert view.message() == "No node serves this model yet."
    view.grab()  # paints the message without bars


def pixel(image, x: float, y: float) -> QColor:
    return image.pixelColor(int(x), int(y))


def test_a_gap_is_red_across_the_map_and_the_chain_blue(spec, app):
    view = SwarmMapView()
    view.resize(700, 240)
    view.set_status(status_of(spec, [("QmLeft", 0, 2, {})]), "QmLeft")
    view.set_chain([Hop("QmLeft", 0, 2)])
    image = view.grab().toImage()
    bar, node = view._bars[0]
    assert node.peer_id == "QmLeft" and view.snapshot.status.uncovered_layers == [2, 3]
    strip_y = view._strip_top() + 5
    layer_3 = bar.right() + 1 + 1.5 * (bar.width() + 2) / 2  # the bar spans layers 0-1, less a pixel each side
    assert pixel(image, layer_3, strip_y) == FAILED  # layer 3's replica cell
    band = pixel(image, layer_3, bar.center().y())  # the rows, over layer 3: tinted red
    assert band.red() > band.green() + 20 and band.red() > band.blue() + 20
    chain = pixel(image, bar.center().x(), bar.bottom() + 6 + 10)  # the chain's row, under the bar
    assert chain.blue() > 200 and chain.red() < 80
