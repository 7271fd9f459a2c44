"""Routing statistics: rows of p sum to 1; a router forced to one expert gives one-hot p."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmoe.moe.families import family_of
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.routing import RoutingStats, activation_probabilities
from tests.moe.helpers import dropped_logits_masked, model_inputs


@pytest.mark.parametrize("name", tiny_names())
def test_p_rows_sum_to_one(name):
    model = build_tiny(name)
    family = family_of(model)
    p = activation_probabilities(model, [model_inputs(family, s) for s in range(3)])
    assert p.shape == (len(family.blocks(model)), family.blocks(model)[0].num_experts)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", tiny_names())
def test_router_forced_to_one_expert_gives_one_hot(name):
    overrides = {} if name == "tiny-switch-transformers" else {"num_experts_per_tok": 1}
    model = build_tiny(name, **overrides)
    family = family_of(model)
    forced = 3
    blocks = family.blocks(model)
    assert all(b.top_k == 1 for b in blocks)
    # every other expert's router logit is -inf, so each token must pick `forced`
    with dropped_logits_masked(model, family, [[forced]] * len(blocks)):
        p = activation_probabilities(model, [model_inputs(family, s) for s in range(2)])
    expected = np.zeros_like(p)
    expected[:, forced] = 1.0
    np.testing.assert_array_equal(p, expected)


def _per_layer_tokens(stats, family, model, encoder: int, decoder: int) -> list[float]:
    return [encoder if info.path.startswith("encoder") else decoder for info in family.blocks(model)]


def test_encoder_and_decoder_masks_are_not_mixed_up():
    """Switch: encoder and decoder of the same length; only the encoder input is padded, so
    encoder layers count the real tokens and decoder layers every decoder token."""
    model = build_tiny("tiny-switch-transformers")
    family = family_of(model)
    ids = torch.randint(2, 250, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 2:] = 0
    dec = torch.randint(2, 250, (2, 6), generator=torch.Generator().manual_seed(1))
    with RoutingStats(model, family) as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    np.testing.assert_array_equal(stats.tokens, _per_layer_tokens(stats, family, model, 8, 12))
    assert {i.path.split(".")[0] for i in family.blocks(model)} == {"encoder", "decoder"}


def test_padding_and_finished_generations_are_not_counted():
    """tiny-mixtral, left-padded batch of two prompts, greedy generation. The eos id is chosen
    as the second token row 0 generates, so row 0 finishes after 2 tokens while row 1 goes on:
    counted tokens = real prompt tokens + the generated tokens fed back before eos."""
    model = build_tiny("tiny-mixtral").eval()
    family = family_of(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (4, 7)]
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    steps = 6
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    eos = int(free[0, 7 + 1])
    assert eos not in free[1, 7:].tolist()  # row 1 never finishes (else pick another seed)
    assert eos != int(free[0, 7])
    with RoutingStats(model, family, eos_token_id=eos) as stats, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                       pad_token_id=0, eos_token_id=eos)
    expected = (4 + 1) + (7 + steps - 1)  # row 0: prompt + 1 token fed before eos; row 1: all steps
    np.testing.assert_array_equal(stats.tokens, [expected] * len(family.blocks(model)))
    top_k = family.blocks(model)[0].top_k
    np.testing.assert_array_equal(stats.counts.sum(1), [expected * top_k] * len(family.blocks(model)))
    # and the same p as generating each prompt alone
    alone = np.zeros_like(stats.counts)
    for p in prompts:
        with RoutingStats(model, family, eos_token_id=eos) as one, torch.no_grad():
            model.generate(input_ids=torch.tensor([p]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                           eos_token_id=eos)
        alone += one.counts
    np.testing.assert_allclose(stats.counts, alone)
