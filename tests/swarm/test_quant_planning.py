"""A record's quantization: validated like every field a stranger sends; the planner sizes its layers by it."""

from __future__ import annotations

import pytest

from swarm.allocator import allocate, uncovered_layers
from swarm.costmodel import layer_capacity, range_fits
from swarm.records import RecordError, ServerRecord, node_spec
from swarm.types import LayerRange, ModelSpec

GB = 1e9
MODEL = ModelSpec("m", num_layers=12, hidden_size=2048, layer_bytes=1 * GB, kv_bytes_per_token_per_layer=4096,
                  quant_layer_bytes=(("int8", 0.51 * GB), ("int4", 0.28 * GB)))


def record(**fields) -> dict:
    return {"peer_id": "p", "model": "m", "start": 0, "end": 4, "memory_bytes": 4 * GB, **fields}


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_a_record_announces_its_quantization(quant):
    assert ServerRecord.from_dict(record(quant=quant)).quant == quant


def test_a_record_without_one_is_unquantized():  # records of nodes older than the field
    assert ServerRecord.from_dict(record()).quant == "none"


@pytest.mark.parametrize("bad", ["int3", "", "INT4", "nf4", "int4" * 100, 4, None, ["int4"], True])
def test_a_bad_quantization_is_refused(bad):
    with pytest.raises(RecordError, match="quant"):
        ServerRecord.from_dict(record(quant=bad))


def test_the_planner_charges_a_node_its_own_bytes_per_layer():
    dense = node_spec(ServerRecord.from_dict(record(peer_id="a")), MODEL)
    int4 = node_spec(ServerRecord.from_dict(record(peer_id="b", quant="int4")), MODEL)
    int8 = node_spec(ServerRecord.from_dict(record(peer_id="c", quant="int8")), MODEL)
    assert dense.layer_bytes == 0 and int4.layer_bytes == 0.28 * GB and int8.layer_bytes == 0.51 * GB
    assert [layer_capacity(MODEL, n, sessions=0) for n in (dense, int8, int4)] == [4, 7, 12]
    assert range_fits(MODEL, int4, LayerRange(0, 12), sessions=0, context_tokens=2048)
    assert not range_fits(MODEL, dense, LayerRange(0, 5), sessions=0, context_tokens=2048)
    # without the model (as the router calls it) nothing is sized: the record's quantization is not guessed at
    assert node_spec(ServerRecord.from_dict(record(quant="int4"))).layer_bytes == 0


def test_quantized_nodes_cover_a_model_dense_ones_cannot():
    specs = [node_spec(ServerRecord.from_dict(record(peer_id=f"n{i}", memory_bytes=5 * GB)), MODEL)
             for i in range(2)]
    assert uncovered_layers(MODEL, allocate(MODEL, {s.node_id: s for s in specs}, lambda a, b: 0.0))
    specs[1] = node_spec(ServerRecord.from_dict(record(peer_id="n1", memory_bytes=5 * GB, quant="int4")), MODEL)
    plan = allocate(MODEL, {s.node_id: s for s in specs}, lambda a, b: 0.0)
    assert not uncovered_layers(MODEL, plan)
    assert len(plan.ranges["n1"]) > len(plan.ranges.get("n0", ()))
