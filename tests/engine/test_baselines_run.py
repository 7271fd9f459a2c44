"""Integration: the dense-sharing baselines (FedAvg, FedProx, SCAFFOLD) on the tiny model and real data,
and ``fedmoe run`` for every algorithm on every setting preset (docs/algorithms.md §2, §5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.engine.budget import BatchShape, plan_memory
from fedmoe.engine.run import Run, run_experiment
from fedmoe.engine.strategies.baselines import resolve_num_experts
from fedmoe.errors import BudgetError
from tests.conftest import REPO, SHARED_DATA

# TC only (classification: fast evaluation), 2 rounds × 2 local steps so that FedProx's term and
# SCAFFOLD's variates act on weights that have moved.
SMALL = [
    'data.tasks=["tc"]', "data.max_examples_per_task=36", "setting.num_clients=6", "federation.clients_per_round=3",
    "federation.rounds=2", "train.batch_size=1", "train.max_local_steps=2", "engine.measure_memory=false",
    "engine.checkpoint_every=0",
]


def _cfg(*extra: str):
    return load_config(REPO / "configs" / "tiny.toml", [f'data.data_dir="{SHARED_DATA}"', *SMALL, *extra])


def _drive(cfg, out: Path) -> Run:
    """All rounds of a run, without the final evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, out)
    for rnd in range(run.strategy.num_rounds()):
        run.round(run.strategy.plan(run, rnd))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    root = tmp_path_factory.mktemp("baselines")
    variants = {
        "fedavg": ["algorithm=fedavg"],
        "fedprox0": ["algorithm=fedprox", "baseline.fedprox_mu=0.0"],
        "fedprox1": ["algorithm=fedprox", "baseline.fedprox_mu=1.0"],
        "scaffold": ["algorithm=scaffold"],
    }
    return {name: _drive(_cfg(*extra), root / name) for name, extra in variants.items()}


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(runs):
    a, b = runs["fedavg"].trainables.state, runs["fedprox0"].trainables.state
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [c.loss for r in runs["fedavg"].rounds for c in r.clients] == \
           [c.loss for r in runs["fedprox0"].rounds for c in r.clients]
    # not vacuous: with μ > 0 the proximal term changes the result
    c = runs["fedprox1"].trainables.state
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_scaffold_sends_twice_fedavg_bytes_both_ways(runs):
    """Tolerance 0 bytes: Δc_k (up) and c (down) have exactly the keys, shapes and dtypes of the
    trainable tensors they travel with, so their safetensors messages have byte-identical headers
    (names, dtypes, shapes, offsets) and equal data lengths; the sampled clients are the same."""
    fa, sc = runs["fedavg"].rounds, runs["scaffold"].rounds
    assert [r.sampled for r in fa] == [r.sampled for r in sc]
    for ra, rs in zip(fa, sc, strict=True):
        for ca, cs in zip(ra.clients, rs.clients, strict=True):
            assert cs.bytes_up == 2 * ca.bytes_up > 0
            assert cs.bytes_down == 2 * ca.bytes_down > 0
            assert cs.bytes_down_base == ca.bytes_down_base
    assert sum(r.bytes_up for r in sc) == 2 * sum(r.bytes_up for r in fa)


def test_scaffold_server_variate_is_mean_of_client_variates(runs):
    run = runs["scaffold"]
    strat = run.strategy
    assert set(strat.client_variates) == {c for r in run.rounds for c in r.sampled}
    n = len(strat.members)
    moved = False
    for k, c in strat.server.c.items():
        assert strat.server.holders[k] == n  # TC only: every client holds every tensor
        mean = sum(cv[k].double() for cv in strat.client_variates.values()) / n
        torch.testing.assert_close(c.double(), mean, rtol=1e-5, atol=1e-6)
        moved |= bool(c.abs().sum() > 0)
    assert moved


def test_baselines_run_on_a_smaller_global_moe_that_fits_every_client(runs):
    run = runs["fedavg"]
    counts = run.strategy.num_experts
    assert counts == run.plan.num_experts and max(counts) < 6  # tiny-mixtral has 6 experts per layer
    assert [b.num_experts for b in run.family.blocks(run.base)] == counts
    assert {u[1] for u in run.trainables.layout.experts if u[0] == 0} == set(range(counts[0]))
    kept = [list(range(n)) for n in counts]
    for r in run.rounds:
        for c in r.clients:  # each client priced at its own batch (engine/budget.py)
            assert c.num_experts == sum(counts)
            assert c.predicted_memory_bytes == int(run.plan.submodel_bytes(kept, client=c.client_id)) <= c.budget_bytes
    # clients keep the budgets drawn for the run's model; auto = the largest n that fits them all
    big = _cfg()
    shapes = {cid: BatchShape(*s) for cid, s in _shapes(run).items()}
    full = plan_memory(*_tiny_model(big), big, sorted(run.clients), shapes)
    assert full.table.budgets == run.plan.table.budgets
    assert resolve_num_experts(full, -1) == counts
    more = [list(range(n + 1)) for n in counts]
    assert any(full.submodel_bytes(more, client=cid) > m for cid, m in full.table.budgets.items())


def _shapes(run):
    from fedmoe.engine.budget import client_batch_shapes

    return {cid: (s.rows, s.seq_len, s.target_len)
            for cid, s in client_batch_shapes(run.cfg, run.fed, run.kind, run.tokenizer).items()}


def _tiny_model(cfg):
    from fedmoe.moe.models import load_model

    model, family, _ = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
    return model, family


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real data not found")
def test_model_too_large_fails_loudly_naming_client_bytes_and_budget(tmp_path):
    with pytest.raises(BudgetError, match=r"Client \d+ cannot hold the fedavg global model .* needs \d+ training "
                                          r"bytes, its budget is \d+ bytes") as err:
        Run(_cfg("algorithm=fedavg", "baseline.num_experts=0"), tmp_path)
    assert "exclude_unfit" in str(err.value)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real data not found")
def test_exclude_unfit_skips_clients_and_records_them(tmp_path):
    run = Run(_cfg("algorithm=scaffold", "baseline.num_experts=0", "federation.exclude_unfit=true"), tmp_path)
    strat = run.strategy
    full = run.plan.table.full_bytes  # each client's price of the whole model
    assert strat.excluded and set(strat.excluded) == {c for c, b in run.plan.table.budgets.items() if b < full(c)}
    assert set(strat.final_sets(run)) == set(run.clients) - set(strat.excluded)
    assert set(strat.server.c) == set(run.trainables.state)
    skipped = {}
    for rnd in range(12):
        plan = strat.plan(run, rnd)
        assert not set(plan.sampled) & set(strat.excluded)
        skipped.update(plan.skipped)
    assert skipped and set(skipped) <= set(strat.excluded)
    assert all("needs" in why for why in skipped.values())


@pytest.mark.slow
def test_scaffold_resume_replays_exactly(tmp_path):
    """Client-held variates and the server variate survive a checkpoint/resume."""
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    ref = run_experiment(_cfg("algorithm=scaffold", "engine.checkpoint_every=1"), tmp_path / "ref")
    run_experiment(_cfg("algorithm=scaffold", "engine.checkpoint_every=1", "federation.rounds=1"), tmp_path / "cut")
    resumed = run_experiment(_cfg("algorithm=scaffold", "engine.checkpoint_every=1"), tmp_path / "cut", resume=True)
    for s in (ref, resumed):
        s.pop("wall_time_s")
    assert resumed == ref
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "global_trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "global_trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- `fedmoe run configs/tiny.toml --set algorithm=<name>` on every setting preset -----------------
ALGOS = ("fedavg", "fedprox", "scaffold", "random_moe", "fedmoe")
PRESETS = ("standard-hetero-t", "standard-hetero-td", "enforced-hetero-t", "enforced-hetero-td")
FAST = ("scaffold", "enforced-hetero-t")  # the un-marked representative; the whole grid takes minutes
GRID = [pytest.param(a, p, marks=() if (a, p) == FAST else pytest.mark.slow, id=f"{a}-{p}")
        for a in ALGOS for p in PRESETS]


@pytest.mark.parametrize(("algorithm", "preset"), GRID)
def test_cli_run_every_algorithm_on_every_preset(algorithm, preset, tmp_path, shared_data):
    from typer.testing import CliRunner

    from fedmoe.cli import app

    sets = [f'data.data_dir="{shared_data}"', f"algorithm={algorithm}", f"setting.preset={preset}",
            "data.max_examples_per_task=36", "setting.num_clients=6", "federation.rounds=1", "fedmoe.stage1_rounds=1",
            "train.max_local_steps=1", "engine.measure_memory=false"]
    out = tmp_path / "out"
    args = ["run", str(REPO / "configs" / "tiny.toml"), *[x for s in sets for x in ("--set", s)], "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert summary["algorithm"] == algorithm and summary["setting"] == preset
    assert summary["rounds"] == len(rounds)
    stages = [r["stage"] for r in rounds]
    if algorithm == "fedmoe":  # stage 1 lasts until every memory-rich client has reported (≥ stage1_rounds)
        assert stages.count(2) == 1 and stages.count(1) >= 1 and stages == sorted(stages)
    else:
        assert len(rounds) == 1
    for key in ("bytes_down", "bytes_up", "bytes_down_base"):
        assert summary[key] == sum(r[key] for r in rounds) > 0
    assert set(summary["scores"]) == {"tc", "rc", "ts"}
    if preset.startswith("enforced"):
        assert all(len({c["task"] for c in r["clients"]}) == 3 for r in rounds if r["stage"] == 2)
    if algorithm in ("fedavg", "fedprox", "scaffold"):
        n = sum(summary["baseline_num_experts"])
        assert summary["experts_end"] == {"mean": n, "min": n, "max": n}
        assert all(c["num_experts"] == n and c["predicted_memory_bytes"] <= c["budget_bytes"]
                   for r in rounds for c in r["clients"])
    if algorithm == "scaffold":
        assert all(c["bytes_up"] == c["bytes_down"] for r in rounds for c in r["clients"])
