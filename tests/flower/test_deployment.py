"""A real Flower deployment on 127.0.0.1: a SuperLink and 2 SuperNodes started by the test
(free ports, stopped by PID), the app submitted with ``flwr run``.

The tiny FedMoE experiment has 6 clients; SuperNode ``partition-id=p num-partitions=2``
serves clients ``c`` with ``c % 2 == p``, so a node may train several clients in a round.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedmoe.config import load_config
from fedmoe.engine.run import run_experiment
from fedmoe.flower import keys as K
from fedmoe.flower.settings import parse_overrides
from tests.conftest import REPO
from tests.flower.deployment import LocalFederation

NODES = 2


#: settings the parity run passes as FlowerTune-style flat run-config keys instead of `overrides`
FLAT = {"fedmoe.stage1-rounds": 2, "train.max-local-steps": 1}


def overrides(shared_data: Path, flat: bool = False) -> str:
    return "; ".join([
        f"data.data_dir={shared_data}", "data.max_examples_per_task=36", "federation.rounds=2",
        "engine.measure_memory=false", "engine.checkpoint_every=0",
        *([] if flat else ["fedmoe.stage1_rounds=2", "train.max_local_steps=1"]),
    ])


def rounds_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    return SHARED_DATA


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("inprocess")
    run_experiment(load_config(REPO / "configs" / "tiny.toml", parse_overrides(overrides(data_dir))), out)
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("federation"), num_nodes=NODES) as fed:
        yield fed


def test_deployment_matches_inprocess(federation, inprocess, data_dir):
    # in the default suite (CI): starts a SuperLink + 2 SuperNodes on free ports, kills them by PID
    # experiment = the default "configs/tiny.toml": resolved inside the installed app bundle
    # part of the experiment as flat keys (FLAT): `flwr run` accepts them (pyproject declares them) and
    # server and nodes apply them — tiny.toml has 2 local steps, so a missed key breaks the parity
    out, log = federation.flwr_run({K.RUN_OVERRIDES: overrides(data_dir, flat=True), **FLAT}, "parity")
    a = load_file(str(inprocess / "global_trainable.safetensors"))
    b = load_file(str(out / "global_trainable.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert json.loads((inprocess / "expert_map.json").read_text()) == json.loads((out / "expert_map.json").read_text())
    ra, rb = rounds_of(inprocess), rounds_of(out)
    assert [r["stage"] for r in rb] == [1, 1, 2, 2]
    assert [r["sampled"] for r in ra] == [r["sampled"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert [c["loss"] for c in x["clients"]] == [c["loss"] for c in y["clients"]]
        assert all(c["error"] == "" and c["bytes_down"] > 0 and c["bytes_up"] > 0 for c in y["clients"])
    assert "[fedmoe] done: 4 rounds, 0 failed client turns" in log


@pytest.mark.slow
def test_deployment_client_failure_is_logged_and_run_goes_on(federation, inprocess, data_dir):
    victim = rounds_of(inprocess)[2]["sampled"][0]
    corrupt = rounds_of(inprocess)[3]["sampled"][0]  # its reply arrives with NaN: the server rejects it
    out, log = federation.flwr_run({K.RUN_OVERRIDES: overrides(data_dir),
                                    K.RUN_INJECT_FAULT: f"2:{victim},3:{corrupt}:nan"}, "fault")
    rounds = rounds_of(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds:
        for c in r["clients"]:
            if (r["round"], c["client_id"]) == (2, victim):
                assert c["error"].startswith("CLIENT_APP_RAISED_EXCEPTION") and "injected fault" in c["error"]
                assert (c["loss"], c["bytes_up"]) == (0.0, 0)
            elif (r["round"], c["client_id"]) == (3, corrupt):
                assert c["error"].startswith("rejected: `") and c["error"].endswith("holds NaN/Inf values")
                assert c["bytes_up"] > 0  # the reply crossed the network and was rejected
            else:
                assert c["error"] == ""
    assert len(rounds[2]["clients"]) == len(rounds[2]["sampled"]) > 1  # the others completed the round
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_client_turns"] == 2 and summary["rounds"] == 4
