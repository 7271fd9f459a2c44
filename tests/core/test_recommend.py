"""Expert recommendation (eq. 4–6, Algorithm 1 lines 11–29): exact picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.core.recommend import cosine_similarity, cosine_top_k, estimate_p_hat, recommend, round_half_up
from fedmoe.core.search import expert_count, set_bytes

SELF = np.array([[1.0, 0.0], [0.0, 1.0]])
OTHERS = {
    1: np.array([[1.0, 0.0], [0.0, 1.0]]),  # sim 1
    2: np.array([[0.0, 1.0], [1.0, 0.0]]),  # sim 0
    3: np.array([[1.0, 0.0], [1.0, 0.0]]),  # sim 1/(√2·√2) = 0.5
    4: np.zeros((2, 2)),  # sim 0 by convention
}


def test_cosine_eq4_exact() -> None:
    assert cosine_similarity(SELF, OTHERS[3]) == pytest.approx(0.5, abs=1e-15)
    assert cosine_similarity(SELF, OTHERS[4]) == 0.0
    a, b = np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([[0.5, 0.5], [0.2, 0.8]])
    want = (0.15 + 0.35 + 0.12 + 0.32) / (math.sqrt(0.09 + 0.49 + 0.36 + 0.16) * math.sqrt(0.25 + 0.25 + 0.04 + 0.64))
    assert cosine_similarity(a, b) == pytest.approx(want, abs=1e-15)


def test_cosine_top_k_order_and_ties() -> None:
    top2 = cosine_top_k(SELF, OTHERS, 2)
    assert [c for c, _ in top2] == [1, 3]
    assert [s for _, s in top2] == pytest.approx([1.0, 0.5], abs=1e-15)
    top3 = cosine_top_k(SELF, OTHERS, 3)
    assert [c for c, _ in top3] == [1, 3, 2]  # 2 and 4 tie at 0: lower id
    assert len(cosine_top_k(SELF, OTHERS, 10)) == 4


def test_estimate_p_hat_eq6_exact() -> None:
    p_hat = estimate_p_hat([(1, 1.0), (3, 0.5)], OTHERS)
    np.testing.assert_allclose(p_hat, [[1.0, 0.0], [1 / 3, 2 / 3]], rtol=0, atol=1e-15)


def test_estimate_p_hat_zero_similarity() -> None:
    np.testing.assert_array_equal(estimate_p_hat([(2, 0.0), (4, 0.0)], OTHERS), [[0.0, 0.5], [0.5, 0.0]])
    with pytest.raises(ValueError, match="undefined"):
        estimate_p_hat([(2, 0.0)], OTHERS, zero_sim="raise")


P_HAT = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
EB = np.full((2, 3), 10.0)


def test_round_half_up() -> None:
    assert [round_half_up(x) for x in (2.4, 2.5, 3.5, 2.6)] == [2, 3, 4, 3]


def test_add_highest_p_hat_not_held() -> None:
    new, act = recommend([[0], [1]], P_HAT, 4.4, EB, 100.0, 1e9)
    # not held, by p̂: (0,1)=.3 and (1,2)=.3 tie → (0,1) first; then (1,2)
    assert act["n"] == 2 and act["added"] == [(0, 1), (1, 2)] and act["removed"] == []
    assert new == [[0, 1], [1, 2]]


def test_add_stops_at_budget() -> None:
    assert recommend([[0], [1]], P_HAT, 4.0, EB, 100.0, 125.0)[0] == [[0], [1]]  # 120 + 10 > 125
    new, act = recommend([[0], [1]], P_HAT, 4.0, EB, 100.0, 130.0)
    assert new == [[0, 1], [1]] and act["added"] == [(0, 1)]
    # stop (not skip): the next best (0,1) costs 50 and does not fit, the cheaper (1,2) is not tried
    eb = np.array([[10.0, 50.0, 10.0], [10.0, 10.0, 5.0]])
    assert recommend([[0], [1]], P_HAT, 3.0, eb, 100.0, 140.0)[1]["added"] == []


def test_remove_lowest_p_hat_held() -> None:
    new, act = recommend([[0, 1, 2], [1]], P_HAT, 2.4, EB, 100.0, 1e9)
    assert act["n"] == -2 and act["removed"] == [(0, 2), (0, 1)]
    assert new == [[0], [1]]


def test_remove_never_empties_a_layer() -> None:
    p_hat = np.array([[0.05, 0.9, 0.05], [0.1, 0.6, 0.3]])
    new, act = recommend([[0], [0, 1, 2]], p_hat, 1.0, EB, 100.0, 1e9)
    # ascending p̂ among held: (0,0) .05 (last of layer 0: skipped), (1,0) .1, (1,2) .3
    assert act["removed"] == [(1, 0), (1, 2)] and new == [[0], [1]]


def test_n_zero_no_change() -> None:
    own = [[0], [1, 2]]
    new, act = recommend(own, P_HAT, 3.2, EB, 100.0, 1e9)
    assert act["n"] == 0 and new == own and new is not own


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mean_count=st.floats(0.0, 20.0), slack=st.floats(0.0, 100.0))
def test_recommend_respects_budget_and_layers(seed: int, mean_count: float, slack: float) -> None:
    rng = np.random.default_rng(seed)
    p_hat = rng.dirichlet(np.ones(5), size=3)
    eb = rng.integers(1, 20, size=(3, 5)).astype(float)
    own = [sorted(rng.choice(5, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(3)]
    budget = set_bytes(own, eb, 10.0) + slack
    new, act = recommend(own, p_hat, mean_count, eb, 10.0, budget)
    assert all(len(layer) >= 1 for layer in new)
    assert set_bytes(new, eb, 10.0) <= budget + 1e-9
    assert expert_count(new) == expert_count(own) + len(act["added"]) - len(act["removed"])
    assert len(act["added"]) <= max(act["n"], 0) and len(act["removed"]) <= max(-act["n"], 0)
