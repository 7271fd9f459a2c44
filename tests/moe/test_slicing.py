"""Sub-MoE extraction equals the masked full model; extract→merge round trips exactly."""

from __future__ import annotations

import pytest
import torch

from fedmoe.moe.families import family_of
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.slicing import (
    extract,
    layout_of,
    load_sub_moe,
    merge,
    save_sub_moe,
)
from tests.moe.helpers import dropped_logits_masked, model_inputs, random_kept

TINY = tiny_names()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sub_moe_logits_equal_masked_full_model(name, seed):
    model = build_tiny(name, seed=seed)
    family = family_of(model)
    kept = random_kept(family, model, seed)
    assert len(kept[0]) == 1 and len(kept[1]) == family.blocks(model)[1].num_experts
    inputs = model_inputs(family, seed)
    sub = extract(model, kept)
    with dropped_logits_masked(model, family, kept):
        ref = _logits(model, inputs)
    got = _logits(sub.model, inputs)
    assert got.shape == ref.shape
    assert torch.isfinite(ref).all()
    assert (got - ref).abs().max().item() <= 1e-5
    # and the masking matters: the unmasked full model differs (so the test can fail)
    assert (got - _logits(model, inputs)).abs().max().item() > 1e-6


@pytest.mark.parametrize("name", TINY)
def test_sub_moe_has_same_class_and_only_kept_experts(name):
    model = build_tiny(name)
    family = family_of(model)
    kept = random_kept(family, model, 3)
    sub = extract(model, kept)
    assert type(sub.model) is type(model)
    assert [b.num_experts for b in family.blocks(sub.model)] == [len(k) for k in kept]
    assert [b.top_k for b in family.blocks(sub.model)] == [
        min(b.top_k, len(k)) for b, k in zip(family.blocks(model), kept, strict=True)
    ]
    # no storage shared with the global model
    gptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in gptrs for p in sub.model.parameters() if p.numel())


@pytest.mark.parametrize("name", TINY)
def test_extract_merge_round_trip_is_bit_identical(name):
    model = build_tiny(name, seed=5)
    family = family_of(model)
    kept = random_kept(family, model, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sub = extract(model, kept)
    state = model.state_dict()
    merge(state, layout_of(model, family), sub.model.state_dict(), layout_of(sub.model, family, sub.expert_map))
    for k, v in before.items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", TINY)
def test_changing_one_expert_changes_exactly_its_slice(name):
    model = build_tiny(name, seed=7)
    family = family_of(model)
    kept = random_kept(family, model, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sub = extract(model, kept)
    layer, local = 1, 2
    g = sub.expert_map.local_to_global(layer, local)
    sub_layout = layout_of(sub.model, family, sub.expert_map)
    sub_state = sub.model.state_dict()
    with torch.no_grad():
        for s in sub_layout.experts[(layer, g)]:
            s.write(sub_state, s.read(sub_state) + 1.0)
    glayout = layout_of(model, family)
    state = model.state_dict()
    merge(state, glayout, sub_state, sub_layout)
    changed_slices = glayout.experts[(layer, g)]
    for k, v in before.items():
        if any(s.key == k for s in changed_slices):
            for s in changed_slices:
                if s.key == k:
                    assert torch.equal(s.read(state), s.read(before) + 1.0)
            # everything outside the slice unchanged
            mask = torch.ones_like(v, dtype=torch.bool)
            for s in changed_slices:
                if s.key == k and s.dim is not None:
                    mask.index_fill_(s.dim, torch.tensor(s.index), False)
                elif s.key == k:
                    mask[...] = False
            assert torch.equal(v[mask], state[k][mask]), k
        else:
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "tiny-deepseek-v3"])
def test_save_load_sub_moe(tmp_path, name):
    model = build_tiny(name, seed=2)
    family = family_of(model)
    kept = random_kept(family, model, 2)
    sub = extract(model, kept)
    save_sub_moe(sub, tmp_path / "sub")
    loaded = load_sub_moe(tmp_path / "sub")
    assert loaded.expert_map == sub.expert_map
    inputs = model_inputs(family, 4)
    assert torch.equal(_logits(loaded.model, inputs), _logits(sub.model, inputs))


def test_bad_expert_sets_raise_clear_errors():
    from fedmoe.errors import ModelError

    model = build_tiny("tiny-mixtral")
    with pytest.raises(ModelError, match="keeps no expert"):
        extract(model, [[], [0]])
    with pytest.raises(ModelError, match="out of range"):
        extract(model, [[0], [99]])
    with pytest.raises(ModelError, match="the model has 2"):
        extract(model, [[0]])
