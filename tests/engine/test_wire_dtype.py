"""engine.wire_dtype: what travels each round is cast (bytes halve) and comes back as fp32."""

from __future__ import annotations

import json

import pytest
import torch

from fedmoe.config import _CHOICES
from fedmoe.engine.payload import WIRE_DTYPES, from_bytes, from_wire, to_bytes, to_wire
from fedmoe.engine.run import run_experiment
from tests.engine.test_run import _cfg


def test_wire_names_match_the_config_choices():
    assert tuple(WIRE_DTYPES) == _CHOICES["engine.wire_dtype"]


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_round_trip_casts_floats_only(wire):
    t = {"a": torch.tensor([1.0, 1 / 3, 300.25]), "i": torch.tensor([3, 4]), "h": torch.tensor([0.5], dtype=torch.float64)}
    sent = to_bytes(to_wire(t, wire))
    back = from_wire(from_bytes(sent), wire)
    assert back["a"].dtype == torch.float32 and back["i"].dtype == torch.int64 and back["h"].dtype == torch.float64
    assert torch.equal(back["a"], t["a"].to(WIRE_DTYPES[wire]).float())  # exactly the rounded values
    assert not torch.equal(back["a"], t["a"])  # 1/3 is not representable: it was really cast
    assert torch.equal(back["i"], t["i"]) and torch.equal(back["h"], t["h"])
    assert len(to_bytes(to_wire({"x": torch.zeros(1000)}, wire))) < 0.55 * len(to_bytes({"x": torch.zeros(1000)}))


@pytest.mark.slow
def test_bf16_wire_halves_round_bytes_through_the_engine(tmp_path):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    got = {}
    for wire in ("fp32", "bf16"):
        out = tmp_path / wire
        run_experiment(_cfg(SHARED_DATA, **{"algorithm": '"fedavg"', "fedmoe.stage1_rounds": 0, "federation.rounds": 1,
                                            "engine.checkpoint_every": 0, "engine.wire_dtype": f'"{wire}"'}), out)
        got[wire] = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    for key in ("bytes_down", "bytes_up"):
        a, b = sum(r[key] for r in got["fp32"]), sum(r[key] for r in got["bf16"])
        assert 0.45 * a < b < 0.55 * a, (key, a, b)
