"""HFedMoE (docs/algorithms.md §3): exact numbers on hand-made router probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.algorithms.hfedmoe import (
    ClientStats,
    HFedMoEServerState,
    RouterStats,
    aggregate,
    compute_budget,
    configure,
    default_tau,
    expert_aggregate,
    gate_aggregate,
    gate_weights,
    ib_score,
    importance,
    select_active,
)
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.core.layout import TensorSlice, UnitLayout
from fedmoe.errors import BudgetError

# B = 2 rows, E = 3 experts; expert 2 has a zero probability (0·log 0 = 0)
G = np.array([[0.5, 0.5, 0.0], [0.1, 0.3, 0.6]])
S_CUMUL = [0.3, 0.4, 0.3]
S_SPEC = [0.5, 0.5, 0.6]
S = [0.4, 0.45, 0.45]  # λ = 0.5
KL = [
    0.5 * (0.5 * math.log(0.5 / 0.3) + 0.1 * math.log(0.1 / 0.3)),
    0.5 * (0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)),
    0.5 * (0.6 * math.log(0.6 / 0.3)),
]
I_REF = [s - 0.1 * k for s, k in zip(S, KL, strict=True)]


def test_importance_exact() -> None:
    s_cumul, s_spec, s = importance(G)
    np.testing.assert_allclose(s_cumul, S_CUMUL, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s_spec, S_SPEC, rtol=0, atol=0)
    np.testing.assert_allclose(s, S, rtol=0, atol=1e-15)
    _, _, s1 = importance(G, lam=1.0)
    np.testing.assert_allclose(s1, S_CUMUL, atol=1e-15)
    with pytest.raises(ValueError):
        importance(G, lam=1.5)


def test_ib_score_exact() -> None:
    kl, score = ib_score(G, S)
    np.testing.assert_allclose(kl, KL, rtol=1e-12, atol=0)
    np.testing.assert_allclose(score, I_REF, rtol=1e-12)
    assert np.round(score, 8).tolist() == [0.39272242, 0.44873664, 0.42920558]
    # an expert never given probability: KL = 0 (no NaN from 0·log 0)
    kl0, _ = ib_score(np.array([[0.0, 1.0], [0.0, 1.0]]), [0.0, 1.0])
    assert kl0.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        ib_score(G, S, beta=-1)


def test_select_active() -> None:
    assert select_active(I_REF, [True, True, True], 2) == [1, 2]
    assert select_active(I_REF, [True, False, True], 1) == [2]  # expert 1 unused by the router
    assert select_active([1.0, 1.0, 0.5], [True] * 3, 1) == [0]  # tie → lower index
    assert select_active(I_REF, [False, True, False], 2) == [1]  # fewer used than C_k
    assert select_active(I_REF, [False] * 3, 1) == [1]  # fallback "all"
    with pytest.raises(ValueError):
        select_active(I_REF, [False] * 3, 1, fallback="raise")


def test_router_stats_streaming_matches_direct() -> None:
    st = RouterStats(3)
    st.add(G[:1], choices=[[0, 1]])
    st.add(G[1:], choices=[[2, 1]])
    kl, score = st.ib_score()
    np.testing.assert_allclose(st.usage(), S_CUMUL, atol=1e-15)
    np.testing.assert_allclose(st.importance(), S, atol=1e-15)
    np.testing.assert_allclose(kl, KL, atol=1e-14)
    np.testing.assert_allclose(score, I_REF, atol=1e-14)
    assert st.used().tolist() == [True, True, True] and st.counts.tolist() == [1, 2, 1]


def test_compute_budget() -> None:
    eb = [[10, 20, 30], [30, 10, 20]]  # C experts per layer cost dense + Σ_i (C largest)
    assert compute_budget(160, 100, eb) == 1
    assert compute_budget(210, 100, eb) == 2
    assert compute_budget(1000, 100, eb) == 3
    assert compute_budget(320, 100, eb, alpha=0.5) == 2  # cap 100 + 0.5·220 = 210: C = 2 costs 200, C = 3 220
    # α applies above the dense part, so a share both carry (the runtime's fixed bytes) changes nothing
    assert compute_budget(1320, 1100, eb, alpha=0.5) == 2
    # α on the whole budget would have stopped this client (0.5·1420 = 710 < the dense part 1100)
    assert compute_budget(1420, 1100, eb, alpha=0.5) == 3  # cap 1100 + 0.5·320 = 1260 ≥ 1220
    with pytest.raises(BudgetError):
        compute_budget(159, 100, eb)


# -- aggregation -------------------------------------------------------------------
def _layout() -> UnitLayout:
    return UnitLayout(
        dense_keys=["attn"],
        experts={(0, j): [TensorSlice("experts.w", 0, (j,))] for j in range(2)},
        routers={(0, j): [TensorSlice("router.w", 0, (j,))] for j in range(2)},
    )


def _global() -> dict[str, torch.Tensor]:
    return {"attn": torch.zeros(2), "experts.w": torch.full((2, 3), math.pi), "router.w": torch.arange(6.0).reshape(2, 3)}


def _upd(cid: int, n: int, e0: float, e1: float) -> ClientUpdate:
    return ClientUpdate(cid, n, dense={"attn": torch.full((2,), float(cid))},
                        experts={(0, 0): [torch.full((1, 3), e0)], (0, 1): [torch.full((1, 3), e1)]})


def test_expert_aggregate_tau() -> None:
    assert default_tau(_layout()) == {0: 0.25}  # 1 / (2·E_i)
    g = _global()
    ups = [_upd(1, 1, 1.0, 10.0), _upd(2, 3, 5.0, 20.0)]
    usage = {1: np.array([[0.6, 0.4]]), 2: np.array([[0.2, 0.8]])}
    out, who = expert_aggregate(g, _layout(), ups, usage)
    assert out["experts.w"][0].tolist() == [1.0] * 3  # client 2 below τ: excluded
    assert out["experts.w"][1].tolist() == [17.5] * 3  # (1·10 + 3·20) / 4
    assert who == {(0, 0): [1], (0, 1): [1, 2]}
    assert out["attn"].tolist() == [1.75, 1.75]  # dense FedAvg (1·1 + 3·2) / 4
    assert out["router.w"] is g["router.w"]  # routers: gate_aggregate's job
    # no client above τ for expert 1 → unchanged, bit-identical; u = τ passes
    usage = {1: np.array([[0.25, 0.1]]), 2: np.array([[0.2, 0.2]])}
    out, who = expert_aggregate(g, _layout(), ups, usage)
    assert torch.equal(out["experts.w"][1], g["experts.w"][1]) and out["experts.w"][0].tolist() == [1.0] * 3
    out, who = expert_aggregate(g, _layout(), ups, {1: np.zeros((1, 2)), 2: np.zeros((1, 2))})
    assert out["experts.w"] is g["experts.w"] and who == {}
    assert torch.equal(g["experts.w"], torch.full((2, 3), math.pi))  # input untouched


U1, S1 = [0.5, 0.3, 0.1, 0.1], [0.6, 0.4, 0.2, 0.2]  # S_1 = {0, 1}, Σ p = 0.3 + 0.12
U2, S2 = [0.05, 0.05, 0.2, 0.7], [0.1, 0.1, 0.5, 0.9]  # S_2 = {2, 3}, Σ p = 0.1 + 0.63


def test_gate_weights_exact() -> None:
    a, w = gate_weights([U1, U2], [S1, S2], tau=1 / 8)
    np.testing.assert_allclose(a, [0.42 / 4, 0.73 / 4], rtol=1e-14)  # |S_1 ∪ S_2| = 4
    np.testing.assert_allclose(w, [0.42 / 1.15, 0.73 / 1.15], rtol=1e-14)
    a, _ = gate_weights([U1, [0.5, 0.0, 0.0, 0.5]], [S1, [1.0, 0.0, 0.0, 1.0]], tau=1 / 8)
    np.testing.assert_allclose(a, [0.42 / 3, 1.0 / 3], rtol=1e-14)  # union {0, 1, 3}
    a, w = gate_weights([[0.1] * 4, [0.0] * 4], [S1, S2], tau=1 / 8)
    assert a.tolist() == [0.0, 0.0] and w.tolist() == [0.0, 0.0]


def test_gate_aggregate_router() -> None:
    glob = torch.zeros(4, 2)
    r1, r2 = torch.ones(4, 2), torch.full((4, 2), 2.0)
    w, out = gate_aggregate(glob, [r1, r2], [U1, U2], [S1, S2], tau=1 / 8)
    expect = (0.42 * 1.0 + 0.73 * 2.0) / 1.15
    torch.testing.assert_close(out, torch.full((4, 2), expect), rtol=0, atol=1e-6)
    w, out = gate_aggregate(glob, [r1, r2], [[0.0] * 4, [0.0] * 4], [S1, S2], tau=1 / 8)
    assert out is glob and not w.any()


def test_configure_and_aggregate() -> None:
    st = RouterStats(3)
    st.add(G, choices=[[0, 1], [2, 1]])
    state = HFedMoEServerState(budgets={7: 2})
    new = configure(state, 7, [st])
    assert new.active_sets == {7: [[1, 2]]} and state.active_sets == {}
    np.testing.assert_allclose(new.scores[7][0], I_REF, atol=1e-14)
    np.testing.assert_allclose(new.stats[7].usage[0], S_CUMUL, atol=1e-15)
    with pytest.raises(ValueError):
        configure(state, 8, [st])

    # two clients, 1 layer, 2 experts (τ = 0.25); each sends only its active router row
    g = _global()
    ups = [_upd(1, 1, 1.0, 10.0), _upd(2, 3, 5.0, 20.0)]
    ups[0].routers = {(0, 0): [torch.full((1, 3), 100.0)]}
    ups[1].routers = {(0, 1): [torch.full((1, 3), -100.0)]}
    stats = {1: ClientStats(np.array([[0.6, 0.4]]), np.array([[0.5, 0.5]])),
             2: ClientStats(np.array([[0.2, 0.8]]), np.array([[0.1, 1.0]]))}
    st2, out, info = aggregate(HFedMoEServerState(), g, _layout(), ups, stats)
    a1, a2 = 0.6 * 0.5 + 0.4 * 0.5, 0.8 * 1.0  # p summed over S_c (before / |∪ S_c|)
    w1, w2 = a1 / (a1 + a2), a2 / (a1 + a2)
    assert info["gate_weights"][0] == pytest.approx({1: w1, 2: w2}, rel=1e-14)
    full1 = torch.tensor([[100.0] * 3, [3.0, 4.0, 5.0]])  # row 1: the global row it received
    full2 = torch.tensor([[0.0, 1.0, 2.0], [-100.0] * 3])
    torch.testing.assert_close(out["router.w"], w1 * full1 + w2 * full2, rtol=0, atol=1e-5)
    assert out["experts.w"][1].tolist() == [17.5] * 3 and st2.round == 1
    assert torch.equal(g["router.w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError):
        aggregate(HFedMoEServerState(), g, _layout(), ups, {1: stats[1]})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(0, 1), st.floats(0, 2))
def test_streaming_equals_direct_and_kl_nonnegative(b: int, e: int, seed: int, lam: float, beta: float) -> None:
    rng = np.random.default_rng(seed)
    g = rng.dirichlet(np.ones(e), size=b) * (rng.random((b, e)) > 0.3)  # some exact zeros
    s = importance(g, lam)[2]
    kl, score = ib_score(g, s, beta)
    assert np.all(kl >= 0)
    rs = RouterStats(e)
    for k in range(0, b, 2):
        rs.add(g[k : k + 2])
    kl2, score2 = rs.ib_score(lam, beta)
    np.testing.assert_allclose(kl2, kl, atol=1e-12)
    np.testing.assert_allclose(score2, score, atol=1e-12)
