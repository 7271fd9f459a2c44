"""The four FL settings on the real shared data (docs/algorithms.md §5) and their samplers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedmoe.config import load_config
from fedmoe.data.describe import describe, describe_command
from fedmoe.data.samplers import EnforcedSampler, UniformSampler, make_sampler
from fedmoe.data.settings import Federation, build_federation, resolve_setting
from fedmoe.engine.budget import attach_budgets
from fedmoe.errors import ConfigError, DataError

from .conftest import PRESETS, clear_caches, real_config


@pytest.fixture(scope="module")
def feds(real_data: Path) -> dict[str, Federation]:
    return {p: build_federation(real_config(real_data, f"setting.preset={p!r}")) for p in PRESETS}


def mean_tvd(fed: Federation) -> float:
    hists = np.array([c.histogram for c in fed.clients_of("tc")], dtype=float)
    glob = hists.sum(0) / hists.sum()
    return float(np.mean([0.5 * np.abs(h / h.sum() - glob).sum() for h in hists]))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_deterministic_per_seed(preset: str, feds: dict[str, Federation], real_data: Path) -> None:
    fed = feds[preset]
    assert [c.task for c in fed.clients].count("tc") == 10 and len(fed.clients) == 30
    again = build_federation(real_config(real_data, f"setting.preset={preset!r}"))
    assert again.fingerprints() == fed.fingerprints()
    other = build_federation(real_config(real_data, f"setting.preset={preset!r}", "seed=1"))
    differ = sum(
        a != b for a, b in zip(fed.fingerprints().values(), other.fingerprints().values(), strict=True)
    )
    assert differ >= 27
    for c in fed.clients:
        assert min(len(c.train), len(c.val), len(c.test)) >= 2
        ids = [e.id for s in (c.train, c.val, c.test) for e in s]
        assert len(set(ids)) == len(ids)
    everything = [e.id for c in fed.clients for s in (c.train, c.val, c.test) for e in s]
    assert len(everything) == len(set(everything)) == 6581 + 8807 + 2410 - 1  # one empty XSum document dropped


@pytest.mark.slow
def test_td_deterministic_from_cold_caches(feds: dict[str, Federation], real_data: Path) -> None:
    clear_caches()
    again = build_federation(real_config(real_data, "setting.preset='standard-hetero-td'"))
    assert again.fingerprints() == feds["standard-hetero-td"].fingerprints()


def test_label_skew(feds: dict[str, Federation]) -> None:
    for preset, fed in feds.items():
        tvd = mean_tvd(fed)
        assert (tvd >= 0.3) if preset.endswith("-td") else (tvd <= 0.1), (preset, tvd)
    rc = feds["enforced-hetero-td"].clients_of("rc")
    assert all(c.histogram_kind == "cluster" and len(c.histogram) == 5 for c in rc)


def test_samplers(feds: dict[str, Federation]) -> None:
    std, enf = feds["standard-hetero-t"], feds["enforced-hetero-td"]
    task_of = {c.client_id: c.task for c in enf.clients}
    seen = set()
    for r in range(300):
        picks = std.sample_clients(r)
        assert len(picks) == len(set(picks)) == 5
        trio = enf.sample_clients(r)
        assert len(trio) == 3 and sorted(task_of[c] for c in trio) == ["rc", "tc", "ts"]
        seen.update(trio)
    assert seen == set(range(30))
    assert std.sample_clients(7) == std.sample_clients(7)
    assert [std.sample_clients(r) for r in range(5)] != [std.sample_clients(r) for r in range(5, 10)]
    rng = np.random.default_rng(0)
    assert len(enf.sampler.sample_clients(0, rng)) == 3


def test_sampler_errors() -> None:
    with pytest.raises(ConfigError, match="3 different task types"):
        EnforcedSampler(((0, "tc"), (1, "rc"), (2, "tc")))
    with pytest.raises(ConfigError, match="clients_per_round=6"):
        UniformSampler((0, 1, 2), 6)
    with pytest.raises(ConfigError):
        make_sampler("random", [(0, "tc")], 1, 0)
    four = make_sampler("enforced", [(i, t) for i, t in enumerate(["tc", "rc", "ts", "xx"] * 2)], 5, 0)
    assert all(len({t for c, t in four.client_tasks if c in four.sample_clients(r)}) == 3 for r in range(50))


def test_overrides_and_bad_presets() -> None:
    assert resolve_setting(load_config(None, ["setting.preset='enforced-hetero-t'"]).setting) == (
        "enforced",
        "iid",
    )
    cfg = load_config(
        None,
        ["setting.preset='enforced-hetero-t'", "setting.sampler='uniform'", "setting.partition='dirichlet'"],
    )
    assert resolve_setting(cfg.setting) == ("uniform", "dirichlet")
    with pytest.raises(ConfigError, match="did you mean `standard-hetero-td`"):
        resolve_setting(load_config(None, ["setting.preset='standard-hetero-tdd'"]).setting)
    with pytest.raises(ConfigError):
        resolve_setting(load_config(None, ["setting.partition='pathological'"]).setting)


def test_enforced_with_two_tasks_fails(real_data: Path) -> None:
    cfg = real_config(
        real_data,
        "setting.preset='enforced-hetero-t'",
        'data.tasks=["tc", "ts"]',
        "data.max_examples_per_task=200",
    )
    with pytest.raises(ConfigError, match="3 different task types"):
        build_federation(cfg)


def test_small_cap_and_too_small(real_data: Path) -> None:
    fed = build_federation(
        real_config(real_data, "setting.preset='standard-hetero-td'", "data.max_examples_per_task=120")
    )
    assert [sum(c.num_examples for c in fed.clients_of(t)) for t in ("tc", "rc", "ts")] == [120, 120, 120]
    assert all(min(len(c.train), len(c.val), len(c.test)) >= 2 for c in fed.clients)
    with pytest.raises(DataError, match="fewer than 6 for each of its 10 clients"):
        build_federation(real_config(real_data, "data.max_examples_per_task=50"))


def test_describe_table(
    feds: dict[str, Federation], real_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = real_config(real_data, "setting.preset='enforced-hetero-td'")
    fed = feds["enforced-hetero-td"]
    budgets = fed.assign_budgets(10 * 2**30, 0.45, 0.75)
    assert [c.budget_bytes for c in fed.clients] == budgets
    assert all(0.45 * 10 * 2**30 <= b <= 0.75 * 10 * 2**30 for b in budgets)
    table = describe(cfg, fed)
    assert table.row_count == 30 + 3 + 1
    assert any("GiB" in str(cell) for cell in table.columns[-1].cells)
    describe_command(None, [f"data.data_dir={str(real_data)!r}", "data.max_examples_per_task=200"], attach_budgets)
    out = capsys.readouterr().out
    assert (
        "Federation: 30 clients" in out
        and "total" in out
        and "GiB" not in out
        and "World, Sports, Business, Sci/Tech" in out
    )
    assert "ts: 1 unusable records dropped (empty document or summary)" in " ".join(out.split())


# cold caches: TD presets re-embed and cluster SQuAD and XSum (~5-10 s on 2 CPU cores) -> slow
@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.slow) if p.endswith("-td") else p for p in PRESETS]
)
def test_describe_each_preset_within_30s(
    preset: str, real_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clear_caches()
    start = time.perf_counter()
    describe_command(None, [f"data.data_dir={str(real_data)!r}", f"setting.preset={preset!r}"], attach_budgets)
    elapsed = time.perf_counter() - start
    assert "Federation: 30 clients" in capsys.readouterr().out
    assert elapsed < 30, f"describe took {elapsed:.1f} s"


def test_describe_budgets_are_the_runs_budgets(real_data: Path, tmp_path: Path) -> None:
    """`data describe` (weight-free model) shows exactly the budgets a run gives its clients."""
    from fedmoe.config import load_config
    from fedmoe.engine.run import Run
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.data_dir={str(real_data)!r}", "data.max_examples_per_task=36"])
    fed = build_federation(cfg)
    full = attach_budgets(cfg, fed)
    run = Run(cfg, tmp_path)
    assert {c.client_id: c.budget_bytes for c in fed.clients} == {c.client_id: c.budget_bytes for c in run.fed.clients}
    assert all(c.budget_bytes and c.budget_bytes > 0 for c in fed.clients)
    assert full == run.plan.full_bytes
