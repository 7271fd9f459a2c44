"""The Flower message path in one process (:class:`LocalGrid`): same weights as the in-process
engine, failed clients left out of aggregation and logged, node discovery, reply timeouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedmoe.engine.run import run_experiment
from fedmoe.engine.strategies.fedmoe import FedMoEStrategy
from fedmoe.flower import keys as K
from fedmoe.flower.client_app import app as client_app
from fedmoe.flower.local import LocalGrid, node_configs
from fedmoe.flower.server_app import collect_replies, discover_nodes, run_federated
from fedmoe.flower.settings import AppSettings, partition_of
from tests.conftest import REPO

PARTITIONS = 3


def run_config(shared_data: Path, **extra: str) -> dict[str, str | float]:
    overrides = [
        f"data.data_dir={shared_data}", "data.max_examples_per_task=36", "setting.num_clients=6",
        "fedmoe.stage1_rounds=1", "train.max_local_steps=1", "engine.measure_memory=false", "engine.checkpoint_every=0",
    ]
    flat = {"federation.clients-per-round": 2, "federation.rounds": 2, "seed": ""}  # FlowerTune-style keys ("" = the file's)
    return {K.RUN_EXPERIMENT: str(REPO / "configs" / "tiny.toml"), K.RUN_OVERRIDES: "; ".join(overrides),
            K.RUN_ROUND_TIMEOUT: 60.0, K.RUN_DISCOVERY_TIMEOUT: 5.0, **flat, **extra}


def rounds_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """The same experiment in-process and on a LocalGrid of 3 nodes."""
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    rc = run_config(SHARED_DATA)
    settings = AppSettings.from_run_config(rc)
    base = tmp_path_factory.mktemp("local")
    run_experiment(settings.experiment_config(), base / "inprocess")
    run_federated(LocalGrid(client_app, node_configs(PARTITIONS), rc), settings, base / "flower")
    return {"inprocess": base / "inprocess", "flower": base / "flower"}


def test_local_grid_matches_inprocess(clean):
    a = load_file(str(clean["inprocess"] / "global_trainable.safetensors"))
    b = load_file(str(clean["flower"] / "global_trainable.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    maps = [json.loads((clean[e] / "expert_map.json").read_text()) for e in ("inprocess", "flower")]
    assert maps[0] == maps[1]
    ra, rb = rounds_of(clean["inprocess"]), rounds_of(clean["flower"])
    assert [r["sampled"] for r in ra] == [r["sampled"] for r in rb]
    assert len(rb[-1]["sampled"]) == 2  # the flat run-config key federation.clients-per-round reached the run
    for x, y in zip(ra, rb, strict=True):
        for ca, cb in zip(x["clients"], y["clients"], strict=True):
            assert (ca["loss"], ca["score"], ca["steps"]) == (cb["loss"], cb["score"], cb["steps"])
            assert cb["error"] == "" and cb["bytes_down_base"] == 0
            # Flower's records carry the same tensors as the safetensors payload, plus metadata
            assert 0.5 * ca["bytes_down"] < cb["bytes_down"] < 1.5 * ca["bytes_down"] + 8192
            assert 0.9 * ca["bytes_up"] < cb["bytes_up"] < 1.1 * ca["bytes_up"] + 8192
    sa, sb = (json.loads((clean[e] / "summary.json").read_text()) for e in ("inprocess", "flower"))
    assert sa["scores"] == sb["scores"] and sb["failed_client_turns"] == 0


def test_failed_clients_are_logged_and_left_out(clean, tmp_path, monkeypatch, shared_data):
    victim = rounds_of(clean["flower"])[1]["sampled"][0]
    dead_partition = (partition_of(victim, PARTITIONS) + 1) % PARTITIONS
    nodes = node_configs(PARTITIONS)
    dead = [n for n, c in nodes.items() if c["partition-id"] == dead_partition]
    aggregated: dict[int, list[int]] = {}
    original = FedMoEStrategy.aggregate

    def spy(self, run, plan, updates, replies):
        aggregated[plan.round] = [u.client_id for u in updates]
        assert sorted(replies) == sorted(aggregated[plan.round])
        return original(self, run, plan, updates, replies)

    monkeypatch.setattr(FedMoEStrategy, "aggregate", spy)
    rc = run_config(shared_data, **{K.RUN_INJECT_FAULT: f"1:{victim}"})
    grid = LocalGrid(client_app, nodes, rc, dies_after=dict.fromkeys(dead, 1))  # answers discovery, then dies
    summary = run_federated(grid, AppSettings.from_run_config(rc), tmp_path)
    rounds = rounds_of(tmp_path)
    # every round of the clean run ran, the ones after the fault too
    assert [r["round"] for r in rounds] == [r["round"] for r in rounds_of(clean["flower"])]
    assert len(rounds) > 2
    failed = 0
    for r in rounds:
        ok = [c["client_id"] for c in r["clients"] if not c["error"]]
        assert aggregated.get(r["round"], []) == ok
        for c in r["clients"]:
            if (r["round"], c["client_id"]) == (1, victim):
                assert "InjectedFault" in c["error"] and "injected fault" in c["error"]
            elif partition_of(c["client_id"], PARTITIONS) == dead_partition:
                assert c["error"].startswith("NODE_UNAVAILABLE")
            else:
                assert c["error"] == ""
            if c["error"]:
                failed += 1
                assert (c["loss"], c["steps"], c["bytes_up"]) == (0.0, 0, 0) and c["bytes_down"] > 0
        assert r["bytes_up"] == sum(c["bytes_up"] for c in r["clients"])
    assert summary["failed_client_turns"] == failed >= 1


def _echo_app() -> ClientApp:
    echo = ClientApp()

    @echo.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    return echo


def test_collect_replies_times_out_on_silent_nodes_and_reports_dead_ones():
    grid = LocalGrid(_echo_app(), {1: {}, 2: {}, 3: {}}, {}, silent_nodes=[2], dead_nodes=[3])
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    ids = list(grid.push_messages(msgs))
    replies = collect_replies(grid, dict(zip(ids, [10, 20, 30], strict=True)), timeout=0.3, poll=0.05)
    assert sorted(replies) == [10, 30]
    assert not replies[10].has_error()
    assert replies[30].has_error() and replies[30].error.code == 5
    assert replies[30].metadata.reply_to_message_id == ids[2]


def test_discovery_maps_partitions_to_nodes():
    nodes = node_configs(3, first_node_id=7)
    d = discover_nodes(LocalGrid(client_app, nodes, {}), timeout=2.0, poll=0.05)
    assert d.num_partitions == 3 and d.nodes == {0: 7, 1: 8, 2: 9}
    assert [d.node_for(c) for c in range(6)] == [7, 8, 9, 7, 8, 9]
    d = discover_nodes(LocalGrid(client_app, nodes, {}, dead_nodes=[8]), timeout=0.3, poll=0.05)
    assert d.missing() == [1] and d.node_for(4) is None and d.node_for(3) == 7
    with pytest.raises(RuntimeError):
        discover_nodes(LocalGrid(client_app, nodes, {}, dead_nodes=[7, 8, 9]), timeout=0.2, poll=0.05)


def test_node_refuses_foreign_clients_and_other_configs(shared_data):
    from fedmoe.engine.remote import ClientJob
    from fedmoe.errors import ConfigError
    from fedmoe.flower.client_app import handle_train
    from fedmoe.flower.records import job_content
    from fedmoe.moe.slicing import ExpertMap

    em = ExpertMap("mixtral", [4], [[0]])
    job = ClientJob(1, "tc", 1, 0, 0, em.kept, em, {"w": torch.zeros(1)})
    rc = run_config(shared_data)
    with pytest.raises(ConfigError, match="does not belong"):
        handle_train(job_content(job, "x"), rc, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ConfigError, match="differs"):
        handle_train(job_content(job, "x"), rc, {"partition-id": 1, "num-partitions": 2})


def test_refresh_follows_restarted_and_lost_nodes():
    from fedmoe.flower.server_app import refresh_nodes

    grid = LocalGrid(client_app, node_configs(3, first_node_id=7), {})
    d = discover_nodes(grid, timeout=2.0, poll=0.05)
    assert refresh_nodes(grid, d, timeout=1.0, poll=0.05) is d  # nothing changed: no queries
    grid.node_configs[20] = grid.node_configs.pop(8)  # node 8 restarted as node 20
    grid.states[20] = RecordDict()
    grid.answered[20] = 0
    d = refresh_nodes(grid, d, timeout=2.0, poll=0.05)
    assert d.nodes == {0: 7, 1: 20, 2: 9}
    del grid.node_configs[9]  # lost for good
    d = refresh_nodes(grid, d, timeout=0.2, poll=0.05)
    assert d.nodes == {0: 7, 1: 20} and d.missing() == [2]


def test_client_closures_fail_loudly(tmp_path, shared_data, monkeypatch):
    """Client code must be a named node plan: a strategy that hands out closures is refused."""
    from fedmoe.engine.client import ClientPlan
    from fedmoe.engine.strategies.baselines import FedProxStrategy
    from fedmoe.errors import ConfigError
    from fedmoe.train.loop import LocalHooks

    monkeypatch.setattr(FedProxStrategy, "client_plan",
                        lambda self, run, cid, kept: ClientPlan(hooks=lambda extra_down: LocalHooks()))
    rc = run_config(shared_data)
    rc[K.RUN_OVERRIDES] = f"{rc[K.RUN_OVERRIDES]}; algorithm=fedprox"
    with pytest.raises(ConfigError, match="closures"):
        run_federated(LocalGrid(client_app, node_configs(2), rc), AppSettings.from_run_config(rc), tmp_path)


@pytest.mark.slow
def test_hfedmoe_on_local_grid_matches_inprocess(tmp_path, shared_data):
    rc = run_config(shared_data)
    rc[K.RUN_OVERRIDES] = f"{rc[K.RUN_OVERRIDES]}; algorithm=hfedmoe"
    settings = AppSettings.from_run_config(rc)
    run_experiment(settings.experiment_config(), tmp_path / "inprocess")
    run_federated(LocalGrid(client_app, node_configs(2), rc), settings, tmp_path / "flower")
    a = load_file(str(tmp_path / "inprocess" / "global_trainable.safetensors"))
    b = load_file(str(tmp_path / "flower" / "global_trainable.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    maps = [json.loads((tmp_path / e / "expert_map.json").read_text()) for e in ("inprocess", "flower")]
    assert maps[0] == maps[1]
    # HFedMoE's modelled setup traffic (base weights for its scoring) is counted as in-process
    assert [r["bytes_down_base"] for r in rounds_of(tmp_path / "inprocess")] == [
        r["bytes_down_base"] for r in rounds_of(tmp_path / "flower")]


def test_auto_checkpointing_reaches_the_nodes(tmp_path, monkeypatch, shared_data):
    """train.gradient-checkpointing="auto" (a flat run-config key) on the Flower message path: the
    nodes train with checkpointing exactly on the turns the server chose, as the in-process engine does."""
    import fedmoe.moe.memory.checkpointing as ckpt_mod

    trained_with: list[bool] = []
    original = ckpt_mod.enable_gradient_checkpointing
    monkeypatch.setattr(ckpt_mod, "enable_gradient_checkpointing", lambda m: (trained_with.append(True), original(m))[1])
    rc = run_config(shared_data, **{"train.gradient-checkpointing": "auto", "federation.rounds": 1,
                                    "federation.clients-per-round": 3})
    settings = AppSettings.from_run_config(rc)
    assert settings.experiment_config().train.gradient_checkpointing == "auto"
    run_experiment(settings.experiment_config(), tmp_path / "inprocess")
    in_process = len(trained_with)
    run_federated(LocalGrid(client_app, node_configs(PARTITIONS), rc), settings, tmp_path / "flower")
    ra, rb = rounds_of(tmp_path / "inprocess"), rounds_of(tmp_path / "flower")
    flags = [[(c["client_id"], c["gradient_checkpointing"], c["num_experts"], c["predicted_memory_bytes"])
              for c in r["clients"]] for r in ra]
    assert flags == [[(c["client_id"], c["gradient_checkpointing"], c["num_experts"], c["predicted_memory_bytes"])
                      for c in r["clients"]] for r in rb]
    chosen = sum(c[1] for r in flags for c in r)
    assert chosen >= 1 and in_process == chosen and len(trained_with) == 2 * chosen, (flags, trained_with)
