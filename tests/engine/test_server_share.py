"""The server's share of a round: templates built once per expert-count shape (same results),
base-weight bytes from metadata in ``engine.wire_dtype`` (Flower: tests/flower/test_wire_records.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmoe.engine import templates
from fedmoe.engine.payload import payload_size, to_bytes, to_wire
from fedmoe.engine.run import Run, run_experiment
from fedmoe.moe.slicing import expert_map_of, extract
from tests.engine.test_run import _cfg


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_payload_size_in_wire_dtype_and_for_meta_tensors(wire):
    w = torch.arange(12.0).reshape(3, 4)
    t = {"w": w, "tied": w, "i": torch.arange(5), "h": torch.ones(2, dtype=torch.float64), "b": torch.ones(3, dtype=torch.bfloat16)}
    assert payload_size(t, wire_dtype=wire) == len(to_bytes(to_wire(t, wire)))
    meta = {**t, "x": torch.empty(7, 5, device="meta")}
    real = {**t, "x": torch.zeros(7, 5)}
    assert payload_size(meta, wire_dtype=wire) == len(to_bytes(to_wire(real, wire)))


@pytest.fixture(scope="module")
def run_bf16(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    return Run(_cfg(SHARED_DATA, **{"engine.wire_dtype": '"bf16"'}), tmp_path_factory.mktemp("run"))


def test_base_bytes_are_those_of_the_serialised_wire_payload(run_bf16):
    run = run_bf16
    kept = [[0, 2] for _ in range(len({i for i, _ in run.base_layout.experts}))]
    state, layout = run.base.state_dict(), run.base_layout
    real = {k: state[k] for k in layout.dense_keys}  # the tensors themselves, really serialised
    for i, ids in enumerate(kept):
        for g in ids:
            for n, s in enumerate(layout.experts[(i, g)] + layout.routers[(i, g)]):
                real[f"{s.key}#{g}#{n}"] = s.read(state)
    expected = len(to_bytes(to_wire(real, "bf16")))
    assert run._base_bytes(0, kept) == expected
    assert expected < 0.55 * len(to_bytes(real))  # really halved
    assert run._base_bytes(0, kept) == 0  # held already: sent once
    more = [[0, 1, 2] for _ in kept]  # only expert 1 of each layer is new
    assert 0 < run._base_bytes(0, more) < expected / 4


def test_templates_are_reused_by_expert_counts_and_share_base_storage(run_bf16):
    run = run_bf16
    n = len(run.base_layout.experts) // len({i for i, _ in run.base_layout.experts})
    layers = len({i for i, _ in run.base_layout.experts})
    cache = templates.TemplateCache(run.base, run.family)
    a = cache.get(run.trainables, [[0, 1]] * layers)
    assert cache.get(run.trainables, [[2, n - 1]] * layers) is a and cache.builds == 1  # same counts
    b = cache.get(run.trainables, [[0]] * layers)
    assert b is not a and cache.builds == 2
    base_ptrs = {v.data_ptr() for v in run.base.state_dict().values()}
    dense = [k for k in run.base_layout.dense_keys if "embed" in k]
    assert dense and all(a.base_model.model.state_dict()[k].data_ptr() in base_ptrs for k in dense)
    # the downloads shaped with a reused template equal those shaped with a fresh one
    kept = [[2, n - 1]] * layers
    fresh = run.trainables.wrap(extract(run.base, kept, run.family))
    em = expert_map_of(run.base, kept, run.family)
    x, y = run.trainables.for_client(a, em, "tc"), run.trainables.for_client(fresh, em, "tc")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_template_cache_changes_no_result(tmp_path, monkeypatch):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    cfg = _cfg(SHARED_DATA, **{"engine.checkpoint_every": 0, "fedmoe.stage1_rounds": 1, "federation.rounds": 2})
    run_experiment(cfg, tmp_path / "cached")
    monkeypatch.setattr(templates, "CAPACITY", 0)  # a fresh template every turn, as before
    run_experiment(cfg, tmp_path / "fresh")
    a, b = (load_file(str(tmp_path / d / "global_trainable.safetensors")) for d in ("cached", "fresh"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = ([json.loads(x) for x in (tmp_path / d / "rounds.jsonl").read_text().splitlines()] for d in ("cached", "fresh"))
    strip = ("wall_time_s",)
    for x, y in zip(ra, rb, strict=True):
        assert [{k: v for k, v in c.items() if k not in strip} for c in x["clients"]] == \
               [{k: v for k, v in c.items() if k not in strip} for c in y["clients"]]
