"""``fedmoe inspect`` on a folder written by ``save_sub_moe`` (issue 14)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fedmoe.cli import app
from fedmoe.moe.models import build_tiny, load_model
from fedmoe.moe.slicing import MAP_FILE, extract, save_sub_moe


@pytest.mark.parametrize(("name", "kept"), [("tiny-mixtral", [[0, 2, 5], [4]]),
                                             ("tiny-switch-transformers", [[1, 3], [0, 1, 2]])])
def test_inspect_reads_per_layer_expert_counts(name, kept, tmp_path):
    model = build_tiny(name)
    d = save_sub_moe(extract(model, kept), tmp_path / "sub")
    result = CliRunner().invoke(app, ["inspect", str(d)])
    assert result.exit_code == 0, result.output
    counts = [int(m.group(1)) for m in re.finditer(r"^│ \d+\s+│[^│]*│ (\d+)\s+│", result.output, re.M)]
    assert counts == [len(k) for k in kept]
    assert "kept global experts" in result.output
    assert " ".join(result.output.split()).count(f"layer 1: {kept[1]}") == 1
    loaded, family, _ = load_model(str(d))  # the same loader `fedmoe run` uses
    assert [b.num_experts for b in family.blocks(loaded)] == [len(k) for k in kept]


def test_broken_sub_moe_is_one_line_exit_2(tmp_path):
    d = save_sub_moe(extract(build_tiny("tiny-mixtral"), [[0, 1], [2, 3]]), tmp_path / "sub")
    (d / MAP_FILE).write_text('{"family": "mixtral", "global_num_experts": [6, 6], "kept": [[0, 1, 2], [2]]}')
    result = CliRunner().invoke(app, ["inspect", str(d)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith(f"error: {d} holds {MAP_FILE} but is not a readable sub-MoE") and "Traceback" not in text
    assert "save_sub_moe" in text
