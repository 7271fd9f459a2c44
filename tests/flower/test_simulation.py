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
        f"data.data_dir={shared_data}", "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1", "fedmoe.rounds=1",
        "train.max_local_steps=1", "engine.measure_memory=false", "engine.checkpoint_every=0",
    ])
    with LocalFederation(tmp_path, simulation=True) as fed:
        out, log = fed.flwr_run({K.RUN_OVERRIDES: overrides}, "sim",
                                federation_config="num-supernodes=2 client-resources-num-cpus=1")
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rounds] == [1, 2]
    assert all(c["error"] == "" for r in rounds for c in r["clients"])
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
