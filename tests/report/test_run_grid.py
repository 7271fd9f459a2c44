"""benchmarks/paper/run_grid.py: the grid's cells, disjoint parts, skipping finished cells (no runs)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from fedmoe.config import load_config
from tests.conftest import REPO


@pytest.fixture(scope="module")
def rg():
    spec = importlib.util.spec_from_file_location("run_grid", REPO / "benchmarks" / "paper" / "run_grid.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_grid"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_grid_parts_are_disjoint_and_cover(rg):
    cells = rg.grid("cpu", [0, 1])
    assert len(cells) == 2 * 4 * (7 + 2)
    parts = [rg.select_part(cells, k, 5) for k in range(1, 6)]
    flat = [c for p in parts for c in p]
    assert sorted(flat, key=str) == sorted(cells, key=str) and len(set(flat)) == len(cells)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(len({c.method for c in p}) > 1 for p in parts)  # methods mixed, not one per part


@pytest.mark.parametrize("preset", ["cpu", "gpu", "standin"])
def test_every_cell_command_is_a_valid_config(rg, preset, tmp_path):
    for cell in rg.grid(preset, [0, 3]):
        cmd = rg.command(cell, tmp_path, ["train.max_local_steps=1"])
        i = cmd.index("run")
        assert cmd[i + 1] == f"benchmarks/paper/{preset}.toml"
        assert cmd[-2:] == ["--out", str(tmp_path / preset / cell.setting / cell.method / f"seed{cell.seed}")]
        sets = [cmd[j + 1] for j, a in enumerate(cmd) if a == "--set"]
        cfg = load_config(REPO / cmd[i + 1], sets)
        assert (cfg.algorithm, cfg.setting.preset, cfg.seed) == (cell.algorithm, cell.setting, cell.seed)
        assert cfg.fedmoe.stage1 == (cell.method != "fedmoe-no-stage1")
        assert cfg.fedmoe.stage2_adjust == (cell.method != "fedmoe-no-stage2")


def test_finished_cells_are_skipped(rg, tmp_path, capsys):
    cells = rg.grid("cpu", [0], settings=["enforced-hetero-t"], methods=["fedavg", "fedmoe"], ablation=False)
    done = cells[0].out_dir(tmp_path)
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    (cells[1].out_dir(tmp_path) / "checkpoints" / "round-00001").mkdir(parents=True)
    assert [rg.state(c, tmp_path) for c in cells] == ["done", "resumable"]
    assert "--resume" in rg.command(cells[1], tmp_path, [], resume=True)
    rc = rg.main(["--preset", "cpu", "--settings", "enforced-hetero-t", "--methods", "fedavg,fedmoe", "--no-ablation",
                  "--root", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 done, 1 to run" in out and "fedmoe/seed0 (resumable)" in out and "fedavg/seed0" not in out


def test_setting_major_order_interleaves_parts_by_whole_seeds(rg):
    cells = rg.grid("standin", [0, 1, 2], settings=["enforced-hetero-t", "standard-hetero-td"],
                    methods=["fedmoe", "random_moe", "fedprox"], order="setting")
    assert len(cells) == 2 * 3 * 5
    assert [(c.setting, c.seed) for c in cells[:15]] == [("enforced-hetero-t", k) for k in range(3) for _ in range(5)]
    assert [c.method for c in cells[:5]] == ["fedmoe", "random_moe", "fedprox", "fedmoe-no-stage1", "fedmoe-no-stage2"]
    p1, p2 = (rg.select_part(cells, k, 2, interleave=True) for k in (1, 2))
    assert p1 == cells[0::2] and p2 == cells[1::2] and not set(p1) & set(p2)
    # by the time both parts have run their first 5 cells, seeds 0 and 1 are complete
    assert {c.seed for c in p1[:5] + p2[:5]} == {0, 1} and len(p1[:5] + p2[:5]) == 10


def _collect_module():
    spec = importlib.util.spec_from_file_location("collect", REPO / "benchmarks" / "paper" / "collect.py")
    col = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(col)
    return col


def test_collect_keeps_only_small_outputs_of_finished_cells(tmp_path):
    col = _collect_module()
    src, dst = tmp_path / "runs", tmp_path / "docs"
    done, running = src / "enforced-hetero-t" / "fedmoe" / "seed0", src / "enforced-hetero-t" / "fedprox" / "seed0"
    for d in (done, running):
        d.mkdir(parents=True)
        for name in ("rounds.jsonl", "config.toml", "predictions.jsonl"):
            (d / name).write_text(name)
    (done / "summary.json").write_text("{}")
    (done / "checkpoints").mkdir()
    (src / "grid_log.jsonl").write_text("{}\n")
    assert col.collect(src, dst) == [dst / "enforced-hetero-t" / "fedmoe" / "seed0"]
    got = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert got == ["enforced-hetero-t/fedmoe/seed0/config.toml", "enforced-hetero-t/fedmoe/seed0/rounds.jsonl",
                   "enforced-hetero-t/fedmoe/seed0/summary.json", "grid_log.jsonl"]


def test_collect_keep_existing_adds_only_new_cells_and_appends_the_log(tmp_path):
    col = _collect_module()
    src, dst = tmp_path / "runs", tmp_path / "docs"
    old, new = src / "e" / "fedprox" / "seed1", src / "e" / "fedprox" / "seed2"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "summary.json").write_text("from the grid")
    kept = dst / "e" / "fedprox" / "seed1"
    kept.mkdir(parents=True)
    (kept / "summary.json").write_text("re-run, copied by hand")
    (src / "grid_log.jsonl").write_text('{"cell": "a"}\n{"cell": "b"}\n')
    (dst / "grid_log.jsonl").write_text('{"cell": "a"}\n{"cell": "a", "commit": "x"}\n')
    assert col.collect(src, dst, keep_existing=True) == [dst / "e" / "fedprox" / "seed2"]
    assert (kept / "summary.json").read_text() == "re-run, copied by hand"
    assert (dst / "e" / "fedprox" / "seed2" / "summary.json").read_text() == "from the grid"
    assert (dst / "grid_log.jsonl").read_text().splitlines() == ['{"cell": "a"}', '{"cell": "a", "commit": "x"}',
                                                                 '{"cell": "b"}']
    col.collect(src, dst)  # without it, everything is replaced
    assert (kept / "summary.json").read_text() == "from the grid"


def test_collect_replace_overwrites_cells_and_appends_the_log_with_the_commit(tmp_path):
    import json

    col = _collect_module()
    src, dst = tmp_path / "runs", tmp_path / "docs"
    cell = src / "e" / "fedmoe" / "seed0"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text("new α rule")
    old = dst / "e" / "fedmoe" / "seed0"
    other = dst / "e" / "fedprox" / "seed0"
    for d in (old, other):
        d.mkdir(parents=True)
        (d / "summary.json").write_text("old")
    (old / "p_by_task.json").write_text("stale")  # the new cell has none: it must not linger
    (src / "grid_log.jsonl").write_text('{"cell": "e/fedmoe/seed0", "rc": 0}\n')
    (dst / "grid_log.jsonl").write_text('{"cell": "e/fedprox/seed0", "commit": "a"}\n')
    assert col.collect(src, dst, replace=True, commit="b") == [old]
    assert (old / "summary.json").read_text() == "new α rule" and not (old / "p_by_task.json").exists()
    assert (other / "summary.json").read_text() == "old"
    lines = [json.loads(x) for x in (dst / "grid_log.jsonl").read_text().splitlines()]
    assert lines == [{"cell": "e/fedprox/seed0", "commit": "a"}, {"cell": "e/fedmoe/seed0", "rc": 0, "commit": "b"}]
    col.collect(src, dst, replace=True, commit="b")  # repeated: nothing appended twice
    assert len((dst / "grid_log.jsonl").read_text().splitlines()) == 2
    assert col.main([str(src), str(dst), "--replace", "--keep-existing"]) == 2


def test_every_log_line_names_the_commit_and_the_load(rg, tmp_path, monkeypatch):
    import json
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.setattr(rg, "command", lambda cell, root, extra, resume=False: [sys.executable, "-c", "pass"])
    rc = rg.main(["--preset", "cpu", "--settings", "enforced-hetero-t", "--methods", "fedavg", "--no-ablation",
                  "--root", str(tmp_path)])
    entry = json.loads((tmp_path / "cpu" / "grid_log.jsonl").read_text())
    assert rc == 0 and entry["rc"] == 0 and entry["cell"] == "enforced-hetero-t/fedavg/seed0"
    assert entry["commit"].split("+")[0] == head.stdout.strip()
    assert len(entry["load"].split()) == 3
