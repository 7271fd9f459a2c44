"""Model side of HFedMoE (§3.4) and FLEx (§4.1–4.2) on tiny models of every family."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from fedmoe.algorithms.flex import split_state
from fedmoe.moe.families import family_of
from fedmoe.moe.graft import (
    choose_personal_experts,
    collect_router_stats,
    expert_distances,
    freeze_moe_blocks,
    graft_side_experts,
    mark_side_trainable,
    mask_routing,
    run_single_expert,
    set_side_gate_bias,
    side_parameters,
)
from fedmoe.moe.lora import apply_lora, trainable_state
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.routing import RoutingStats
from tests.moe.helpers import dropped_logits_masked, model_inputs

TINY = tiny_names()
SOME = ["tiny-mixtral", "tiny-switch-transformers", "tiny-qwen2-moe", "tiny-deepseek-v3", "tiny-bert-moe"]


def _expert_ref(model, family, block, e: int, x: torch.Tensor) -> torch.Tensor:
    """E_e(x) written out from the weights, independently of the code under test."""
    cfg = model.config
    if family.name == "switch_transformers":
        ex = block.experts[f"expert_{e}"]
        return F.linear(ACT2FN[cfg.dense_act_fn](F.linear(x, ex.wi.weight)), ex.wo.weight)
    E = block.experts
    if family.name == "bert_moe":
        h = ACT2FN[cfg.hidden_act](F.linear(x, E.up_proj[e], E.up_bias[e]))
        return F.linear(h, E.down_proj[e], E.down_bias[e])
    gate, up = F.linear(x, E.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(ACT2FN[cfg.hidden_act](gate) * up, E.down_proj[e])


def _brute_force(model, family, batches) -> np.ndarray:
    """Σ_batches ‖block(X) − E_e(X)‖_F with X captured by a pre-hook and block(X) re-run by hand."""
    blocks = family.blocks(model)
    d = np.zeros((len(blocks), max(b.num_experts for b in blocks)))
    for batch in batches:
        xs: dict[int, torch.Tensor] = {}
        hs = [model.get_submodule(b.path).register_forward_pre_hook(
            lambda m, a, i=b.index, xs=xs: xs.__setitem__(i, a[0].detach().clone())) for b in blocks]
        with torch.no_grad():
            model(**batch)
        for h in hs:
            h.remove()
        mask = batch.get("attention_mask")
        for b in blocks:
            block = model.get_submodule(b.path)
            x = xs[b.index]
            with torch.no_grad():
                y = block(x)
                for e in range(b.num_experts):
                    diff = y - _expert_ref(model, family, block, e, x)
                    if mask is not None and mask.numel() == x.shape[0] * x.shape[1]:
                        diff = diff[mask.bool()]
                    d[b.index, e] += torch.linalg.norm(diff.double().reshape(-1)).item()
    return d


@pytest.mark.parametrize("name", TINY)
def test_chosen_expert_is_brute_force_argmin(name: str) -> None:
    model = build_tiny(name, seed=3)
    family = family_of(model)
    batches = [model_inputs(family, seed=s) for s in range(3)]
    ref = _brute_force(model, family, batches)
    got = expert_distances(model, family, batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert choose_personal_experts(model, family, batches) == [int(np.argmin(r)) for r in ref]
    block = model.get_submodule(family.blocks(model)[0].path)
    x = torch.randn(5, model.config.d_model if family.name == "switch_transformers" else model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(run_single_expert(family, block, 1, x), _expert_ref(model, family, block, 1, x))


def test_padding_tokens_excluded_from_distances() -> None:
    model = build_tiny("tiny-mixtral", seed=1)
    family = family_of(model)
    batch = model_inputs(family, seed=0)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, 6:] = 0
    np.testing.assert_allclose(expert_distances(model, family, [batch]), _brute_force(model, family, [batch]), rtol=1e-5)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", TINY)
def test_graft_with_gate_off_reproduces_original(name: str) -> None:
    model = build_tiny(name, seed=0)
    family = family_of(model)
    inputs = model_inputs(family, seed=1)
    ref = _logits(model, inputs)
    keys = set(model.state_dict())
    chosen = [b.index % b.num_experts for b in family.blocks(model)]
    grafted = graft_side_experts(model, family, chosen)
    assert grafted is model and keys < set(model.state_dict())  # pretrained keys unchanged
    assert not torch.equal(_logits(model, inputs), ref)  # σ(−4)·E_side(x) ≠ 0
    set_side_gate_bias(model, float("-inf"))
    got = _logits(model, inputs)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", SOME)
def test_grafted_block_formula(name: str) -> None:
    """y = MoE(x) + σ(w·x + b)·E_{e*}(x), with E_side a copy of expert e*."""
    model = build_tiny(name, seed=2)
    family = family_of(model)
    info = family.blocks(model)[0]
    orig = copy.deepcopy(model.get_submodule(info.path)).eval()
    graft_side_experts(model, family, [3] * len(family.blocks(model)))
    block = model.get_submodule(info.path).eval()
    h = family.router(orig).weight.shape[1]
    x = torch.randn(2, 4, h)
    w = torch.randn(h) * 0.3
    with torch.no_grad():
        block.side_gate.weight.copy_(w[None])
        block.side_gate.bias.fill_(0.25)
        want = orig(x) + torch.sigmoid(x @ w + 0.25)[..., None] * _expert_ref(model, family, orig, 3, x)
        torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-6)
        block.side_expert.inner.requires_grad_(False)
        next(block.side_expert.parameters()).add_(1.0)  # a copy: the pretrained expert is unchanged
        torch.testing.assert_close(_expert_ref(model, family, block, 3, x), _expert_ref(model, family, orig, 3, x))


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "tiny-qwen2-moe"])
def test_side_tensors_train_experts_and_router_frozen(name: str) -> None:
    model = build_tiny(name, seed=0)
    family = family_of(model)
    graft_side_experts(model, family, [0] * len(family.blocks(model)))
    side = side_parameters(model)
    assert side and all(p.requires_grad for p in side.values())
    assert all(("side_expert" in n) or ("side_gate" in n) for n in side)
    model.train()
    model(**model_inputs(family, seed=0)).logits.float().pow(2).mean().backward()
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        for n, p in block.named_parameters():
            if "side_" in n:
                assert p.grad is not None and p.grad.abs().sum() > 0, n
            else:
                assert not p.requires_grad and p.grad is None, n
    # with LoRA on top: expert adapters / routers frozen again, side tensors trainable, split clean
    model2 = graft_side_experts(build_tiny(name, seed=0), family, [1] * len(family.blocks(model)))
    pm = apply_lora(model2, 4, 8, 0.0, family)
    assert not any("side_" in k for k in trainable_state(pm))  # peft froze them, no adapters on them
    freeze_moe_blocks(pm, family)
    mark_side_trainable(pm)
    shared, personal = split_state(trainable_state(pm))
    assert set(personal) == set(side_parameters(pm.base_model.model))
    assert shared and not any(".experts." in k or "side_" in k or ".router" in k for k in shared)
    assert all("lora_" in k or "head" in k for k in shared)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "tiny-qwen2-moe"])
def test_mask_routing_is_masked_full_model(name: str) -> None:
    model = build_tiny(name, seed=1)
    family = family_of(model)
    active = [[0, 2, 5], [1, 4]][: len(family.blocks(model))]
    inputs = model_inputs(family, seed=2)
    with dropped_logits_masked(model, family, active):
        ref = _logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with mask_routing(model, family, active, write_back=True) as sub:
        torch.testing.assert_close(_logits(sub.model, inputs), ref, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in sub.model.parameters():
                p.add_(1.0)
    after = model.state_dict()
    for info, ids in zip(family.blocks(model), active, strict=True):
        block = model.get_submodule(info.path)
        for j in range(info.num_experts):
            for sl in family.expert_slices(info.path, block, j):
                changed = not torch.equal(sl.read(after), sl.read(before))
                assert changed == (j in ids), (sl.key, j)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "tiny-deepseek-v3"])
def test_collect_router_stats_matches_routing_stats(name: str) -> None:
    model = build_tiny(name, seed=0)
    family = family_of(model)
    batches = [model_inputs(family, seed=s) for s in range(2)]
    batches[0]["attention_mask"] = torch.ones_like(batches[0]["input_ids"])
    batches[0]["attention_mask"][1, 5:] = 0
    stats = collect_router_stats(model, family, batches)
    with RoutingStats(model, family) as ref, torch.no_grad():
        for b in batches:
            ref.token_masks = [m for k, m in b.items() if k.endswith("attention_mask")]
            model(**b)
    for i, st in enumerate(stats):
        np.testing.assert_allclose(st.usage(), ref.mean_prob()[i, : st.num_experts], rtol=1e-10)
        np.testing.assert_array_equal(st.counts, ref.counts[i, : st.num_experts])
        assert st.rows == ref.tokens[i]
        assert np.all(st.max_g >= st.usage()) and np.all(st.max_g <= 1.0)
