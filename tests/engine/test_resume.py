"""Kill test: SIGKILL at a random point, resume, and get the uninterrupted result bit-exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

ARGS = [
    "data.max_examples_per_task=36", "setting.num_clients=6", "setting.clients_per_round=3",
    "fedmoe.stage1_rounds=2", "fedmoe.rounds=3", "train.max_local_steps=1", "engine.measure_memory=false",
]


def _cmd(out, shared_data, resume=False):
    base = [sys.executable, "-m", "fedmoe.cli", "run"]
    if resume:
        return base + ["--resume", str(out)]
    sets = [x for a in ARGS + [f'data.data_dir="{shared_data}"'] for x in ("--set", a)]
    return base + [str(REPO / "configs" / "tiny.toml"), *sets, "--out", str(out)]


def _summary(out):
    s = json.loads((out / "summary.json").read_text())
    s.pop("wall_time_s")
    return s


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path, shared_data):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, shared_data), check=True, cwd=REPO, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, shared_data), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait for the first checkpoint, then kill at a random moment of the following rounds
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "LATEST").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 3.0))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists() or proc.returncode == 0
    subprocess.run(_cmd(killed, shared_data, resume=True), check=True, cwd=REPO, capture_output=True)
    assert _summary(killed) == _summary(ref)
    a = load_file(str(ref / "global_trainable.safetensors"))
    b = load_file(str(killed / "global_trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (ref / "rounds.jsonl").read_text().count("\n") == (killed / "rounds.jsonl").read_text().count("\n")


def test_corrupt_checkpoint_is_rejected(tmp_path, shared_data):
    from fedmoe.config import load_config
    from fedmoe.engine.checkpoint import CheckpointError, latest_checkpoint
    from fedmoe.engine.run import run_experiment

    cfg = load_config(REPO / "configs" / "tiny.toml", ARGS[:-3] + [
        "fedmoe.stage1_rounds=1", "fedmoe.rounds=0", "train.max_local_steps=1", "engine.measure_memory=false",
        f'data.data_dir="{shared_data}"'])
    run_experiment(cfg, tmp_path / "r")
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt is not None
    data = bytearray((ckpt / "state.pkl").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "state.pkl").write_bytes(bytes(data))
    (tmp_path / "r" / "summary.json").unlink()  # as if killed after the checkpoint (a finished run resumes to a no-op)
    with pytest.raises(CheckpointError, match="corrupt"):
        run_experiment(cfg, tmp_path / "r", resume=True)
