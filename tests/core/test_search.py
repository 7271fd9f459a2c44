"""Stage-1 submodel search (eq. 3): smallest submodel, θ binary search, random sets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.core.search import (
    expert_count,
    fit_error,
    random_expert_sets,
    search_cap,
    set_bytes,
    smallest_submodel,
    theta_search,
)
from fedmoe.errors import BudgetError

P = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.3, 0.0]])
TEN = np.full((2, 4), 10.0)


def test_smallest_submodel_hand_table() -> None:
    assert smallest_submodel(P, 0.0) == [[0], [1]]
    assert smallest_submodel(P, 0.5) == [[0], [1]]
    assert smallest_submodel(P, 0.51) == [[0, 1], [1]]  # tie 0.2/0.2: lower index first
    assert smallest_submodel(P, 0.7) == [[0, 1], [1, 2]]
    assert smallest_submodel(P, 0.9) == [[0, 1, 2], [1, 2]]  # 0.6 + 0.3 = 0.8999999999999999: eps
    assert smallest_submodel(P, 1.0) == [[0, 1, 2, 3], [0, 1, 2]]  # p = 0 expert never needed
    assert smallest_submodel(np.array([[0.2, 0.2]]), 1.0) == [[0, 1]]  # total < θ: all experts


def test_set_bytes_and_count() -> None:
    eb = np.arange(8.0).reshape(2, 4)
    assert set_bytes([[0, 3], [1]], eb, 100.0) == 100.0 + 0 + 3 + 5
    assert expert_count([[0, 3], [1]]) == 3


def test_theta_search_hand_table() -> None:
    # cap = 100 + 0.5·(180 − 100) = 140 = dense 100 + 4 experts of 10: θ = 0.7 is the last that needs only 4
    theta, sets = theta_search(P, 100.0, TEN, 180.0, alpha=0.5, tol=1e-4, client_id=3)
    assert 0.7 - 1e-4 <= theta <= 0.7 + 1e-9
    assert sets == [[0, 1], [1, 2]]
    # cap 130: 3 experts → θ = 0.6 (layer 0: 0.5+0.2, layer 1: 0.6); above 0.6 layer 1 needs two
    theta, sets = theta_search(P, 100.0, TEN, 130.0, alpha=1.0)
    assert 0.6 - 1e-4 <= theta <= 0.6 + 1e-9 and sets == [[0, 1], [1]]
    # cap 120: 2 experts → θ = 0.5
    theta, sets = theta_search(P, 100.0, TEN, 120.0, alpha=1.0)
    assert 0.5 - 1e-4 <= theta <= 0.5 + 1e-9 and sets == [[0], [1]]


def test_theta_search_non_uniform_bytes() -> None:
    eb = np.array([[10.0, 50.0, 1.0, 1.0], [10.0, 10.0, 1.0, 1.0]])
    # cap 125: top experts (0,0),(1,1) = 20 → 120; next step adds (0,1) = 50 (θ>0.5) → too big
    theta, sets = theta_search(P, 100.0, eb, 125.0, alpha=1.0)
    assert 0.5 - 1e-4 <= theta <= 0.5 + 1e-9 and sets == [[0], [1]]


def test_alpha_applies_above_the_dense_part() -> None:
    # D + α·(M − D): α keeps headroom in the experts' share, never in the dense part
    assert search_cap(280.0, 0.5) == 140.0
    assert search_cap(280.0, 0.5, dense_bytes=100.0) == 100.0 + 0.5 * 180.0
    assert search_cap(90.0, 0.5, dense_bytes=100.0) == 90.0  # below the dense part: the budget itself
    # a share both the dense part and the budget carry (the runtime's fixed bytes) leaves every pick unchanged
    for budget, alpha in ((180.0, 0.5), (130.0, 1.0), (150.0, 0.9), (135.0, 0.9)):
        assert theta_search(P, 1100.0, TEN, budget + 1000.0, alpha=alpha) == theta_search(P, 100.0, TEN, budget, alpha=alpha)
        assert random_expert_sets(TEN, 1100.0, budget + 1000.0, alpha, np.random.default_rng(3)) == \
            random_expert_sets(TEN, 100.0, budget, alpha, np.random.default_rng(3))
    # a dense part that is most of the budget (tiny-switch: ≈ 98 %) still leaves α's share for experts;
    # α on the whole budget (0.5·1280 = 640 < 1100) would have stopped this client
    theta, sets = theta_search(P, 1100.0, TEN, 1280.0, alpha=0.5)  # cap 1100 + 0.5·180 = 1190
    assert expert_count(sets) == 7 and set_bytes(sets, TEN, 1100.0) <= 1190.0
    with pytest.raises(BudgetError, match=r"D \+ α·\(M − D\) = 1100 \+ 0.5·\(1110 − 1100\) = 1105"):
        theta_search(P, 1100.0, TEN, 1110.0, alpha=0.5, client_id=2)  # one expert per layer: 1120


def test_theta_one_when_everything_fits() -> None:
    theta, sets = theta_search(P, 0.0, TEN, 1e9)
    assert theta == 1.0 and sets == [[0, 1, 2, 3], [0, 1, 2]]


def test_budget_errors_name_client_and_numbers() -> None:
    with pytest.raises(BudgetError, match=r"Client 4 .*dense part 200 bytes > its budget = 190 bytes"):
        theta_search(P, 200.0, TEN, 190.0, alpha=0.9, client_id=4)
    # the budget holds one expert per layer (120 ≤ 121) but α's share does not (100 + 0.9·21 = 118.9):
    # the fix names the α that would, (120 − 100) / (121 − 100) = 0.952…
    with pytest.raises(BudgetError) as err:
        theta_search(P, 100.0, TEN, 121.0, alpha=0.9, client_id=4)
    assert "set fedmoe.alpha to at least 0.953" in err.value.fix
    with pytest.raises(BudgetError, match=r"Client 5 .*one expert per layer = 120 bytes > .*= 115"):
        theta_search(P, 100.0, TEN, 115.0, alpha=1.0, client_id=5)
    with pytest.raises(BudgetError, match="Client 6"):
        random_expert_sets(TEN, 100.0, 115.0, 1.0, np.random.default_rng(0), client_id=6)


def test_fit_error_is_what_every_search_would_raise() -> None:
    # known before any p: dense alone, or dense + the cheapest expert of every layer, over the cap
    assert fit_error(100.0, TEN, 1000.0, 0.9) is None
    assert fit_error(100.0, TEN, 120.0, 1.0) is None  # 100 + 10 + 10 = 120 fits exactly
    err = fit_error(200.0, TEN, 190.0, 0.9, client_id=4)
    assert err is not None and "dense part 200 bytes > its budget" in err.what
    err = fit_error(100.0, TEN, 121.0, 0.9, client_id=4)
    assert err is not None and "one expert per layer = 120 bytes" in err.what and "at least 0.953" in err.fix
    err = fit_error(100.0, TEN, 115.0, 1.0, client_id=5)
    assert err is not None and "one expert per layer = 120 bytes > " in err.what
    for p in (P, P[:, ::-1].copy()):  # whatever p: the θ search fails too
        with pytest.raises(BudgetError):
            theta_search(p, 100.0, TEN, 115.0, alpha=1.0)


def _feasible(p: np.ndarray, theta: float, eb: np.ndarray, dense: float, cap: float) -> bool:
    return set_bytes(smallest_submodel(p, theta), eb, dense) <= cap


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_layers=st.integers(1, 4),
    n_experts=st.integers(2, 6),
    frac=st.floats(0.0, 1.0),
)
def test_theta_matches_brute_force(seed: int, n_layers: int, n_experts: int, frac: float) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(n_experts), size=n_layers)
    eb = rng.integers(1, 20, size=(n_layers, n_experts)).astype(float)
    dense = 50.0
    lo = set_bytes(smallest_submodel(p, 0.0), eb, dense)
    hi = dense + eb.sum()
    budget = lo + frac * (hi - lo)
    tol = 1e-4
    theta, sets = theta_search(p, dense, eb, budget, alpha=1.0, tol=tol)
    assert set_bytes(sets, eb, dense) <= budget
    assert sets == smallest_submodel(p, theta)
    grid = np.linspace(0.0, 1.0, 2001)
    grid_best = max(t for t in grid if _feasible(p, t, eb, dense, budget))
    # exact optimum: the largest feasible breakpoint (a cumulative sum of sorted p, or 0 / 1)
    cums = {0.0, 1.0} | {float(c) for row in p for c in np.cumsum(np.sort(row)[::-1])}
    exact = max(c for c in cums if c <= 1.0 and _feasible(p, c, eb, dense, budget))
    assert grid_best <= exact + 1e-9
    assert exact - tol - 1e-12 <= theta <= exact + 1e-9


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.0, 1.0), alpha=st.floats(0.5, 1.0))
def test_random_sets_respect_budget_and_are_maximal(seed: int, frac: float, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    eb = rng.integers(1, 20, size=(3, 5)).astype(float)
    dense = 30.0
    budget = dense + (eb.max(axis=1).sum() + frac * eb.sum()) / alpha
    cap = dense + alpha * (budget - dense)  # α's share of the budget above the dense part
    sets = random_expert_sets(eb, dense, budget, alpha, np.random.default_rng(seed))
    used = set_bytes(sets, eb, dense)
    assert used <= cap + 1e-9
    assert all(len(layer) >= 1 and layer == sorted(set(layer)) for layer in sets)
    # skip-and-continue rule: no expert left out would still fit
    assert all(used + eb[i, j] > cap for i in range(3) for j in range(5) if j not in sets[i])
    assert sets == random_expert_sets(eb, dense, budget, alpha, np.random.default_rng(seed))
