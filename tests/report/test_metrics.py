"""Arithmetic of the report's metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from fedmoe.report import metrics as M


def test_mean_std_sample_std_and_format():
    ms = M.mean_std([1.0, 2.0, 3.0, 4.0])
    assert ms.mean == pytest.approx(2.5)
    assert ms.std == pytest.approx(math.sqrt(5 / 3))  # Σ(x−μ)² = 5, / (n−1)
    assert ms.n == 4
    assert M.mean_std([0.8, 0.7]).fmt(100) == "75.00 ± 7.07"
    one = M.mean_std([0.42])
    assert (one.std, one.fmt(100)) == (0.0, "42.00")
    with pytest.raises(ValueError):
        M.mean_std([])


def test_coefficient_of_variation_and_cvi():
    assert M.coefficient_of_variation([0.8, 0.6]) == pytest.approx(0.1 / 0.7)  # population σ = 0.1
    assert math.isnan(M.coefficient_of_variation([0.0, 0.0]))
    value, per_task = M.cvi({"a": {"tc": 0.8, "rc": 0.5, "ts": 0.3}, "b": {"tc": 0.6, "rc": 0.5}})
    assert set(per_task) == {"tc", "rc"}  # ts is in one setting only
    assert per_task["tc"] == pytest.approx(1 / 7)
    assert per_task["rc"] == pytest.approx(0.0)
    assert value == pytest.approx(1 / 14)
    assert math.isnan(M.cvi({"a": {"tc": 0.5}})[0])


def test_task_curves_walls_and_seed_average():
    rounds = [
        {"round": 1, "wall_time_s": 5.0, "clients": [{"task": "tc", "score": 0.5}]},
        {"round": 0, "wall_time_s": 10.0, "clients": [{"task": "tc", "score": 0.2}, {"task": "tc", "score": 0.4},
                                                      {"task": "rc", "score": 0.9, "error": "boom"}]},
    ]
    assert M.task_curves(rounds) == {"tc": [(1, pytest.approx(0.3)), (2, 0.5)]}
    assert M.cumulative_wall(rounds) == {1: 10.0, 2: 15.0}
    assert M.average_curves([[(1, 0.2), (3, 0.8)], [(1, 0.4), (2, 0.5)]]) == [
        (1, pytest.approx(0.3)), (2, 0.5), (3, 0.8)]
    assert M.average_walls([{1: 10.0, 2: 20.0}, {1: 20.0}]) == {1: 15.0, 2: 20.0}


def test_final_score_and_rounds_to_reach():
    curve = [(1, 0.2), (2, 0.5), (3, 0.8), (4, 0.9)]
    assert M.final_score(curve) == 0.9
    assert M.final_score(curve, window=2) == pytest.approx(0.85)
    assert M.rounds_to_reach(curve, 0.81) == 4
    assert M.rounds_to_reach(curve, 0.8) == 3
    assert M.rounds_to_reach(curve, 0.95) is None


def test_convergence_and_speedup_hand_computed():
    a = [(1, 0.2), (2, 0.5), (3, 0.8), (4, 0.9)]
    b = [(1, 0.1), (2, 0.3), (3, 0.4), (4, 0.6), (5, 0.7), (6, 0.85)]
    walls = {"a": {r: 10.0 * r for r in range(1, 5)}, "b": {r: 5.0 * r for r in range(1, 7)}}
    conv = M.convergence({"a": a, "b": b}, walls, (0.9, 0.99))
    assert conv is not None
    assert (conv.best_method, conv.best_final) == ("a", 0.9)
    assert conv.target(0.9) == pytest.approx(0.81)
    r90, r99 = conv.reach[0.9], conv.reach[0.99]
    assert (r90["a"].rounds, r90["a"].wall_s) == (4, 40.0)  # 0.8 < 0.81 ≤ 0.9
    assert (r90["b"].rounds, r90["b"].wall_s) == (6, 30.0)  # 0.85 first ≥ 0.81
    assert (r99["a"].rounds, r99["b"].rounds, r99["b"].wall_s) == (4, None, None)  # 0.891 > 0.85
    assert M.speedup(r90["a"].rounds, r90["b"].rounds) == pytest.approx(1.5)
    assert M.speedup(r90["a"].wall_s, r90["b"].wall_s) == pytest.approx(0.75)
    assert M.speedup(r99["a"].rounds, r99["b"].rounds) is None
    assert M.convergence({"a": []}, {}) is None
    # window = 2: finals a = 0.85, b = 0.775 → target 0.765 at 90 %
    conv2 = M.convergence({"a": a, "b": b}, walls, (0.9,), window=2)
    assert conv2.best_final == pytest.approx(0.85)
    assert conv2.reach[0.9]["a"].rounds == 3 and conv2.reach[0.9]["b"].rounds == 6


def test_summary_helpers():
    s = {"scores": {"tc": {"accuracy": 0.7}, "ts": {"rouge1": 0.3, "rouge2": 0.1}},
         "bytes_down_base": 1, "bytes_down": 2, "bytes_up": 3}
    assert M.main_score(s, "tc") == 0.7
    assert M.main_score(s, "ts") == 0.1
    assert M.main_score(s, "rc") is None
    assert M.comm_bytes(s) == 6
    ex = M.expert_numbers([
        {"experts_start": {"mean": 10, "min": 8, "max": 12}, "experts_end": {"mean": 12, "min": 9, "max": 13}},
        {"experts_start": {"mean": 12, "min": 8, "max": 12}, "experts_end": {"mean": 14, "min": 8, "max": 15}},
    ])
    assert ex == {"start_mean": 11.0, "end_mean": 13.0, "end_min": 8.0, "end_max": 15.0}
    assert M.expert_numbers([{"experts_end": {}}]) is None
    assert M.mean_matrix([[[0.5, 0.5], [1.0, 0.0]], [[0.3, 0.7], [0.0, 1.0]]]) == [
        [pytest.approx(0.4), pytest.approx(0.6)], [0.5, 0.5]]
    with pytest.raises(ValueError):
        M.mean_matrix([[[1.0]], [[1.0, 2.0]]])
