"""FedProx, SCAFFOLD, FedAvg on a smaller global MoE, and FLEx on the Flower message path
(:class:`LocalGrid`, every message through Flower's wire format): the same global weights, expert
maps, losses and scores as the in-process engine, and client state kept on the nodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmoe.algorithms.flex import is_personal
from fedmoe.engine.node_plans import SCAFFOLD_CK, DiskStore
from fedmoe.engine.run import Run, write_outputs
from fedmoe.flower import client_app as client_module
from fedmoe.flower import keys as K
from fedmoe.flower import server_app
from fedmoe.flower.client_app import app as client_app
from fedmoe.flower.local import LocalGrid, node_configs
from fedmoe.flower.server_app import run_federated
from fedmoe.flower.settings import AppSettings
from tests.conftest import REPO, SHARED_DATA

PARTITIONS = 2
#: TC only (fast evaluation); 4 clients, 3 per round: some client takes part in both rounds;
#: batch 1 × 2 steps, so FedProx's term and SCAFFOLD's variates act on weights that moved
SMALL = [
    'data.tasks=["tc"]', "data.max_examples_per_task=24", "setting.num_clients=4", "federation.clients_per_round=3",
    "federation.rounds=2", "train.batch_size=1", "train.max_local_steps=2", "engine.measure_memory=false",
    "engine.checkpoint_every=0",
]


def run_config(*extra: str) -> dict[str, str | float]:
    overrides = [f"data.data_dir={SHARED_DATA}", *SMALL, *extra]
    return {K.RUN_EXPERIMENT: str(REPO / "configs" / "tiny.toml"), K.RUN_OVERRIDES: "; ".join(overrides),
            K.RUN_ROUND_TIMEOUT: 60.0, K.RUN_DISCOVERY_TIMEOUT: 5.0}


def inprocess(settings: AppSettings, out: Path) -> Run:
    """``run_experiment`` without checkpoints, keeping the ``Run`` (its strategy state) for the checks."""
    out.mkdir(parents=True)
    (out / "rounds.jsonl").write_text("")
    run = Run(settings.experiment_config(), out)
    for rnd in range(run.strategy.num_rounds()):
        run.round(run.strategy.plan(run, rnd))
    write_outputs(run, time.perf_counter())
    return run


def pair(root: Path, *extra: str, grid_hook=None) -> tuple[Run, Path, Path]:
    """The experiment in-process and on a LocalGrid of 2 nodes with state dirs ``root/nodes/<p>``.
    ``grid_hook(grid)`` runs after every round of the Flower run (e.g. to restart nodes)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    rc = run_config(*extra)
    settings = AppSettings.from_run_config(rc)
    run = inprocess(settings, root / "inprocess")
    nodes = node_configs(PARTITIONS)
    for cfg in nodes.values():
        cfg[K.NODE_STATE_DIR] = str(root / "nodes" / str(cfg["partition-id"]))
    grid = LocalGrid(client_app, nodes, rc)
    if grid_hook is None:
        run_federated(grid, settings, root / "flower")
    else:
        with pytest.MonkeyPatch.context() as mp:
            original = server_app.maybe_checkpoint

            def after_round(run_, rnd):
                original(run_, rnd)
                grid_hook(grid)

            mp.setattr(server_app, "maybe_checkpoint", after_round)
            run_federated(grid, settings, root / "flower")
    return run, root / "inprocess", root / "flower"


def rounds_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Same global weights (≤ 1e-6), expert maps, sampled clients, losses, scores; no failures."""
    wa = load_file(str(a / "global_trainable.safetensors"))
    wb = load_file(str(b / "global_trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert json.loads((a / "expert_map.json").read_text()) == json.loads((b / "expert_map.json").read_text())
    ra, rb = rounds_of(a), rounds_of(b)
    assert [r["sampled"] for r in ra] == [r["sampled"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for ca, cb in zip(x["clients"], y["clients"], strict=True):
            assert cb["error"] == ""
            assert (ca["loss"], ca["score"], ca["steps"], ca["num_experts"]) == (
                cb["loss"], cb["score"], cb["steps"], cb["num_experts"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["scores"] == sb["scores"] and sb["failed_client_turns"] == 0
    assert sa["experts_end"] == sb["experts_end"]
    assert json.loads((a / "p_by_task.json").read_text()) == json.loads((b / "p_by_task.json").read_text())


def twice(out: Path) -> set[int]:
    """Clients that took part in both rounds."""
    r0, r1 = rounds_of(out)
    return set(r0["sampled"]) & set(r1["sampled"])


# -- FedProx / FedAvg on a smaller global MoE ---------------------------------------------------------
def test_fedprox_on_flower_matches_inprocess(tmp_path):
    run, a, b = pair(tmp_path, "algorithm=fedprox", "baseline.fedprox_mu=1.0")
    assert_same_run(a, b)
    # auto (-1): the global model keeps fewer experts than the nodes' base model (6 per layer)
    assert max(run.strategy.num_experts) < 6
    assert json.loads((b / "summary.json").read_text())["baseline_num_experts"] == run.strategy.num_experts


def test_fedavg_on_a_smaller_global_moe_on_flower_matches_inprocess(tmp_path):
    run, a, b = pair(tmp_path, "algorithm=fedavg", "baseline.num_experts=2")
    assert run.strategy.num_experts == [2] * len(run.strategy.num_experts)
    assert_same_run(a, b)
    for rec in rounds_of(b):
        assert all(c["num_experts"] == 2 * len(run.strategy.num_experts) for c in rec["clients"])


def test_flex_on_a_smaller_moe_on_flower_matches_inprocess(tmp_path):
    """flex.num_experts = n: the nodes hold the first n experts of every layer (from their base model) and the
    side experts; every turn is priced at that MoE + the side experts, on Flower as in-process."""
    run, a, b = pair(tmp_path, "algorithm=flex", "flex.num_experts=2")
    assert run.strategy.full == [[0, 1]] * len(run.strategy.full)
    assert_same_run(a, b)
    side = run.strategy.extra_training_bytes(0)
    assert side > 0
    for rec in rounds_of(b):
        for c in rec["clients"]:
            assert c["num_experts"] == 2 * len(run.strategy.full)
            assert c["predicted_memory_bytes"] == int(run.plan.submodel_bytes(run.strategy.full, client=c["client_id"]) + side)


# -- SCAFFOLD ---------------------------------------------------------------------------------------
def test_scaffold_on_flower_keeps_c_k_on_the_node(tmp_path):
    run, a, b = pair(tmp_path, "algorithm=scaffold")
    assert_same_run(a, b)
    variates = run.strategy.client_variates
    participants = {c for r in rounds_of(b) for c in r["sampled"]}
    assert set(variates) == participants and twice(b)
    for cid in participants:
        store = DiskStore(tmp_path / "nodes" / str(cid % PARTITIONS) / "run-1" / f"client-{cid}")
        assert store.path(SCAFFOLD_CK).is_file() and not store.path(SCAFFOLD_CK).with_suffix(".tmp").exists()
        on_node = store.load(SCAFFOLD_CK)
        assert on_node is not None and on_node.keys() == variates[cid].keys()
        # a client in both rounds: its c_k⁺ after round 1 depends on the c_k it stored in round 0
        for k in on_node:
            assert torch.equal(on_node[k], variates[cid][k]), (cid, k)
    assert any(bool(v.abs().sum() > 0) for cid in twice(b) for v in variates[cid].values())
    assert not list(b.rglob(f"{SCAFFOLD_CK}*"))  # never on the server


# -- FLEx ---------------------------------------------------------------------------------------------
def _restart_nodes(grid: LocalGrid) -> None:
    """Every SuperNode restarts: new node ids, the node process' in-memory state gone."""
    client_module._NODE_CACHE.clear()
    for old in sorted(grid.node_configs):
        new = old + 1000
        grid.node_configs[new] = grid.node_configs.pop(old)
        grid.states[new] = grid.states.pop(old)
        grid.answered[new] = 0


@pytest.fixture(scope="module")
def flex_pair(tmp_path_factory) -> tuple[Run, Path, Path, Path]:
    root = tmp_path_factory.mktemp("flex")
    run, a, b = pair(root, "algorithm=flex", grid_hook=_restart_nodes)
    return run, a, b, root / "nodes"


def _side_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("side-r*.safetensors"))


def test_flex_on_flower_matches_inprocess_across_node_restarts(flex_pair):
    """Nodes restart after every round; the same weights as in-process show that each client
    restored its side experts from the node's state dir (else its round-1 update would differ)."""
    _, a, b, nodes = flex_pair
    assert_same_run(a, b)
    assert twice(b)
    for cid in {c for r in rounds_of(b) for c in r["sampled"]}:
        node_dir = nodes / str(cid % PARTITIONS) / "run-1" / f"client-{cid}"
        mine, theirs = _side_files(node_dir), _side_files(a / "clients" / str(cid))
        assert [p.name for p in mine] == [p.name for p in theirs] and mine
        x, y = load_file(str(mine[-1])), load_file(str(theirs[-1]))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_flex_side_experts_stay_on_the_nodes_and_differ(flex_pair):
    _, _, b, nodes = flex_pair
    for path in b.rglob("*.safetensors"):  # the server holds no side tensor anywhere
        with safe_open(str(path), framework="pt") as f:
            assert not any(is_personal(k) for k in f.keys()), path  # noqa: SIM118
    assert not (b / "clients").exists()
    sides = {}
    for folder in nodes.glob("*/run-1/client-*"):
        sides[folder.name] = load_file(str(_side_files(folder)[-1]))
        assert sides[folder.name] and all(is_personal(k) for k in sides[folder.name])
    names = sorted(sides)
    assert len(names) >= 3
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert any(not torch.equal(sides[x][k], sides[y][k]) for k in sides[x]), (x, y)


def test_flex_uploads_only_shared_tensors(flex_pair):
    """A turn after the first sends the shared tensors only: its reply's size is their bytes plus
    Flower's per-message metadata, far below one side expert layer's bytes."""
    _, _, b, nodes = flex_pair
    shared = load_file(str(b / "global_trainable.safetensors"))
    shared_bytes = sum(t.numel() * t.element_size() for t in shared.values())
    side = load_file(str(_side_files(next(nodes.glob("*/run-1/client-*")))[-1]))
    side_bytes = sum(t.numel() * t.element_size() for t in side.values())
    r0, r1 = rounds_of(b)
    for c in r1["clients"]:
        if c["client_id"] in r0["sampled"]:  # not its first turn: no e* either
            assert shared_bytes < c["bytes_up"] < shared_bytes + 16384
            assert c["bytes_up"] - shared_bytes < side_bytes / 4


def test_disk_store_is_atomic_and_exact(tmp_path):
    store = DiskStore(tmp_path / "c")
    assert store.load("x") is None
    t = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.arange(4)}
    store.save("x", t)
    store.save("x", t)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["x.safetensors"]
    back = store.load("x")
    assert back is not None and all(torch.equal(back[k], t[k]) for k in t)


def test_flex_on_flower_writes_the_inprocess_predictions(flex_pair):
    """The nodes evaluate FLEx's clients and send their per-example rows back: the Flower run's
    predictions.jsonl has the in-process run's rows (same clients, order, fields and values)."""
    _, a, b, _ = flex_pair
    rows_a, rows_b = ([json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()] for d in (a, b))
    assert rows_b == rows_a and rows_a
    assert {r["client"] for r in rows_b} == {int(k) for k in json.loads((b / "expert_map.json").read_text())}
    assert set(rows_b[0]) == {"client", "id", "task", "prediction", "reference", "score"}


def test_evaluate_reply_rows_of_another_client_are_refused():
    from fedmoe.flower.records import parse_predictions, scores_content

    rows = [{"client": 3, "id": "x", "task": "tc", "prediction": 1, "reference": 2, "score": {"accuracy": 0.0}}]
    assert parse_predictions(scores_content(3, 1, {"accuracy": 0.0}, rows), 3) == rows
    assert parse_predictions(scores_content(3, 1, {"accuracy": 0.0}), 3) == []
    with pytest.raises(ValueError, match="client 4"):
        parse_predictions(scores_content(3, 1, {"accuracy": 0.0}, rows), 4)
