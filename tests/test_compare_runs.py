"""scripts/compare_runs.py: identical run folders compare equal; each kind of change is found."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_SPEC = importlib.util.spec_from_file_location(
    "compare_runs", Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_runs)


def _run_dir(root: Path, wall: float = 1.0) -> Path:
    root.mkdir(parents=True)
    rounds = [{"round": r, "clients": [{"client_id": 1, "loss": 0.5 + r}], "wall_time_s": wall * r} for r in range(2)]
    (root / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rounds))
    (root / "summary.json").write_text(json.dumps({"scores": {"tc": {"accuracy": 0.25}}, "wall_time_s": wall}))
    (root / "config.toml").write_text('seed = 0\nalgorithm = "fedavg"\n')
    (root / "checkpoints" / "round-00001").mkdir(parents=True)
    state = {"items": [["rounds", [{"round": 0, "loss": 0.5, "wall_time_s": wall}]]]}  # a checkpoint's state
    (root / "checkpoints" / "round-00001" / "state.json").write_text(json.dumps(state))
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor(1.5, dtype=torch.bfloat16)},
              str(root / "checkpoints" / "round-00001" / "trainable.safetensors"))
    return root


def test_identical_up_to_wall_times(tmp_path):
    a, b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b", wall=7.0)
    assert compare_runs.compare_runs(a, b) == []
    assert compare_runs.main([str(a), str(b)]) == 0


def test_every_kind_of_difference_is_reported(tmp_path):
    a = _run_dir(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ckpt = b / "checkpoints" / "round-00001" / "trainable.safetensors"
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    x[1, 2] = torch.nextafter(x[1, 2], torch.tensor(10.0))  # one ulp
    save_file({"a": x, "b": torch.tensor(1.5, dtype=torch.bfloat16)}, str(ckpt))
    lines = (b / "rounds.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["clients"][0]["loss"] += 1e-12
    (b / "rounds.jsonl").write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    (b / "config.toml").write_text('seed = 1\nalgorithm = "fedavg"\n')
    (b / "extra.json").write_text("{}")
    state = b / "checkpoints" / "round-00001" / "state.json"
    state.write_text(state.read_text().replace('"loss": 0.5', '"loss": 0.25'))
    diffs = compare_runs.compare_runs(a, b)
    assert diffs == [
        "extra.json: only in B",
        "checkpoints/round-00001/state.json: differs",
        "checkpoints/round-00001/trainable.safetensors: tensor a values differ",
        "config.toml: bytes differ",
        "rounds.jsonl: round record 1 differs",
    ]
    assert compare_runs.main([str(a), str(b)]) == 1
    assert compare_runs.main([str(a), str(tmp_path / "missing")]) == 2


def test_pickled_state_compared_by_content_without_unpickling(tmp_path):
    import pickle

    def write(name, state):
        d = _run_dir(tmp_path / name)
        (d / "checkpoints" / "round-00001" / "state.pkl").write_bytes(pickle.dumps(state, protocol=4))
        return d

    x, y = torch.arange(4.0), torch.ones(2, dtype=torch.bfloat16)
    a = write("a", {"rounds": [{"wall_time_s": 1.0, "loss": 0.5}], "c": {"x": x, "y": y}})
    same = write("same", {"rounds": [{"wall_time_s": 9.0, "loss": 0.5}], "c": {"x": x.clone(), "y": y.clone()}})
    order = write("order", {"rounds": [{"wall_time_s": 1.0, "loss": 0.5}], "c": {"y": y, "x": x}})
    value = write("value", {"rounds": [{"wall_time_s": 1.0, "loss": 0.5}], "c": {"x": x + 1, "y": y}})
    assert compare_runs.compare_runs(a, same) == []
    notes = compare_runs.compare_runs(a, order)
    assert len(notes) == 1 and notes[0].startswith(compare_runs.NOTE) and compare_runs.main([str(a), str(order)]) == 0
    assert compare_runs.compare_runs(a, value) == ["checkpoints/round-00001/state.pkl: pickled state differs"]


def test_config_with_moved_keys_is_a_note_not_a_difference(tmp_path):
    """A run written before `fedmoe.rounds` moved to `federation.rounds` compares equal to one written after."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "config.toml").write_text("seed = 0\n\n[setting]\nclients_per_round = 3\n\n[fedmoe]\nrounds = 2\nalpha = 1.0\n")
    (b / "config.toml").write_text("seed = 0\n\n[fedmoe]\nalpha = 1.0\n\n[federation]\nrounds = 2\nclients_per_round = 3\n")
    (a / "manifest.json").write_text(json.dumps({"config": {"fedmoe.rounds": 2}, "files": {"x": "1"}}))
    (b / "manifest.json").write_text(json.dumps({"config": {"federation.rounds": 2}, "files": {"x": "2"}}))
    lines = compare_runs.compare_runs(a, b)
    assert len(lines) == 1 and lines[0].startswith(compare_runs.NOTE + "config.toml: same config")
    assert compare_runs.main([str(a), str(b)]) == 0
    (b / "config.toml").write_text("seed = 0\n\n[fedmoe]\nalpha = 1.0\n\n[federation]\nrounds = 3\nclients_per_round = 3\n")
    (b / "manifest.json").write_text(json.dumps({"config": {"federation.rounds": 3}}))
    assert compare_runs.compare_runs(a, b) == ["config.toml: bytes differ", "manifest.json: differs"]


def test_checkpoint_state_compared_through_its_tensors_dict_order_is_a_note(tmp_path):
    """state.json + state.safetensors: tensor names follow encoding order; values are what count."""
    from fedmoe.engine.safe_state import encode

    x, y = torch.arange(4.0), torch.ones(2, 3)

    def write(name, state):
        d = tmp_path / name / "checkpoints" / "round-00000"
        d.mkdir(parents=True)
        tree, tensors = encode(state)
        (d / "state.json").write_text(json.dumps(tree))
        save_file(tensors, str(d / "state.safetensors"))
        return tmp_path / name

    a = write("a", {"round": 0, "variates": {1: {"x": x, "y": y}}, "wall_time_s": 1.0})
    same = write("same", {"round": 0, "variates": {1: {"x": x.clone(), "y": y.clone()}}, "wall_time_s": 2.0})
    order = write("order", {"round": 0, "variates": {1: {"y": y, "x": x}}, "wall_time_s": 1.0})
    value = write("value", {"round": 0, "variates": {1: {"x": x, "y": y + 1}}, "wall_time_s": 1.0})
    assert compare_runs.compare_runs(a, same) == []
    rel = "checkpoints/round-00000/state.json"
    assert compare_runs.compare_runs(a, order) == [
        f"{compare_runs.NOTE}{rel}: same entries in another order (dicts filled from safetensors bytes follow its hash map)"]
    assert compare_runs.compare_runs(a, value) == [f"{rel}: differs"]
