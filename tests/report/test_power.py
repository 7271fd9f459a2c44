"""Seed statistics of the powered comparison, against independent oracles: hand-computed
numbers, the printed t table and scipy's own paired t test."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from fedmoe.report import power as P
from fedmoe.report.build import build_report
from tests.report.fabricate import write_run

T975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934}  # t table, two-sided 95 %


def test_t_interval_by_hand() -> None:
    xs = [0.80, 0.84, 0.86]
    iv = P.t_interval(xs)
    s = statistics.stdev(xs)  # sample std, independent of the code under test
    assert (iv.mean, iv.n) == (pytest.approx(0.8333333333), 3)
    assert iv.half == pytest.approx(T975[2] * s / math.sqrt(3), rel=1e-9)
    assert iv.half == pytest.approx(0.0758916, abs=1e-6)  # by hand: s = 0.0305505, × 4.30265 / √3
    two = P.t_interval([1.0, 3.0])  # s = √2, half = 12.706 · √2 / √2
    assert two.half == pytest.approx(T975[1])
    one = P.t_interval([0.7])
    assert one.n == 1 and math.isnan(one.half) and one.fmt(100) == "70.00 (n=1)" and not one.excludes_zero
    with pytest.raises(ValueError):
        P.t_interval([])


def test_paired_difference_matches_scipy_paired_t_test() -> None:
    from scipy import stats

    a = {0: 0.80, 1: 0.90, 2: 0.70, 3: 0.75, 4: 0.81}
    b = {0: 0.75, 1: 0.80, 2: 0.72, 3: 0.70, 4: 0.74, 9: 0.99}  # seed 9 has no partner: ignored
    d = P.paired_difference(a, b)
    seeds = [0, 1, 2, 3, 4]
    lo, hi = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    assert d.n == 5 and d.mean == pytest.approx((lo + hi) / 2) and d.half == pytest.approx((hi - lo) / 2)
    assert d.mean == pytest.approx(0.05)  # (0.05 + 0.10 − 0.02 + 0.05 + 0.07) / 5 and d.excludes_zero == (lo > 0 or hi < 0)
    assert P.paired_difference({0: 1.0}, {1: 1.0}) is None
    # pairing matters: an unpaired interval of the same numbers would be much wider here
    assert d.half < P.t_interval(list(a.values())).half + P.t_interval([b[s] for s in seeds]).half


def test_best_baseline_and_actions() -> None:
    means = {"fedmoe": 0.9, "random_moe": 0.7, "fedprox": 0.8, "fedmoe/no-stage2": 0.95}
    assert P.best_baseline(means, "fedmoe", ["random_moe", "fedprox"]) == "fedprox"
    assert P.best_baseline({"fedmoe": 1.0}, "fedmoe", []) is None
    rounds = [{"actions": [{"kind": "adjust", "added": [[0, 1]], "removed": []}, {"kind": "no_change"}]},
              {"actions": [{"kind": "adjust", "added": [], "removed": []}, {"kind": "keep"}]}, {}]
    assert P.action_counts(rounds) == {"adjust": 2, "changed": 1, "no_change": 1, "keep": 1}


def test_client_traffic_sums_a_clients_turns() -> None:
    def rec(cid, base, down, up, peak, budget, over=False):
        return {"client_id": cid, "bytes_down_base": base, "bytes_down": down, "bytes_up": up,
                "peak_memory_bytes": peak, "budget_bytes": budget, "over_budget": over}

    rounds = [{"clients": [rec(0, 100, 10, 9, 50, 60), rec(1, 80, 8, 8, 40, 60)]},
              {"clients": [rec(0, 20, 12, 11, 70, 60, True)]}]
    c0, c1 = P.client_traffic(rounds)
    assert (c0.participations, c0.model_bytes, c0.first_transfer, c0.total_bytes) == (2, 120, 110, 162)
    assert (c0.trainable_down_per_round, c0.up_per_round, c0.peak_max, c0.over_budget) == (11.0, 10.0, 70, 1)
    assert (c1.participations, c1.total_bytes, c1.over_budget) == (1, 96, 0)


def test_report_shows_intervals_and_paired_differences(tmp_path: Path) -> None:
    root, et = tmp_path / "runs", "enforced-hetero-t"
    fm, rm, fp = [0.80, 0.84, 0.86], [0.70, 0.80, 0.78], [0.75, 0.79, 0.85]
    for k in range(3):
        write_run(root / "fedmoe" / f"seed{k}", algorithm="fedmoe", setting=et, seed=k, scores={"tc": fm[k]},
                  rounds=[(1.0, [("tc", 0.5)])])
        write_run(root / "random_moe" / f"seed{k}", algorithm="random_moe", setting=et, seed=k,
                  scores={"tc": rm[k]}, rounds=[(1.0, [("tc", 0.5)])])
        write_run(root / "fedprox" / f"seed{k}", algorithm="fedprox", setting=et, seed=k, scores={"tc": fp[k]},
                  rounds=[(1.0, [("tc", 0.5)])])
    rep = build_report([root], tmp_path / "rep", figures=False)
    md = rep.markdown.read_text()
    want_half = T975[2] * statistics.stdev(fm) / math.sqrt(3)
    assert f"83.33 ± {100 * want_half:.2f} (n=3)" in md
    # best baseline by mean: FedProx (79.67) over randomMoE (76.00); diffs 0.05, 0.05, 0.01
    d = [f - p for f, p in zip(fm, fp, strict=True)]
    assert f"+{100 * statistics.mean(d):.2f} ± {100 * T975[2] * statistics.stdev(d) / math.sqrt(3):.2f} (n=3)" \
        " ← best baseline" in md
    data = json.loads(rep.json.read_text())["models"]["tiny-mixtral"]["power"][et]
    assert data["best_baseline"]["tc"] == "fedprox"
    assert data["paired"]["random_moe"]["tc"]["mean"] == pytest.approx(statistics.mean(
        [f - r for f, r in zip(fm, rm, strict=True)]))


def test_curve_bands_are_t_intervals_over_seeds(tmp_path: Path) -> None:
    from fedmoe.report.load import find_run_dirs, group_runs, load_run
    from fedmoe.report.power_section import curve_bands

    et = "enforced-hetero-t"
    vals = [[0.2, 0.6], [0.4, 0.5], [0.3, 0.9]]  # per seed: tc validation score in rounds 1 and 2
    for k, v in enumerate(vals):
        rounds = [(1.0, [("tc", v[0])]), (1.0, [("tc", v[1])] if k < 2 else [("rc", 0.1)])]
        write_run(tmp_path / f"seed{k}", algorithm="fedmoe", setting=et, seed=k, scores={"tc": 0.5},
                  rounds=rounds)
    dirs, _ = find_run_dirs([tmp_path])
    (g,), _ = group_runs([load_run(d) for d in dirs])
    b = curve_bands(g)
    r1 = [0.2, 0.4, 0.3]  # round 1: three seeds
    h1 = T975[2] * statistics.stdev(r1) / math.sqrt(3)
    r2 = [0.6, 0.5]  # round 2: two seeds have a TC point
    h2 = T975[1] * statistics.stdev(r2) / math.sqrt(2)
    assert b["tc"] == [(1, pytest.approx(0.3 - h1), pytest.approx(0.3 + h1)),
                       (2, pytest.approx(0.55 - h2), pytest.approx(0.55 + h2))]
    assert "rc" not in b  # one seed only: no band
