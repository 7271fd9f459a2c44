"""FedMoE stage 1: every memory-rich client reports p; a stage 1 without any reply stops cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedmoe.config import load_config
from fedmoe.engine.run import Run, run_experiment
from fedmoe.errors import BudgetError, RunStopped
from tests.conftest import REPO


def _cfg(shared_data, **extra):
    overrides = [
        f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", "setting.num_clients=6",
        "train.max_local_steps=1", "engine.measure_memory=false", "federation.rounds=1",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(REPO / "configs" / "tiny.toml", overrides)


def _rounds(out):
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["standard-hetero-t", "enforced-hetero-t"])
def test_every_memory_rich_client_reports_p_in_stage1(shared_data, tmp_path, preset):
    cfg = _cfg(shared_data, **{"setting.preset": f'"{preset}"', "federation.clients_per_round": 3,
                               "setting.budget_low": 0.7, "setting.budget_high": 1.6, "fedmoe.stage1_rounds": 1})
    plan = Run(cfg, tmp_path / "plan").plan  # the oracle: budgets that hold the full MoE at the client's own price
    rich = sorted(c for c, b in plan.table.budgets.items() if b >= plan.table.full_bytes(c))
    assert len(rich) > 3  # more than one stage-1 round of clients (else the test shows nothing)
    run_experiment(cfg, tmp_path / "run")
    rounds = _rounds(tmp_path / "run")
    stage1 = [r for r in rounds if r["stage"] == 1]
    assert len(stage1) == -(-len(rich) // 3)
    reported = sorted({c["client_id"] for r in stage1 for c in r["clients"] if not c["error"]})
    assert reported == rich
    assert all(len(r["sampled"]) == 3 for r in stage1)
    assert [r["stage"] for r in rounds] == [1] * len(stage1) + [2]  # stage 2 keeps its federation.rounds


def test_stage1_without_a_reply_stops_cleanly_and_resumes(shared_data, tmp_path):
    faults = ",".join(f"0:{c}" for c in range(6))
    base = {"federation.clients_per_round": 6, "fedmoe.stage1_rounds": 1, "federation.rounds": 2,
            "engine.checkpoint_every": 1}
    cfg = _cfg(shared_data, **base, **{"engine.inject_faults": f'"{faults}"', "engine.max_empty_rounds": 1})
    with pytest.raises(RunStopped, match="no client reply survived") as err:
        run_experiment(cfg, tmp_path)
    assert "--resume" in str(err.value)
    assert not (tmp_path / "summary.json").exists()
    # the cause fixed (no more faults), --resume repeats stage 1, then stage 2 runs
    summary = run_experiment(_cfg(shared_data, **base), tmp_path, resume=True)
    rounds = _rounds(tmp_path)
    assert [r["stage"] for r in rounds] == [1, 1, 2]
    assert all(c["error"] for c in rounds[0]["clients"]) and not any(c["error"] for c in rounds[1]["clients"])
    assert summary["rounds"] == 3 and set(summary["scores"]) == {"tc", "rc", "ts"}


def test_stage1_without_a_reply_never_reaches_stage2(shared_data, tmp_path):
    """engine.max_empty_rounds = 0 (never stop): every round stays in stage 1; the run ends with
    the one-line message and exit 2 instead of a traceback from stage 2."""
    faults = ",".join(f"{r}:{c}" for r in range(3) for c in range(6))
    args = [str(REPO / "configs" / "tiny.toml"), "--out", str(tmp_path / "out")]
    for k, v in {"data.data_dir": f'"{shared_data}"', "data.max_examples_per_task": 36, "setting.num_clients": 6,
                 "federation.clients_per_round": 6, "fedmoe.stage1_rounds": 1, "federation.rounds": 2,
                 "train.max_local_steps": 1, "engine.measure_memory": "false", "engine.max_empty_rounds": 0,
                 "engine.inject_faults": f'"{faults}"'}.items():
        args += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "stage 1 never got" in proc.stderr and "Traceback" not in proc.stderr
    assert [r["stage"] for r in _rounds(tmp_path / "out")] == [1, 1, 1]


@pytest.mark.parametrize("algorithm", ["fedmoe", "random_moe"])
def test_a_client_no_expert_set_can_fit_stops_the_run_before_stage1(shared_data, tmp_path, algorithm):
    # budgets of 1-2 % of the experts' cost above the dense part: no client holds one expert per layer, whatever p
    over = {"setting.budget_low": 0.01, "setting.budget_high": 0.02, "fedmoe.alpha": 0.9, "algorithm": f'"{algorithm}"'}
    with pytest.raises(BudgetError, match=r"Client \d+ cannot hold its submodel: dense \+ one expert per layer") as err:
        Run(_cfg(shared_data, **over), tmp_path / "stop")
    assert "setting.budget_low" in err.value.fix
    assert not (tmp_path / "stop" / "rounds.jsonl").exists() or not _rounds(tmp_path / "stop")  # nothing ran
    # leaving such clients out is still possible, and they are recorded once the sets are drawn
    # (randomMoE: no stage 1, which would need a memory-rich client among budgets this low)
    over.update({"setting.budget_high": 0.6, "algorithm": '"random_moe"', "federation.exclude_unfit": "true"})
    summary = run_experiment(_cfg(shared_data, **over), tmp_path / "skip")
    assert summary["excluded"] and all("one expert per layer" in why for why in summary["excluded"].values())
    assert len(summary["excluded"]) < 6  # the others ran


def test_alpha_keeps_headroom_in_the_expert_share_so_tiny_switch_runs(shared_data, tmp_path):
    # tiny-switch's dense part is ~98 % of a u = 0.3 budget: α = 0.9 on the whole budget stopped every such run
    over = {"model.name": '"tiny-switch-transformers"', "fedmoe.alpha": 0.9}
    summary = run_experiment(_cfg(shared_data, **over), tmp_path / "switch")
    assert not summary["excluded"] and summary["over_budget_turns"] == 0
