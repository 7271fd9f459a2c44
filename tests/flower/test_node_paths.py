"""A node's own config pins where it reads and writes: server-sent paths outside its
``allowed-roots`` are refused (unit checks, and a real loopback deployment)."""

from __future__ import annotations

import json

import pytest

from fedmoe.config import load_config
from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K
from fedmoe.flower.settings import AppSettings, NodeIdentity
from tests.conftest import REPO


def _ident(roots: str, **extra: str) -> NodeIdentity:
    return NodeIdentity.from_node_config({K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 1,
                                          K.NODE_ALLOWED_ROOTS: roots, **extra})


def test_check_paths(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    inside = load_config(REPO / "configs" / "tiny.toml", [f'data.data_dir="{allowed / "data"}"'])
    outside = load_config(REPO / "configs" / "tiny.toml", ['data.data_dir="/etc"'])
    ident = _ident(f"{allowed}; /nonexistent-root")
    ident.check_paths(AppSettings(), inside)  # the app's own experiment file, data inside: fine
    with pytest.raises(ConfigError, match=r"`data.data_dir` = /etc — outside this node's allowed roots"):
        ident.check_paths(AppSettings(), outside)
    with pytest.raises(ConfigError, match="`experiment` = /etc/passwd"):
        ident.check_paths(AppSettings(experiment="/etc/passwd"))
    with pytest.raises(ConfigError, match="`experiment` = ../../x.toml"):
        ident.check_paths(AppSettings(experiment="../../x.toml"))
    with pytest.raises(ConfigError, match="`node-state-dir` = /tmp/elsewhere"):
        ident.check_paths(AppSettings(node_state_dir="/tmp/elsewhere"), inside)
    with pytest.raises(ConfigError, match="`model.name` = /opt/model"):
        ident.check_paths(AppSettings(), load_config(None, [f'data.data_dir="{allowed}"', 'model.name="/opt/model"']))
    # what the node pins itself wins: the server's values are not used, so not refused
    _ident(str(allowed), **{K.NODE_DATA_DIR: "/srv/data", K.NODE_STATE_DIR: "/srv/state"}).check_paths(
        AppSettings(node_state_dir="/tmp/elsewhere"), outside)
    _ident("").check_paths(AppSettings(experiment="/etc/passwd"), outside)  # no allowed-roots: no check


@pytest.mark.slow
def test_loopback_node_refuses_a_path_outside_its_roots(tmp_path_factory):
    """SuperLink + 2 SuperNodes on 127.0.0.1 with ``allowed-roots``; the run config points
    ``data.data_dir`` outside: every client turn is refused on the node, nothing is trained."""
    from tests.conftest import SHARED_DATA
    from tests.flower.deployment import LocalFederation

    root = tmp_path_factory.mktemp("paths")
    allowed = root / "allowed"
    allowed.mkdir()
    sets = "; ".join([f"data.data_dir={SHARED_DATA}", "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1",
                      "federation.rounds=0", "train.max_local_steps=1", "engine.measure_memory=false",
                      "engine.checkpoint_every=0", "engine.max_empty_rounds=0"])
    with LocalFederation(root, num_nodes=2, node_config=f'{K.NODE_ALLOWED_ROOTS}="{allowed}"') as fed:
        out, log = fed.flwr_run({K.RUN_OVERRIDES: sets}, "outside", timeout=900)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    clients = [c for r in rounds for c in r["clients"]]
    assert clients and all("outside this node's allowed roots" in c["error"] for c in clients), clients
    assert all(c["bytes_up"] == 0 and c["steps"] == 0 for c in clients)
    assert all(str(SHARED_DATA) in c["error"] and "data.data_dir" in c["error"] for c in clients)
