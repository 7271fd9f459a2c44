"""Table of bad inputs: each exits non-zero with one line naming the problem and the fix,
no traceback (unless --debug), and no output directory left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.toml")

CASES = [
    # (id, args, expected fragment)
    ("unknown-key", [TINY, "--set", "train.lrr=0.1"], "did you mean `train.lr`"),
    ("wrong-type", [TINY, "--set", "train.batch_size=many"], "train.batch_size"),
    ("out-of-range", [TINY, "--set", "fedmoe.alpha=1.5"], "fedmoe.alpha"),
    ("bad-choice", [TINY, "--set", "train.finetune=partial"], "train.finetune"),
    ("missing-config", [str(REPO / "configs" / "nope.toml")], "does not exist"),
    ("unknown-model", [TINY, "--set", "model.name=tiny-nope"], "Unknown tiny model"),
    ("unknown-preset", [TINY, "--set", "setting.preset=standard-hetero"], "did you mean"),
    ("missing-data", [TINY, "--set", "data.data_dir=/nonexistent/data"], "data"),
    ("enforced-two-tasks", [TINY, "--set", "setting.preset=enforced-hetero-t", "--set", 'data.tasks=["tc","rc"]'],
     "3 different task types"),
    ("unknown-algorithm", [TINY, "--set", "algorithm=fedmo"], "did you mean `fedmoe`"),
    ("budgets-inverted", [TINY, "--set", "setting.budget_low=0.9", "--set", "setting.budget_high=0.1"], "budget_high"),
    ("unknown-engine", [TINY, "--engine", "flower"], "engine.name"),
    ("moved-key-set", [TINY, "--set", "fedmoe.rounds=3"], "fedmoe.rounds moved to federation.rounds"),
    ("moved-key-set-2", [TINY, "--set", "setting.clients_per_round=2"],
     "setting.clients_per_round moved to federation.clients_per_round"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(tmp_path, case):
    _, args, fragment = case
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert err.startswith("error:"), err
    assert fragment.lower() in err.lower(), err
    assert "Fix:" in err
    assert not out.exists()


def test_resume_is_in_process_only(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text((REPO / "configs" / "tiny.toml").read_text())
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--resume", str(run_dir), "--engine",
                           "flower-sim"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in run_dir.iterdir()] == ["config.toml"]


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", "--debug", "run", TINY, "--set", "train.lrr=1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr or "ConfigError" in proc.stderr
