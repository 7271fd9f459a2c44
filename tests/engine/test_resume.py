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
    "data.max_examples_per_task=36", "setting.num_clients=6", "federation.clients_per_round=3",
    "fedmoe.stage1_rounds=2", "federation.rounds=3", "train.max_local_steps=1", "engine.measure_memory=false",
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
        "fedmoe.stage1_rounds=1", "federation.rounds=0", "train.max_local_steps=1", "engine.measure_memory=false",
        f'data.data_dir="{shared_data}"'])
    run_experiment(cfg, tmp_path / "r")
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt is not None
    assert not list(ckpt.glob("*.pkl"))
    data = bytearray((ckpt / "state.json").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "state.json").write_bytes(bytes(data))
    (tmp_path / "r" / "summary.json").unlink()  # as if killed after the checkpoint (a finished run resumes to a no-op)
    with pytest.raises(CheckpointError, match="corrupt"):
        run_experiment(cfg, tmp_path / "r", resume=True)
    # a crafted checkpoint with a recomputed manifest: the state names a class outside fedmoe's
    # allow-list (and a pickle beside it): refused, and nothing runs
    import hashlib
    import json as _json

    marker = tmp_path / "pwned"
    tree = _json.loads(bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]))
    tree["items"].append(["evil", {"__t": "dc", "cls": "subprocess:Popen", "f": {"args": ["touch", str(marker)]}}])
    tree["ktup"].append(False)
    (ckpt / "state.json").write_text(_json.dumps(tree))
    (ckpt / "state.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    man = _json.loads((ckpt / "manifest.json").read_text())
    man["files"]["state.json"] = hashlib.sha256((ckpt / "state.json").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(_json.dumps(man))
    with pytest.raises(CheckpointError, match="not allowed"):
        run_experiment(cfg, tmp_path / "r", resume=True)
    assert not marker.exists()
    # the old pickle format is refused outright, whatever its manifest says
    man["files"] = {"trainable.safetensors": man["files"]["trainable.safetensors"],
                    "state.pkl": hashlib.sha256((ckpt / "state.pkl").read_bytes()).hexdigest()}
    man["format"] = 1
    (ckpt / "manifest.json").write_text(_json.dumps(man))
    with pytest.raises(CheckpointError, match="no pickle"):
        run_experiment(cfg, tmp_path / "r", resume=True)
    assert not marker.exists()


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path, shared_data):
    from fedmoe.config import load_config
    from fedmoe.engine.checkpoint import CheckpointError
    from fedmoe.engine.run import run_experiment

    sets = ARGS[:-3] + ["fedmoe.stage1_rounds=1", "federation.rounds=0", "train.max_local_steps=1",
                        "engine.measure_memory=false", f'data.data_dir="{shared_data}"']
    first = run_experiment(load_config(REPO / "configs" / "tiny.toml", sets), tmp_path / "r")
    changed = load_config(REPO / "configs" / "tiny.toml", [*sets, "setting.num_clients=8", "train.lr=0.5"])
    with pytest.raises(CheckpointError, match=r"setting.num_clients: 6 → 8; train.lr: 0.001 → 0.5"):
        run_experiment(changed, tmp_path / "r", resume=True)
    more = load_config(REPO / "configs" / "tiny.toml", [*sets, "federation.rounds=1"])  # allowed: more rounds
    summary = run_experiment(more, tmp_path / "r", resume=True)
    assert summary["rounds"] == first["rounds"] + 1
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_experiment(more, tmp_path / "empty", resume=True)
