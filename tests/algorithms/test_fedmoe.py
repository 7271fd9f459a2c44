"""FedMoE server verbs: stage-1 prediction/search and stage-2 recommendation bookkeeping."""

from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest

from fedmoe.algorithms import algorithm_spec
from fedmoe.algorithms.fedmoe import (
    ClientResult,
    FedMoEServerState,
    MemoryTable,
    after_round,
    expert_count_stats,
    final_expert_sets,
    initial_expert_sets,
    predict_p,
)
from fedmoe.errors import BudgetError, ConfigError

PA = np.array([[0.4, 0.6], [1.0, 0.0]])
PB = np.array([[0.8, 0.2], [0.0, 1.0]])
PC = np.array([[0.0, 1.0], [0.5, 0.5]])


def test_registry() -> None:
    assert algorithm_spec("fedmoe").server == "fedmoe.algorithms.fedmoe"
    assert importlib.import_module(algorithm_spec("fedmoe").server).after_round is after_round
    assert algorithm_spec("scaffold").server == "fedmoe.algorithms.scaffold"
    with pytest.raises(ConfigError, match="did you mean `fedmoe`"):
        algorithm_spec("fedmo")


def test_predict_p_same_task_weighted_and_fallback() -> None:
    reports = {0: ("tc", 10, PA), 1: ("tc", 30, PB), 2: ("rc", 5, PC)}
    clients = {0: ("tc", 10), 3: ("tc", 7), 4: ("ts", 9), 5: ("rc", 1)}
    out = predict_p(reports, clients)
    assert set(out) == {0, 3, 4, 5}
    np.testing.assert_array_equal(out[0], PA)  # reporters keep their own p
    np.testing.assert_allclose(out[3], (10 * PA + 30 * PB) / 40, atol=1e-15)  # [[0.7,0.3],[0.25,0.75]]
    np.testing.assert_allclose(out[3], [[0.7, 0.3], [0.25, 0.75]], atol=1e-15)
    np.testing.assert_allclose(out[4], (10 * PA + 30 * PB + 5 * PC) / 45, atol=1e-15)  # no "ts" report
    np.testing.assert_array_equal(out[5], PC)
    with pytest.raises(ValueError, match="task 'ts'"):
        predict_p(reports, clients, fallback="raise")
    with pytest.raises(ValueError, match="no client reported"):
        predict_p({}, clients)


P0 = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.3, 0.0]])


def test_initial_expert_sets_theta_search_and_exclusion() -> None:
    mem = MemoryTable(100.0, np.full((2, 4), 10.0), {0: 180.0, 1: 100.0, 2: 1e9})  # client 0: cap 100 + 0.5·80
    p = {0: P0, 1: P0, 2: P0}
    with pytest.raises(BudgetError, match="Client 1"):
        initial_expert_sets(FedMoEServerState(), p, mem, alpha=0.5)
    st = initial_expert_sets(FedMoEServerState(), p, mem, alpha=0.5, exclude_unfit=True, reported=[2])
    assert st.expert_sets == {0: [[0, 1], [1, 2]], 2: [[0, 1, 2], [0, 1, 2]]}
    assert 0.8 - 1e-4 <= st.theta[0] <= 0.8 + 1e-9 and st.theta[2] == 1.0  # layer 0: .5+.3, layer 1: .6+.3
    assert set(st.excluded) == {1} and "Client 1" in st.excluded[1]
    assert st.stage1_reported == {2}
    np.testing.assert_array_equal(st.latest_p[0], P0)
    rnd = initial_expert_sets(FedMoEServerState(), {0: P0}, mem, alpha=0.5, random_init=np.random.default_rng(1))
    assert sum(map(len, rnd.expert_sets[0])) == 4  # cap 140 = 100 + 4 experts of 10
    assert rnd.theta == {}


# -- stage 2 -------------------------------------------------------------------------

ONE = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
P1 = np.array([[0.6, 0.4, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
P2 = np.array([[0.5, 0.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]])
P3 = np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def stage2_state() -> tuple[FedMoEServerState, MemoryTable]:
    st = FedMoEServerState(
        expert_sets={0: [[0], [0]], 1: [[0, 1], [0, 2]], 2: [[0, 2], [0, 1]], 3: [[3], [3]]},
        latest_p={0: ONE, 1: P1, 2: P2, 3: P3},
    )
    mem = MemoryTable(100.0, np.full((2, 4), 10.0), {0: 200.0, 1: 1e9, 2: 1e9, 3: 1e9})
    return st, mem


def run(st: FedMoEServerState, mem: MemoryTable, scores: list[float], **kw: object) -> tuple[FedMoEServerState, list]:
    events: list = []
    for s in scores:
        st, ev = after_round(st, [ClientResult(0, 10, s, ONE)], mem, patience=2, top_k=2, **kw)
        events.extend(ev)
    return st, events


def test_recommendation_picks_what_eq6_says() -> None:
    st, mem = stage2_state()
    st, events = run(st, mem, [0.5, 0.4, 0.4])  # improve, stale 1, stale 2 → recommend
    (ev,) = events
    s1, s2 = 1.1 / math.sqrt(2 * 1.02), 1 / math.sqrt(2)  # eq. 4 vs clients 1 and 2 (client 3: 0)
    assert [c for c, _ in ev["similar"]] == [1, 2]
    assert [s for _, s in ev["similar"]] == pytest.approx([s1, s2], abs=1e-12)
    # n = mean(4, 4) − 2 = 2; eq. 6 for experts not held: (1,2) = .5·s1/S > (0,2) = .5·s2/S = (1,1) → tie, lower first
    assert ev["kind"] == "adjust" and ev["n"] == 2 and ev["added"] == [(1, 2), (0, 2)]
    assert st.expert_sets[0] == [[0, 2], [0, 2]]
    assert st.pending[0].previous_set == [[0], [0]] and st.pending[0].score_before == 0.4
    assert st.scores[0] == [0.5, 0.4, 0.4] and st.round == 3


def test_improving_change_is_kept() -> None:
    st, mem = stage2_state()
    st, _ = run(st, mem, [0.5, 0.4, 0.4])
    st, events = run(st, mem, [0.45])
    assert events[0]["kind"] == "keep" and st.expert_sets[0] == [[0, 2], [0, 2]]
    assert 0 not in st.frozen and 0 not in st.pending and st.stale[0] == 0


def test_final_sets_leave_out_an_unjudged_change() -> None:
    st, mem = stage2_state()
    before = {c: s for c, s in st.expert_sets.items()}
    st, _ = run(st, mem, [0.5, 0.4, 0.4])  # a change made at client 0's last participation
    assert st.expert_sets[0] == [[0, 2], [0, 2]] and 0 in st.pending
    final = final_expert_sets(st)
    assert final[0] == [[0], [0]] == before[0]  # never trained nor judged: the judged set is the model
    assert {c: s for c, s in final.items() if c != 0} == {c: s for c, s in st.expert_sets.items() if c != 0}
    st, _ = run(st, mem, [0.45])  # judged and kept: now it is the model
    assert final_expert_sets(st)[0] == [[0, 2], [0, 2]]


def test_non_improving_change_reverts_and_freezes() -> None:
    st, mem = stage2_state()
    st, _ = run(st, mem, [0.5, 0.4, 0.4])
    st, events = run(st, mem, [0.4])
    assert events[0]["kind"] == "revert_and_freeze"
    assert st.expert_sets[0] == [[0], [0]] and 0 in st.frozen
    st, events = run(st, mem, [0.1, 0.1, 0.1])  # frozen: never adjusted again
    assert events == [] and st.expert_sets[0] == [[0], [0]]


def test_best_reference_reverts_when_below_best() -> None:
    st, mem = stage2_state()
    st, _ = run(st, mem, [0.5, 0.4, 0.4], revert_reference="best")
    assert st.pending[0].score_before == 0.5
    st, events = run(st, mem, [0.45], revert_reference="best")
    assert events[0]["kind"] == "revert_and_freeze"


def test_recommendation_respects_budget() -> None:
    st, mem = stage2_state()
    mem.budgets[0] = 130.0  # 120 used: room for one expert of 10
    st, events = run(st, mem, [0.5, 0.4, 0.4])
    assert events[0]["added"] == [(1, 2)] and st.expert_sets[0] == [[0], [0, 2]]
    mem.budgets[0] = 120.0
    st2, _ = stage2_state()
    st2, events = run(st2, mem, [0.5, 0.4, 0.4])
    assert events[0]["kind"] == "no_change" and 0 not in st2.pending


def test_stage2_adjust_off_and_patience() -> None:
    st, mem = stage2_state()
    out, events = run(st, mem, [0.5, 0.4, 0.4, 0.4], stage2_adjust=False)
    assert events == [] and out.expert_sets[0] == [[0], [0]] and out.stale[0] == 3
    out, events = run(st, mem, [0.5, 0.4])  # stale 1 < P = 2
    assert events == []


def test_verbs_do_not_mutate_input() -> None:
    st, mem = stage2_state()
    st, _ = run(st, mem, [0.5, 0.4])
    snapshot = copy.deepcopy(st)
    after_round(st, [ClientResult(0, 10, 0.4, ONE)], mem, patience=2, top_k=2)
    assert st.expert_sets == snapshot.expert_sets and st.scores == snapshot.scores and st.pending == {}
    assert st.round == snapshot.round


def test_no_earlier_state_changes_through_adjust_keep_revert() -> None:
    """after_round copies on write (only sampled clients' entries): every earlier state stays
    bit-identical through recommendation, keep, revert-and-freeze, with several clients per round."""
    import pickle

    st, mem = stage2_state()
    history = []
    for scores in ([0.5, 0.3], [0.4, 0.2], [0.4, 0.2], [0.45, 0.1], [0.3, 0.1], [0.2, 0.05]):
        history.append((st, pickle.dumps(st)))
        st, _ = after_round(st, [ClientResult(0, 10, scores[0], ONE), ClientResult(1, 10, scores[1], P1)], mem,
                            patience=2, top_k=2)
    assert st.events and any(e["kind"] == "adjust" for e in st.events)
    for old, frozen in history:
        assert pickle.dumps(old) == frozen


def test_bad_results_raise() -> None:
    st, mem = stage2_state()
    with pytest.raises(ValueError, match="client 9"):
        after_round(st, [ClientResult(9, 1, 0.1, ONE)], mem)
    with pytest.raises(ValueError, match="shape"):
        after_round(st, [ClientResult(0, 1, 0.1, np.ones(3))], mem)


def test_expert_count_stats() -> None:
    st, _ = stage2_state()
    assert expert_count_stats(st) == {"mean": 3.0, "min": 2.0, "max": 4.0}


def test_initial_sets_take_checkpointed_costs_only_when_they_buy_experts():
    """memory.checkpointed (train.gradient_checkpointing="auto"): hand-worked budgets. Plain costs: dense 10,
    experts 1 each (2 layers × 3); checkpointed: dense 6, experts 1. alpha = 1.
    client 0 (M=16): plain keeps all 6 (16), checkpointed also 6 → tie → plain, no checkpointing;
    client 1 (M=13): plain keeps 3 (room for 3 units), checkpointed all 6 (12) → checkpointing;
    client 2 (M=9): plain dense alone 10 > 9 → fits only with checkpointing (6 + 3 = 9 ≤ 9)."""
    from fedmoe.algorithms.fedmoe import FedMoEServerState as State
    from fedmoe.algorithms.fedmoe import MemoryTable, initial_expert_sets
    from fedmoe.core.search import expert_count

    eb = np.ones((2, 3))
    p = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    table = MemoryTable(10.0, eb, {0: 16.0, 1: 13.0, 2: 9.0}, checkpointed=(6.0, eb))
    st = initial_expert_sets(State(), {c: p for c in range(3)}, table, alpha=1.0)
    assert st.checkpointing == {1, 2}
    assert [expert_count(st.expert_sets[c]) for c in range(3)] == [6, 6, 3]
    assert expert_count(initial_expert_sets(State(), {1: p}, MemoryTable(10.0, eb, {1: 13.0}), alpha=1.0)
                        .expert_sets[1]) == 3
    with pytest.raises(BudgetError):  # without the option client 2 cannot hold its submodel
        initial_expert_sets(State(), {2: p}, MemoryTable(10.0, eb, {2: 9.0}), alpha=1.0)
    # randomMoE: with the option unused (no checkpointed costs) the draws are those of before
    a = initial_expert_sets(State(), {c: p for c in range(2)}, MemoryTable(10.0, eb, {0: 16.0, 1: 13.0}),
                            alpha=1.0, random_init=np.random.default_rng(5))
    rng = np.random.default_rng(5)
    from fedmoe.core.search import random_expert_sets

    assert [a.expert_sets[c] for c in range(2)] == [random_expert_sets(eb, 10.0, m, 1.0, rng, client_id=c)
                                                     for c, m in ((0, 16.0), (1, 13.0))]
    r = initial_expert_sets(State(), {c: p for c in range(3)}, table, alpha=1.0, random_init=np.random.default_rng(5))
    assert r.checkpointing == {1, 2} and [expert_count(r.expert_sets[c]) for c in range(3)] == [6, 6, 3]
