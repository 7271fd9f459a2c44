"""What a user sees when `fedmoe run` is piped to a file (nohup, CI): one line per round,
no warnings, no ANSI codes; the --log sinks (W&B offline, without an account); a resume of a
finished run changes nothing."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LINE = re.compile(
    r"^round (\d+)/(\d+)  stage (\d)  clients (\d+)/(\d+) ok  loss (\d+\.\d{4})  score (\d+\.\d{4})  "
    r"down (\d+\.\d\d) MiB \(\+(\d+\.\d\d) MiB base\)  up (\d+\.\d\d) MiB  elapsed \d+s  eta \d+s$")


def _fedmoe(*args: str) -> subprocess.CompletedProcess:
    # no W&B account here: WANDB_MODE/key unset, so `--log wandb` must run offline by itself
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHONWARNINGS", "FORCE_COLOR", "TERM", "WANDB_"))}
    env.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fedmoe.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_non_tty_run_prints_one_line_per_round_and_writes_logs(shared_data, tmp_path):
    out = tmp_path / "run"
    sets = [f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1",
            "federation.rounds=2", "train.max_local_steps=1", "engine.measure_memory=false"]
    has_tb, has_wandb = (importlib.util.find_spec(m) is not None for m in ("tensorboard", "wandb"))
    logs = ",".join(["csv"] + ["tensorboard"] * has_tb + ["wandb"] * has_wandb)
    p = _fedmoe("run", "configs/tiny.toml", "--out", str(out), "--log", logs,
                *[a for s in sets for a in ("--set", s)])
    text = p.stdout + p.stderr
    assert p.returncode == 0, text
    assert "\x1b" not in text  # no ANSI codes
    assert "Warning" not in text and "warn" not in text.lower()
    assert not [x for x in text.splitlines() if x.startswith("wandb")]  # W&B prints nothing
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    lines = [m for m in map(LINE.match, p.stdout.splitlines()) if m]
    assert len(lines) == len(rounds) >= 3  # stage 1 (until every memory-rich client reported) + 2
    for k, (m, rr) in enumerate(zip(lines, rounds, strict=True)):
        ok = [c for c in rr["clients"] if not c.get("error")]
        assert (int(m[1]), int(m[2]), int(m[3])) == (k + 1, len(rounds), rr["stage"])
        assert (int(m[4]), int(m[5])) == (len(ok), len(rr["clients"]))
        assert float(m[6]) == pytest.approx(sum(c["loss"] for c in ok) / len(ok), abs=5e-5)
        assert float(m[8]) == pytest.approx(rr["bytes_down"] / 2**20, abs=0.006)
        assert float(m[9]) == pytest.approx(rr["bytes_down_base"] / 2**20, abs=0.006)
    assert "final evaluation: 6 clients" in p.stdout
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == list(range(1, len(rounds) + 1))
    assert [int(r["bytes_up"]) for r in rows] == [rr["bytes_up"] for rr in rounds]
    if has_tb:
        events = list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 0
    if has_wandb:  # one offline run under the run folder, read back with wandb's own inspector
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, list((out / "wandb").iterdir())
        q = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(runs[0])],
                           capture_output=True, text=True, timeout=120)
        records = [json.loads(x) for x in q.stdout.splitlines() if x.startswith("{")]
        history = [r["history"]["item"] for r in records if r.get("type") == "history"]
        assert [h["_step"] for h in history] == list(range(1, len(rounds) + 1)), q.stdout[-2000:] + q.stderr
        assert [h["round/bytes_up"] for h in history] == [rr["bytes_up"] for rr in rounds]
        assert [h["round/stage"] for h in history] == [rr["stage"] for rr in rounds]
        for h, row in zip(history, rows, strict=True):
            assert h["round/loss"] == pytest.approx(float(row["loss"]), rel=1e-6)

    # resuming the finished run changes nothing (no re-evaluation, same wall_time_s)
    before = {n: (out / n).read_bytes() for n in ("summary.json", "rounds.jsonl", "metrics.csv", "config.toml")}
    p = _fedmoe("run", "--resume", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert {n: (out / n).read_bytes() for n in before} == before
    assert "final evaluation" not in p.stdout


def test_unknown_log_kind_is_one_line_exit_2(tmp_path):
    p = _fedmoe("run", "configs/tiny.toml", "--out", str(tmp_path / "r"), "--log", "csv,mlflow")
    assert p.returncode == 2
    assert "Unknown log kind `mlflow`" in " ".join(p.stderr.split()) and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()
