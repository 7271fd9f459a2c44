"""A real run with memory measured: every turn's measured peak within its budget, and the
predicted price of its sub-MoE within 10 % of the measured peak (docs/memory.md).

The price assumes full-length batches (``train.batch_size`` × ``data.max_seq_len`` tokens); RC
and TS inputs are truncated to that length, so their turns are held to ±10 %. AG News (TC)
items are shorter than 96 tokens, so a TC turn's batches are too and its price is an upper
bound there (measured 20–26 % below it on minilm-moe-8e): checked as "not above it by more
than 10 %"."""

from __future__ import annotations

import json
import sys

import pytest

from fedmoe.config import load_config
from fedmoe.engine.run import run_experiment
from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM measurement needs Linux /proc")
def test_measured_peaks_within_budget_and_prediction(shared_data, tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.toml", [
        f'data.data_dir="{shared_data}"', 'model.name="minilm-moe-4e"', "data.max_examples_per_task=96",
        "setting.num_clients=3", 'setting.preset="standard-hetero-t"', "federation.clients_per_round=3",
        "fedmoe.stage1_rounds=1", "federation.rounds=1", "train.max_local_steps=3", "train.eval_batch_size=8",
        "engine.measure_memory=true",
    ])
    summary = run_experiment(cfg, tmp_path)
    turns = [c for line in (tmp_path / "rounds.jsonl").read_text().splitlines() for c in json.loads(line)["clients"]]
    assert len(turns) >= 4 and not any(c["error"] for c in turns)
    for c in turns:
        assert 0 < c["peak_memory_bytes"] <= c["budget_bytes"], c
        assert not c["over_budget"]
        assert c["peak_memory_bytes"] - c["predicted_memory_bytes"] <= 0.10 * c["peak_memory_bytes"], c
        if c["task"] != "tc":
            assert abs(c["predicted_memory_bytes"] - c["peak_memory_bytes"]) <= 0.10 * c["peak_memory_bytes"], c
    assert summary["over_budget_turns"] == 0
