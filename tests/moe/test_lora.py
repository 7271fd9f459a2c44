"""LoRA on sub-MoEs: only adapters (+ router rows) train; adapter slices match kept experts."""

from __future__ import annotations

import pytest
import torch

from fedmoe.moe.families import family_of
from fedmoe.moe.lora import apply_lora, lora_layout, trainable_state
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.slicing import extract
from tests.moe.helpers import model_inputs, random_kept

R = 4


@pytest.mark.parametrize("name", tiny_names())
def test_lora_on_sub_moe_trains_only_adapters_and_router(name):
    model = build_tiny(name)
    family = family_of(model)
    kept = random_kept(family, model, 1)
    sub = extract(model, kept)
    pm = apply_lora(sub.model, r=R, alpha=8)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    for n in trainable:
        assert "lora_" in n or "_head." in n or any(f".{t}" in n for t in family.router_tensors), n
    layout = lora_layout(pm, expert_map=sub.expert_map)
    assert sorted(layout.experts) == sorted((i, g) for i, ks in enumerate(kept) for g in ks)
    state = trainable_state(pm)
    for (_i, _g), slices in layout.experts.items():
        assert slices, "every kept expert has adapter tensors"
        # each expert's adapters are rank-R factors
        numel = sum(s.read(state).numel() for s in slices)
        assert numel > 0
        for s in slices:
            t = s.read(state)
            assert R in t.shape
    # the count of per-expert adapter factors equals kept experts × factors per expert
    per_expert = {len(v) for v in layout.experts.values()}
    assert len(per_expert) == 1
    # backward reaches only trainable tensors
    out = pm(**model_inputs(family, 0)).logits.sum()
    out.backward()
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_fused_lora_slices_match_peft_delta():
    """Expert e's slices of the fused factors give exactly peft's per-expert delta weight."""
    model = build_tiny("tiny-mixtral")
    pm = apply_lora(model, r=R, alpha=R)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    layout = lora_layout(pm)
    state = trainable_state(pm)
    experts_mod = pm.base_model.model.model.layers[0].mlp.experts  # down_proj wrapper
    delta = experts_mod.get_delta_weight("default")  # [E, out, in] (or transposed)
    for e in range(6):
        a, b = None, None
        for s in layout.experts[(0, e)]:
            if s.key.endswith("experts.lora_A.default.weight"):
                a = s.read(state)
            if s.key.endswith("experts.lora_B.default.weight"):
                b = s.read(state)
        mine = b @ a  # [out, in] with scaling alpha/r = 1
        ref = delta[e]
        ref = ref if ref.shape == mine.shape else ref.T
        torch.testing.assert_close(mine, ref)
