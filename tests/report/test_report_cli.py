"""`fedmoe report` end to end on a fabricated set of run directories.

Grid: standard-hetero-t (S-T) and enforced-hetero-t (E-T); FedMoE with seeds 0 and 1 in S-T, one
seed in E-T; FedAvg one seed in each; FedMoE w/o stage 1 in S-T. Expected numbers are worked
out by hand in the comments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.report.build import group_p
from fedmoe.report.load import ReportError, find_run_dirs, group_runs, load_run
from tests.conftest import REPO
from tests.report.fabricate import write_run

ST, ET = "standard-hetero-t", "enforced-hetero-t"
GB = 10**9


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # FedMoE S-T seed 0: tc curve 0.2, 0.6, 0.8 (rounds 1–3), walls 10 s each
    write_run(root / ST / "fedmoe" / "seed0", algorithm="fedmoe", setting=ST, seed=0, scores={"tc": 0.80, "rc": 0.50},
              rounds=[(10.0, [("tc", 0.2)]), (10.0, [("tc", 0.6), ("rc", 0.3)]), (10.0, [("tc", 0.8)])],
              comm=(1 * GB, 2 * GB, 1 * GB), peak=(2 * GB, 1.5e9),
              experts_start={"mean": 10, "min": 8, "max": 12}, experts_end={"mean": 12, "min": 9, "max": 13},
              p={"after_stage1": {"tc": [[0.5, 0.5], [1.0, 0.0]]}, "end": {"tc": [[0.5, 0.5], [1.0, 0.0]]}})
    # seed 1: tc 0.4 (round 1), none in round 2, 0.6 (round 3); walls 20 s each
    write_run(root / ST / "fedmoe" / "seed1", algorithm="fedmoe", setting=ST, seed=1, scores={"tc": 0.70, "rc": 0.40},
              rounds=[(20.0, [("tc", 0.4)]), (20.0, [("rc", 0.5)]), (20.0, [("tc", 0.6)])],
              comm=(1 * GB, 3 * GB, 2 * GB), peak=(3 * GB, 2.5e9),
              experts_start={"mean": 12, "min": 8, "max": 12}, experts_end={"mean": 14, "min": 8, "max": 15},
              p={"end": {"tc": [[0.3, 0.7], [0.0, 1.0]]}})
    # FedAvg S-T: tc 0.5, 0.6, 0.65, 0.72, walls 5 s each
    write_run(root / ST / "fedavg" / "seed0", algorithm="fedavg", setting=ST, seed=0, scores={"tc": 0.60, "rc": 0.30},
              rounds=[(5.0, [("tc", 0.5)]), (5.0, [("tc", 0.6)]), (5.0, [("tc", 0.65)]), (5.0, [("tc", 0.72)])],
              comm=(0, GB, GB), peak=(GB, 1e9))
    write_run(root / ST / "fedmoe-no-stage1" / "seed0", algorithm="fedmoe", setting=ST, seed=0, stage1=False,
              scores={"tc": 0.65, "rc": 0.35}, rounds=[(1.0, [("tc", 0.5)])],
              experts_start={"mean": 10, "min": 8, "max": 12}, experts_end={"mean": 11, "min": 7, "max": 14})
    write_run(root / ET / "fedmoe" / "seed0", algorithm="fedmoe", setting=ET, seed=0, scores={"tc": 0.60, "rc": 0.50},
              rounds=[(1.0, [("tc", 0.5), ("rc", 0.4)])])
    write_run(root / ET / "fedavg" / "seed0", algorithm="fedavg", setting=ET, seed=0, scores={"tc": 0.60, "rc": 0.30},
              rounds=[(1.0, [("tc", 0.5)])])
    # unfinished: no summary.json → skipped with a note
    write_run(root / ET / "scaffold" / "seed0", algorithm="scaffold", setting=ET, seed=0, scores={},
              rounds=[(1.0, [("tc", 0.1)])], finished=False)
    return root


def test_grouping_and_p_mean(runs: Path):
    dirs, notes = find_run_dirs([runs])
    assert len(dirs) == 6 and len(notes) == 1 and "scaffold" in notes[0]
    groups, _ = group_runs([load_run(d) for d in dirs])
    keys = [(g.setting, g.method, tuple(g.seeds)) for g in groups]
    assert keys == [(ST, "fedmoe", (0, 1)), (ST, "fedmoe/no-stage1", (0,)), (ST, "fedavg", (0,)),
                    (ET, "fedmoe", (0,)), (ET, "fedavg", (0,))]
    p, _ = group_p(groups[0])
    assert p["end"]["tc"] == [[pytest.approx(0.4), pytest.approx(0.6)], [0.5, 0.5]]  # mean of the two seeds
    assert p["after_stage1"]["tc"] == [[0.5, 0.5], [1.0, 0.0]]  # only seed 0 logged it
    assert group_p(groups[2]) == (None, "no p_by_task.json")


def test_report_cli_end_to_end(runs: Path, tmp_path: Path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "report", str(runs), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())["models"]["tiny-mixtral"]

    # Table 1: FedMoE S-T TC = mean(0.80, 0.70) ± sample std √((0.05² + 0.05²)/1) = 75.00 ± 7.07;
    # comm = (4 GB, 6 GB) → 5.0000 ± 1.4142; memory max (2, 3) GB → 2.500 ± 0.707; E-T: one seed.
    row = next(line for line in md.splitlines() if line.startswith("| FedMoE |"))
    assert row == ("| FedMoE | 75.00 ± 7.07 | 45.00 ± 7.07 | 5.0000 ± 1.4142 | 2.500 ± 0.707 "
                   "| 60.00 | 50.00 | 0.0000 | n/m |")
    assert "| FedAvg | 60.00 | 30.00 | 2.0000 | 1.000 | 60.00 | 30.00 | 0.0000 | n/m |" in md
    table1 = md.split("## Table 1")[1].split("###")[0]
    assert "w/o stage 1" not in table1  # ablation variants only in Table 2
    st = data["settings"][ST]["methods"]["fedmoe"]
    assert st["scores"]["tc"]["mean"] == pytest.approx(0.75)
    assert st["scores"]["tc"]["std"] == pytest.approx(0.0707107, abs=1e-6)
    assert st["comm_gb"]["std"] == pytest.approx(2**0.5)

    # Table 2: FedMoE expert numbers start mean(10, 12) = 11.0 → end mean(12, 14) = 13.0; min/max 8 / 15
    assert "| Standard-Hetero-T | FedMoE | 75.00 ± 7.07 | 45.00 ± 7.07 | 11.0 → 13.0 | 8 / 15 |" in md
    assert "| Standard-Hetero-T | w/o stage 1 | 65.00 | 35.00 | 10.0 → 11.0 | 7 / 14 |" in md

    # Convergence S-T, TC. FedMoE seed-mean curve: r1 (0.2+0.4)/2 = 0.3, r2 0.6 (seed 0 only),
    # r3 (0.8+0.6)/2 = 0.7; walls r1 (10+20)/2 = 15, r2 30, r3 45. FedAvg: 0.5, 0.6, 0.65, 0.72 at
    # 5, 10, 15, 20 s. Best final = FedAvg 0.72; 90 % target 0.648: FedMoE r3 (45 s), FedAvg r3
    # (15 s) → speed-up 1.00× rounds, 15/45 = 0.33× time; 99 % target 0.7128: FedMoE never, FedAvg r4.
    tc = data["settings"][ST]["convergence"]["tc"]
    assert tc["best_method"] == "fedavg" and tc["best_final"] == pytest.approx(0.72)
    assert tc["finals"]["fedmoe"] == pytest.approx(0.7)
    assert tc["levels"]["0.9"]["fedmoe"] == {"rounds": 3, "wall_s": pytest.approx(45.0)}
    assert tc["levels"]["0.9"]["fedavg"] == {"rounds": 3, "wall_s": pytest.approx(15.0)}
    assert tc["levels"]["0.99"]["fedmoe"] == {"rounds": None, "wall_s": None}
    assert tc["levels"]["0.99"]["fedavg"] == {"rounds": 4, "wall_s": pytest.approx(20.0)}
    assert tc["speedup"]["0.9"]["fedavg"]["rounds"] == pytest.approx(1.0)
    assert tc["speedup"]["0.9"]["fedavg"]["wall"] == pytest.approx(1 / 3)
    assert tc["speedup"]["0.99"]["fedavg"] == {"rounds": None, "wall": None}
    assert "| TC acc | 90% | 64.80 | 3 r / 45.0 s | 3 r / 15.0 s |" in md
    assert "| TC acc | 90% | 1.00× / 0.33× |" in md
    assert "| TC acc | 99% | 71.28 | not reached | 4 r / 20.0 s |" in md

    # CVI: FedMoE tc (0.75, 0.60): μ 0.675, σ 0.075 → 1/9; rc (0.45, 0.50): μ 0.475, σ 0.025 → 1/19;
    # CVI = (1/9 + 1/19)/2. FedAvg: identical scores → 0.
    cvi = data["cvi"]
    assert cvi["fedmoe"]["per_task"]["tc"] == pytest.approx(1 / 9)
    assert cvi["fedmoe"]["per_task"]["rc"] == pytest.approx(1 / 19)
    assert cvi["fedmoe"]["cvi"] == pytest.approx((1 / 9 + 1 / 19) / 2)
    assert cvi["fedavg"]["cvi"] == pytest.approx(0.0)
    assert cvi["fedmoe/no-stage1"]["cvi"] is None  # one setting only
    assert f"| FedMoE | {1 / 9:.4f} | {1 / 19:.4f} | {(1 / 9 + 1 / 19) / 2:.4f} | 2 |" in md

    # figures: Figure 4 per setting, Figure 1 for the groups that logged p; the rest are named
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"fig4_standard-hetero-t.png", "fig4_enforced-hetero-t.png", "fig1_standard-hetero-t_fedmoe.png"} <= figs
    for name in figs:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/fig1_standard-hetero-t_fedmoe.png" in md
    assert "Heat maps need `p` logging" in md and "Standard-Hetero-T/FedAvg (no p_by_task.json)" in md
    assert "skipped unfinished run" in md and "skipped unfinished run" in proc.stderr


def test_report_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "report", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "No finished run directory" in proc.stderr and "Traceback" not in proc.stderr
    bad = write_run(tmp_path / "bad", algorithm="fedmoe", setting=ST, seed=0, scores={"tc": 0.5}, rounds=[])
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_run(bad)


def test_report_skips_and_names_broken_run_folders(runs: Path, tmp_path: Path):
    from fedmoe.report import build_report

    bad = write_run(runs / ST / "fedavg" / "seed0", algorithm="fedavg", setting=ST, seed=0, scores={"tc": 0.5},
                    rounds=[(10.0, [("tc", 0.2)])])
    (bad / "summary.json").write_text("{not json")
    noscores = write_run(runs / ST / "fedprox" / "seed0", algorithm="fedprox", setting=ST, seed=0, scores={"tc": 0.5},
                         rounds=[(10.0, [("tc", 0.2)])])
    (noscores / "summary.json").write_text("[]")
    rep = build_report([runs], tmp_path / "rep", figures=False)
    broken = [n for n in rep.notes if n.startswith("skipped broken run")]
    assert len(broken) == 2
    assert any(str(bad) in n and "not valid JSON" in n for n in broken)
    assert any(str(noscores) in n and "no `scores`" in n for n in broken)
    data = json.loads(rep.json.read_text())
    assert str(bad) not in data["runs"] and str(noscores) not in data["runs"] and len(data["runs"]) >= 2
