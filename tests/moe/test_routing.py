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


def test_padding_tokens_are_not_counted():
    model = build_tiny("tiny-mixtral")
    family = family_of(model)
    inputs = model_inputs(family, 0, batch=2, seq=6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    with RoutingStats(model, family) as stats, torch.no_grad():
        stats.token_masks = [mask]
        model(**inputs, attention_mask=mask)
    top_k = family.blocks(model)[0].top_k
    np.testing.assert_array_equal(stats.counts.sum(1), [9 * top_k] * len(family.blocks(model)))
    np.testing.assert_array_equal(stats.tokens, [9] * len(family.blocks(model)))
