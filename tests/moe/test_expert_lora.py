"""Unmerged expert LoRA (fedmoe.moe.expert_lora) equals peft's merged path, per fused family."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmoe.moe.expert_lora import UnmergedExpertLoRA
from fedmoe.moe.families import family_of
from fedmoe.moe.lora import apply_lora, load_trainable_state, trainable_state
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.slicing import extract
from tests.moe.helpers import model_inputs

FUSED = [n for n in tiny_names() if family_of(build_tiny(n)).fused]


def _pair(model, family):
    fast = apply_lora(copy.deepcopy(model), r=4, alpha=8, family=family)
    ref = apply_lora(copy.deepcopy(model), r=4, alpha=8, family=family, unmerged_experts=False)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in trainable_state(ref).items()}
    load_trainable_state(fast, state)
    load_trainable_state(ref, state)
    return fast, ref


def _run(pm, family):
    out = pm(**model_inputs(family, 3, batch=3, seq=11)).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_every_fused_family_is_covered():
    assert {family_of(build_tiny(n)).name for n in FUSED} >= {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "bert_moe"}


@pytest.mark.parametrize("sub", [False, True], ids=["full", "sub"])
@pytest.mark.parametrize("name", FUSED)
def test_unmerged_matches_merged_outputs_and_gradients(name, sub):
    model = build_tiny(name)
    family = family_of(model)
    if sub:
        model = extract(model, [[0, 2, 5][: b.num_experts] for b in family.blocks(model)], family).model
    fast, ref = _pair(model, family)
    wrappers = [m for m in fast.modules() if isinstance(m, UnmergedExpertLoRA)]
    assert len(wrappers) == len(family.blocks(fast.base_model.model))
    assert not any(isinstance(m, UnmergedExpertLoRA) for m in ref.modules())
    assert list(trainable_state(fast)) == list(trainable_state(ref))  # names and shapes unchanged
    out_f, g_f = _run(fast, family)
    out_r, g_r = _run(ref, family)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    assert g_f.keys() == g_r.keys()
    lora_keys = [n for n in g_f if "experts" in n and "lora_" in n]
    assert lora_keys and all(g_r[n].abs().sum() > 0 for n in lora_keys)
    for n in g_f:  # fp32 summation order differs: errors relative to the gradient's scale
        err = float((g_f[n] - g_r[n]).abs().max())
        assert err <= 1e-5 * max(1.0, float(g_r[n].abs().max())), (n, err)
    for n, p in fast.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_merge_and_unload_still_use_peft():
    model = build_tiny("tiny-mixtral")
    family = family_of(model)
    fast, ref = _pair(model, family)
    inputs = model_inputs(family, 4)
    with torch.no_grad():
        expect = ref(**inputs).logits
        merged = fast.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expect, atol=1e-5, rtol=1e-5)
