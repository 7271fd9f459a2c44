"""Integration: HFedMoE (docs/algorithms.md §3) and FLEx (§4) on the in-process engine, tiny model, real data.

Fast: one 2-round run of each on standard-hetero-t. Slow: every setting preset, and resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmoe.algorithms.flex import is_personal
from fedmoe.algorithms.hfedmoe import compute_budget
from fedmoe.config import load_config
from fedmoe.data.settings import build_federation
from fedmoe.engine.budget import client_batch_shapes, plan_memory
from fedmoe.engine.payload import to_bytes
from fedmoe.engine.run import Run, run_experiment
from fedmoe.engine.strategies.flex import CHOICE_KEY, FlexClientTrainables
from fedmoe.engine.trainables import _other_heads
from fedmoe.moe.graft import side_parameters
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import extract
from fedmoe.train.batching import model_kind
from tests.conftest import REPO, SHARED_DATA

PRESETS = ["standard-hetero-t", "standard-hetero-td", "enforced-hetero-t", "enforced-hetero-td"]
TASKS = {"tc", "rc", "ts"}


def _cfg(algorithm: str, preset: str = "standard-hetero-t", *extra: str):
    return load_config(REPO / "configs" / "tiny.toml", [
        f'data.data_dir="{SHARED_DATA}"', "data.max_examples_per_task=36", "setting.num_clients=6",
        "federation.rounds=2", "train.max_local_steps=1", "engine.measure_memory=false", f"algorithm={algorithm}",
        f'setting.preset="{preset}"', *extra,
    ])


def _outputs(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((out / "summary.json").read_text())
    return summary, [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _run(tmp_path_factory, algorithm: str, preset: str = "standard-hetero-t") -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    out = tmp_path_factory.mktemp(f"{algorithm}-{preset}")
    run_experiment(_cfg(algorithm, preset), out)
    return out


@pytest.fixture(scope="module")
def flex_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "flex")


@pytest.fixture(scope="module")
def hfedmoe_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "hfedmoe")


def _newest_side(folder: Path) -> tuple[dict[str, torch.Tensor], list[int]]:
    path = sorted(folder.glob("side-r*.safetensors"))[-1]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), json.loads(meta["personal_experts"])


# -- shared checks (also used by the slow preset grid) --------------------------------------------
def _check_complete(out: Path, algorithm: str, rounds: int = 2) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary, recs = _outputs(out)
    assert summary["algorithm"] == algorithm and summary["rounds"] == rounds == len(recs)
    assert set(summary["scores"]) == TASKS
    assert "accuracy" in summary["scores"]["tc"] and "f1" in summary["scores"]["rc"]
    assert "rouge2" in summary["scores"]["ts"]
    for key in ("bytes_down", "bytes_up", "bytes_down_base"):
        assert summary[key] == sum(r[key] for r in recs) > 0
        for r in recs:
            assert r[key] == sum(c[key] for c in r["clients"])
    assert all(r["clients"] for r in recs)
    return summary, recs


def _check_flex(out: Path) -> None:
    summary, recs = _outputs(out)
    glob = load_file(str(out / "global_trainable.safetensors"))
    assert glob and not any(is_personal(k) for k in glob)
    assert all("lora_" in k or "head" in k for k in glob)  # attention adapters (+ heads): nothing of the MoE
    assert not any(".experts." in k or "router" in k or ".gate." in k for k in glob)
    after_round0 = load_file(str(out / "checkpoints" / "round-00000" / "trainable.safetensors"))
    assert after_round0.keys() == glob.keys()
    assert any(not torch.equal(after_round0[k], glob[k]) for k in glob)  # the shared tensors are aggregated
    participants = sorted({c["client_id"] for r in recs for c in r["clients"]})
    sides = {cid: _newest_side(out / "clients" / str(cid)) for cid in participants}
    assert set(sides) == {int(p.name) for p in (out / "clients").iterdir()}
    for a in participants:
        for b in participants:
            if a < b:
                sa, sb = sides[a][0], sides[b][0]
                assert sa.keys() == sb.keys() and all(is_personal(k) for k in sa)
                assert any(not torch.equal(sa[k], sb[k]) for k in sa), (a, b)
    assert summary["flex_personal_experts"] == {str(c): sides[c][1] for c in participants}


def _check_hfedmoe(out: Path) -> None:
    summary, recs = _outputs(out)
    cfg = _cfg("hfedmoe")
    model, family, tok = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
    shapes = client_batch_shapes(cfg, build_federation(cfg), model_kind(family.name), tok)  # each client's own batch
    table = plan_memory(model, family, cfg, list(range(cfg.setting.num_clients)), shapes).table
    budgets = {cid: compute_budget(table.budgets[cid], *table.costs(False, cid)) for cid in table.budgets}
    assert summary["hfedmoe_budgets"] == {str(k): v for k, v in budgets.items()}
    assert min(budgets.values()) < max(b.num_experts for b in family.blocks(model))  # the budget binds somewhere
    for r in recs:
        selects = {a["client_id"]: a for a in r["actions"] if a["kind"] == "select"}
        assert set(selects) == {c["client_id"] for c in r["clients"]}
        for c in r["clients"]:
            sets = selects[c["client_id"]]["experts"]
            assert selects[c["client_id"]]["C_k"] == budgets[c["client_id"]]
            assert all(1 <= len(ids) <= budgets[c["client_id"]] for ids in sets)
            assert c["num_experts"] == sum(len(ids) for ids in sets)
            assert c["predicted_memory_bytes"] <= c["budget_bytes"]
    for cid, sets in json.loads((out / "expert_map.json").read_text()).items():
        assert all(1 <= len(ids) <= budgets[int(cid)] for ids in sets)


# -- fast ------------------------------------------------------------------------------------------
def test_flex_run_completes(flex_run):
    summary, _ = _check_complete(flex_run, "flex")
    assert summary["experts_end"] == summary["experts_start"]  # the whole MoE on every client


def test_flex_global_state_has_no_side_experts_and_personal_experts_differ(flex_run):
    _check_flex(flex_run)


def test_flex_uploads_only_shared_tensors(flex_run):
    summary, recs = _outputs(flex_run)
    glob = load_file(str(flex_run / "global_trainable.safetensors"))
    seen: set[int] = set()
    for r in recs:
        for c in r["clients"]:
            shared = len(to_bytes({k: v for k, v in glob.items() if not _other_heads(k, c["task"])}))
            expected_up = shared
            if c["client_id"] not in seen:  # e* goes up once, on the first participation
                e_star = summary["flex_personal_experts"][str(c["client_id"])]
                expected_up += len(to_bytes({CHOICE_KEY: torch.tensor(e_star, dtype=torch.int64)}))
            assert c["bytes_up"] == expected_up
            assert c["bytes_down"] == shared
            side = (flex_run / "clients" / str(c["client_id"])).glob("side-r*.safetensors")
            assert sum(p.stat().st_size for p in side) > 0  # the personal tensors stayed on the client
            assert c["bytes_down_base"] > 0 if c["client_id"] not in seen else c["bytes_down_base"] == 0
            seen.add(c["client_id"])


def test_flex_client_restores_its_side_experts(flex_run):
    """A client's next model (here: its final evaluation model) carries its persisted side tensors."""
    cfg = _cfg("flex")
    run = Run(cfg, flex_run / "restore")
    cid = int(sorted((flex_run / "clients").iterdir())[0].name)
    saved, chosen = _newest_side(flex_run / "clients" / str(cid))
    tr = run.strategy.client_trainables(run, cid, None)
    assert isinstance(tr, FlexClientTrainables)
    tr.folder = flex_run / "clients" / str(cid)
    sub = extract(run.base, run.strategy.full, run.family)
    model = tr.wrap(sub)
    tr.load(model, tr.for_client(model, sub.expert_map, run.clients[cid].task))
    live = {k.removeprefix("base_model.model."): p for k, p in side_parameters(model).items()}
    assert live.keys() == saved.keys()
    for k in live:
        assert torch.equal(live[k].detach(), saved[k]), k
    blocks = run.family.blocks(model.base_model.model)
    assert [model.base_model.model.get_submodule(b.path).side_expert.source_expert for b in blocks] == chosen


def test_hfedmoe_run_completes(hfedmoe_run):
    summary, recs = _check_complete(hfedmoe_run, "hfedmoe")
    for r in recs:
        for c in r["clients"]:
            assert c["bytes_up"] > 0 and c["bytes_down"] > 0


def test_hfedmoe_trained_sets_within_budget(hfedmoe_run):
    _check_hfedmoe(hfedmoe_run)


def test_hfedmoe_sets_come_from_the_selection_pass(hfedmoe_run):
    """The first round's sets are exactly select_active over the IB scores of the initial global model."""
    from fedmoe.algorithms.hfedmoe import select_active
    from fedmoe.engine.strategies.hfedmoe import routing_pass

    _, recs = _outputs(hfedmoe_run)
    run = Run(_cfg("hfedmoe"), hfedmoe_run / "replay")
    scorer, expert_map = run.strategy._scorer(run)
    first = {a["client_id"]: a["experts"] for a in recs[0]["actions"] if a["kind"] == "select"}
    for cid, sets in first.items():
        run.trainables.load(scorer, run.trainables.for_client(scorer, expert_map, run.clients[cid].task))
        stats = routing_pass(scorer, run, run.clients[cid], 0)
        expected = [select_active(st.ib_score(0.5, 0.1)[1], st.used(), run.strategy.state.budgets[cid])
                    for st in stats]
        assert sets == expected
        assert all(np.isfinite(st.ib_score()[1]).all() for st in stats)


# -- slow ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hfedmoe", "flex"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset(tmp_path_factory, algorithm: str, preset: str):
    out = _run(tmp_path_factory, algorithm, preset)
    _check_complete(out, algorithm)
    (_check_flex if algorithm == "flex" else _check_hfedmoe)(out)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hfedmoe", "flex"])
def test_resume_replays_exactly(tmp_path, shared_data, algorithm: str):
    """Resume from the checkpoint of round 1 of a finished 3-round run: same summary and tensors.

    FLEx's round-2 personal files are still on disk (as after a crash late in round 2); the replay
    must restore the round-1 ones."""
    ref = tmp_path / "ref"
    cfg = _cfg(algorithm, "standard-hetero-t", "federation.rounds=3")
    a = run_experiment(cfg, ref)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "LATEST").write_text("round-00001")
    (resumed / "summary.json").unlink()
    b = run_experiment(cfg, resumed, resume=True)
    a.pop("wall_time_s")
    b.pop("wall_time_s")
    assert a == b
    ta, tb = load_file(str(ref / "global_trainable.safetensors")), load_file(str(resumed / "global_trainable.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _side_oracle(cfg) -> float:
    """FLEx's side experts of tiny-mixtral (fp32, CPU AdamW), written from its config alone: per layer one
    expert (gate/up [2I, H] + down [H, I]) and the gate (H + 1), each held as weight, gradient and two
    Adam states, times the runtime slack."""
    from fedmoe.engine.budget import RUNTIME_SLACK

    c = load_model(cfg.model.name, seed=0)[0].config
    h, i = c.hidden_size, c.intermediate_size
    per_layer = (2 * i * h + h * i + h + 1) * 4 * 4
    return RUNTIME_SLACK * per_layer * c.num_hidden_layers


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real data not found")
def test_flex_says_up_front_which_budgets_cannot_hold_its_model(tmp_path):
    from fedmoe.errors import DataNotice

    cfg = _cfg("flex")
    with pytest.warns(DataNotice, match=r"FLEx does not enforce memory budgets") as notes:
        run = Run(cfg, tmp_path)
    t, side = run.plan.table, _side_oracle(cfg)
    assert run.strategy.extra_training_bytes(0) == pytest.approx(side, rel=1e-12)
    short = sorted(c for c in run.clients if t.budgets[c] < t.full_bytes(c) + side)
    assert short  # this configuration's budgets (u from 0.3) include some below the whole MoE
    text = str(next(n.message for n in notes if "FLEx" in str(n.message)))
    assert f"{len(short)} of {len(run.clients)} clients ({', '.join(map(str, short))})" in text


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real data not found")
def test_flex_num_experts_auto_keeps_every_measured_turn_within_its_budget(tmp_path):
    """flex.num_experts = -1: the clients hold the largest smaller MoE whose price + side experts fits every
    budget (as the baselines'); each turn is priced at that + the side experts, and measures within its budget."""
    cfg = _cfg("flex", "standard-hetero-t", "engine.measure_memory=true", "flex.num_experts=-1", "setting.budget_high=0.9")
    ref = Run(load_config(REPO / "configs" / "tiny.toml", [f'data.data_dir="{SHARED_DATA}"', "data.max_examples_per_task=36",
                                                           "setting.num_clients=6", "setting.budget_high=0.9"]), tmp_path / "ref")
    t, side = ref.plan.table, _side_oracle(cfg)
    fits = [n for n in range(max(ref.plan.num_experts), 0, -1)
            if all(ref.plan.submodel_bytes([list(range(n))] * len(ref.plan.num_experts), client=c) + side <= t.budgets[c]
                   for c in t.budgets)]
    n = fits[0]
    assert n < max(ref.plan.num_experts)  # the budgets bind: the whole MoE does not fit everyone
    run_experiment(cfg, tmp_path / "run")
    summary, rounds = _outputs(tmp_path / "run")
    assert summary["flex_num_experts"] == [n] * len(ref.plan.num_experts) and summary["excluded"] == {}
    assert summary["over_budget_turns"] == 0
    turns = [c for r in rounds for c in r["clients"]]
    assert turns and all(not c["error"] for c in turns)
    for c in turns:
        price = ref.plan.submodel_bytes([list(range(n))] * len(ref.plan.num_experts), client=c["client_id"]) + side
        assert c["predicted_memory_bytes"] == int(price)
        assert c["num_experts"] == n * len(ref.plan.num_experts)
        assert 0 < c["peak_memory_bytes"] <= c["budget_bytes"]
