"""Run folders written before `fedmoe.rounds` & co. moved to `[federation]` still work:
`fedmoe run --resume`, `fedmoe export` and `fedmoe report` read them, and the resumed run
ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedmoe.cli import app
from tests.conftest import REPO

#: new key → where it lived before the move (written out here, independently of fedmoe.config_keys)
NEW_TO_OLD = {"federation.rounds": "fedmoe.rounds", "federation.clients_per_round": "setting.clients_per_round",
              "federation.exclude_unfit": "fedmoe.exclude_unfit"}


def _old_toml(path) -> None:
    """Rewrite a run's ``config.toml`` the way the code before the move wrote it."""
    data = tomllib.loads(path.read_text())
    fed = data.pop("federation")
    for new, old in NEW_TO_OLD.items():
        sec, key = old.split(".")
        data[sec][key] = fed[new.split(".")[1]]

    def fmt(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"{k} = {fmt(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for sec, table in data.items():
        if isinstance(table, dict):
            lines += [f"\n[{sec}]"] + [f"{k} = {fmt(v) if not isinstance(v, dict) else _inline(v)}"
                                       for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def _inline(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


def _old_manifest(path) -> None:
    m = json.loads(path.read_text())
    m["config"] = {NEW_TO_OLD.get(k, k): v for k, v in m["config"].items()}
    path.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    out = tmp_path_factory.mktemp("old") / "run"
    sets = [f'data.data_dir="{SHARED_DATA}"', 'data.tasks=["tc"]', "data.max_examples_per_task=24",
            "setting.num_clients=3", "federation.clients_per_round=2", "federation.rounds=2", "algorithm=fedavg",
            "train.max_local_steps=1", "engine.measure_memory=false"]
    res = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    return out


def test_old_folder_resumes_bit_identically_and_exports_and_reports(finished, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    _old_toml(old / "config.toml")
    assert "[federation]" not in (old / "config.toml").read_text()
    assert tomllib.loads((old / "config.toml").read_text())["fedmoe"]["rounds"] == 2
    for m in old.glob("checkpoints/*/manifest.json"):
        _old_manifest(m)
    # interrupted after round 0: the last checkpoint and the final outputs gone
    shutil.rmtree(old / "checkpoints" / "round-00001")
    (old / "checkpoints" / "LATEST").write_text("round-00000")
    for name in ("summary.json", "expert_map.json", "p_by_task.json", "global_trainable.safetensors",
                 "predictions.jsonl"):
        (old / name).unlink(missing_ok=True)
    lines = (old / "rounds.jsonl").read_text().splitlines()
    (old / "rounds.jsonl").write_text(lines[0] + "\n")

    res = CliRunner().invoke(app, ["run", "--resume", str(old)])
    assert res.exit_code == 0, res.output
    a = load_file(str(finished / "global_trainable.safetensors"))
    b = load_file(str(old / "global_trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in json.loads(x).items() if k != "wall_time_s"} for x in
             (finished / "rounds.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "wall_time_s"} for x in
                     (old / "rounds.jsonl").read_text().splitlines()]

    # a finished old folder: export and report read it
    done = tmp_path / "done"
    shutil.copytree(finished, done)
    _old_toml(done / "config.toml")
    res = CliRunner().invoke(app, ["export", str(done), "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x" / "adapter").is_dir()
    res = CliRunner().invoke(app, ["report", str(done), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").is_file()


def test_old_key_in_an_override_on_resume_is_one_line(finished, tmp_path):
    res = CliRunner().invoke(app, ["run", "--resume", str(finished), "--set", "fedmoe.rounds=3"])
    assert res.exit_code == 2
    assert "fedmoe.rounds moved to federation.rounds" in " ".join(res.output.split())
