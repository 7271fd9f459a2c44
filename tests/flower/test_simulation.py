"""``flwr run`` on the simulation runtime (Ray): a SuperLink started with ``--simulation``
by the test, 2 virtual SuperNodes, a 2-round tiny run."""

from __future__ import annotations

import json

import pytest

from fedmoe.flower import keys as K
from tests.flower.deployment import LocalFederation

pytestmark = pytest.mark.slow


def test_flwr_run_simulation_two_rounds(tmp_path, shared_data):
    pytest.importorskip("ray", reason='the simulation runtime needs `pip install "flwr[simulation]"`')
    overrides = "; ".join([
        f"data.data_dir={shared_data}", "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1", "federation.rounds=1",
        "train.max_local_steps=1", "engine.measure_memory=false", "engine.checkpoint_every=0",
    ])
    with LocalFederation(tmp_path, simulation=True) as fed:
        out, log = fed.flwr_run({K.RUN_OVERRIDES: overrides}, "sim",
                                federation_config="num-supernodes=2 client-resources-num-cpus=1")
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # stage 1 lasts until every memory-rich client has reported p: 2 rounds of tiny.toml's 3 per round
    assert [r["stage"] for r in rounds] == [1, 1, 2]
    assert all(c["error"] == "" for r in rounds for c in r["clients"])
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


def test_fedmoe_run_engine_flower_sim_matches_inprocess(tmp_path, shared_data):
    """``fedmoe run configs/tiny.toml --engine flower-sim``: a 2-round tiny run on Flower's
    simulation engine (one virtual SuperNode per client) writes the same outputs in ``--out`` as
    the in-process engine, with the same global weights, expert maps and scores."""
    pytest.importorskip("ray", reason='`--engine flower-sim` needs `pip install -e ".[simulation]"`')
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import REPO

    sets = [f"data.data_dir={shared_data}", "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1",
            "federation.rounds=1", "train.max_local_steps=1", "engine.measure_memory=false"]
    outs = {}
    for engine in ("inprocess", "flower-sim"):
        outs[engine] = tmp_path / engine
        cmd = [sys.executable, "-m", "fedmoe.cli", "run", str(REPO / "configs" / "tiny.toml"), "--engine", engine,
               "--out", str(outs[engine])]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = outs["inprocess"], outs["flower-sim"]
    names = {"config.toml", "rounds.jsonl", "summary.json", "expert_map.json", "global_trainable.safetensors",
             "p_by_task.json", "checkpoints"}
    assert names <= {p.name for p in a.iterdir()} and names <= {p.name for p in b.iterdir()}
    rounds = [json.loads(line) for line in (b / "rounds.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rounds] == [1, 1, 2]  # stage 1 until every memory-rich client reported
    assert all(c["error"] == "" for r in rounds for c in r["clients"])
    wa, wb = load_file(str(a / "global_trainable.safetensors")), load_file(str(b / "global_trainable.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert json.loads((a / "expert_map.json").read_text()) == json.loads((b / "expert_map.json").read_text())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["scores"] == sb["scores"] and sb["rounds"] == 3 and sb["failed_client_turns"] == 0
    assert 'name = "flower-sim"' in (b / "config.toml").read_text()
