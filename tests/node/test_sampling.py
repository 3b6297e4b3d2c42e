"""The sampler shared by clients and rings' last stages: draws depend on (seed, position) only."""

from __future__ import annotations

import pytest
import torch

from node.model.sampling import SamplingParams, sample


def test_a_seeded_draw_depends_only_on_seed_and_position():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_p=0.9, seed=7)
    draws = [sample(logits, params, position) for position in range(40)]
    assert draws == [sample(logits, params, position) for position in range(40)]  # replayable in any order
    assert [sample(logits, params, p) for p in reversed(range(40))] == draws[::-1]
    assert len(set(draws)) > 10  # positions draw independently, not one repeated pick
    other = SamplingParams(temperature=1.5, top_p=0.9, seed=8)
    assert [sample(logits, other, p) for p in range(40)] != draws
    assert sample(logits, SamplingParams(), 3) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])  # the first two hold almost all the mass
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    assert {sample(logits, params, p) for p in range(50)} == {0}


def test_wire_form_round_trips_and_rejects_anything_else():
    params = SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.8, seed=3, stop_token_ids=(2, 5))
    assert SamplingParams.from_wire(params.to_wire()) == params
    good = params.to_wire()
    for bad in [None, [], {**good, "extra": 1}, {k: v for k, v in good.items() if k != "seed"},
                {**good, "max_new_tokens": 0}, {**good, "max_new_tokens": True}, {**good, "temperature": "hot"},
                {**good, "top_p": 0}, {**good, "seed": -1}, {**good, "seed": 1.5}, {**good, "stop": [1, "x"]},
                {**good, "stop": list(range(100))}, {**good, "stop": 3}]:
        with pytest.raises(ValueError):
            SamplingParams.from_wire(bad)
