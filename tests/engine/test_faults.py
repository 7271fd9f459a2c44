"""Client faults in the in-process engine: each kind is rejected with its reason and the run finishes."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.engine.faults import (
    FAULT_KINDS,
    ClientFault,
    ClientTimeout,
    Deadline,
    check_upload,
    corrupt_upload,
    expected_upload,
    parse_faults,
)
from fedmoe.engine.run import Run, empty_streak, run_experiment
from fedmoe.engine.strategies.fedmoe import FedMoEStrategy
from fedmoe.errors import ConfigError, RunStopped
from tests.conftest import REPO

# -- pure checks ---------------------------------------------------------------------------------
PER_MODULE = {
    "m.layers.0.moe.experts.0.w1.lora_A.weight": torch.ones(2, 3),
    "m.layers.0.moe.experts.1.w1.lora_A.weight": torch.ones(2, 3),
    "m.layers.0.moe.gate.weight": torch.ones(2, 4),
}
FUSED = {"m.layers.0.mlp.experts.gate_up_proj.lora_A": torch.ones(2, 3, 4), "m.attn.q.lora_A.weight": torch.ones(4, 4)}


def test_parse_faults():
    assert parse_faults("2:1, 3:4:nan;5:0:extra_expert") == {(2, 1): "raise", (3, 4): "nan", (5, 0): "extra_expert"}
    assert parse_faults("") == {}
    for bad, match in (("2", "ROUND:CLIENT"), ("a:1", "ROUND:CLIENT"), ("1:2:melt", "melt")):
        with pytest.raises(ConfigError, match=match):
            parse_faults(bad)
    with pytest.raises(ConfigError, match="inject_faults"):
        load_config(REPO / "configs" / "tiny.toml", ['engine.inject_faults="1:x"'])


def test_check_upload_accepts_a_correct_reply_and_names_each_fault():
    want = expected_upload(PER_MODULE)
    check_upload(want, {k: v.clone() for k, v in PER_MODULE.items()}, loss=1.5)  # no exception
    cases = {
        "nan": "`m.layers.0.moe.experts.0.w1.lora_A.weight` holds NaN/Inf values",
        "inf": "`m.layers.0.moe.experts.0.w1.lora_A.weight` holds NaN/Inf values",
        "shape": "`m.layers.0.moe.experts.0.w1.lora_A.weight` has shape [3, 3], expected [2, 3]",
        "extra_expert": "1 tensor(s) it was not given, e.g. `m.layers.0.moe.experts.2.w1.lora_A.weight`",
    }
    for kind, reason in cases.items():
        bad = corrupt_upload(PER_MODULE, kind)
        with pytest.raises(ClientFault) as err:
            check_upload(want, bad)
        assert str(err.value) == f"rejected: {reason}", kind
    assert torch.equal(PER_MODULE["m.layers.0.moe.experts.0.w1.lora_A.weight"], torch.ones(2, 3))  # input kept
    with pytest.raises(ClientFault, match=r"1 tensor\(s\) missing, e.g. `m.layers.0.moe.gate.weight`"):
        check_upload(want, {k: v for k, v in PER_MODULE.items() if "gate" not in k})
    with pytest.raises(ClientFault, match="training loss is nan"):
        check_upload(want, dict(PER_MODULE), loss=float("nan"))


def test_extra_expert_on_switch_style_names():
    state = {"e.block.1.layer.1.mlp.experts.expert_0.wi.lora_A.weight": torch.ones(2, 2),
             "e.block.1.layer.1.mlp.experts.expert_1.wi.lora_A.weight": torch.ones(2, 2)}
    bad = corrupt_upload(state, "extra_expert")
    assert set(bad) - set(state) == {"e.block.1.layer.1.mlp.experts.expert_2.wi.lora_A.weight"}


def test_extra_expert_on_fused_experts_is_a_shape_fault():
    bad = corrupt_upload(FUSED, "extra_expert")
    assert bad["m.layers.0.mlp.experts.gate_up_proj.lora_A"].shape == (3, 3, 4)
    with pytest.raises(ClientFault, match=r"gate_up_proj.lora_A` has shape \[3, 3, 4\], expected \[2, 3, 4\]"):
        check_upload(expected_upload(FUSED), bad)


def test_deadline():
    d = Deadline(0.05)
    d.check()
    t0 = time.monotonic()
    with pytest.raises(ClientTimeout, match="client timeout of 0.05 s"):
        d.hang(poll=0.01)
    assert time.monotonic() - t0 >= 0.05
    Deadline(0).check()  # 0 = no limit
    with pytest.raises(ConfigError, match="client_timeout_s"):
        Deadline(0).hang()


def test_empty_streak():
    from fedmoe.engine.records import ClientRecord, RoundRecord

    def rr(*errors):
        recs = [ClientRecord(i, "tc", 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, error=e) for i, e in enumerate(errors)]
        return RoundRecord(0, 2, list(range(len(errors))), recs, 0.0)

    assert empty_streak([rr("x"), rr("", "y"), rr("a", "b"), rr("c")]) == 2
    assert empty_streak([rr("a"), rr("")]) == 0
    assert empty_streak([rr("a"), rr()]) == 0  # nobody sampled is not an empty round


# -- the engine ----------------------------------------------------------------------------------
def _cfg(shared_data, **extra):
    overrides = [
        f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", "setting.num_clients=6",
        "federation.clients_per_round=6", "fedmoe.stage1_rounds=1", "federation.rounds=2", "train.max_local_steps=1",
        "engine.measure_memory=false", "engine.checkpoint_every=1",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(REPO / "configs" / "tiny.toml", overrides)


def _rounds(out):
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_every_fault_kind_is_rejected_and_the_run_finishes(shared_data, tmp_path, monkeypatch):
    # round 1 (stage 2, all six clients sampled): every client misbehaves, one kind each →
    # nothing is aggregated and the global model stays bit-identical; round 2 is clean.
    faults = ",".join(f"1:{cid}:{kind}" for cid, kind in enumerate(FAULT_KINDS[:6]))  # reply fields: below
    cfg = _cfg(shared_data, **{"engine.inject_faults": f'"{faults}"', "engine.client_timeout_s": 30,
                               "engine.max_empty_rounds": 2})
    states, aggregated = {}, {}
    original_round = Run.round

    def spy_round(self, plan):
        before = {k: v.clone() for k, v in self.trainables.state.items()}
        rr = original_round(self, plan)
        states[plan.round] = (before, {k: v.clone() for k, v in self.trainables.state.items()})
        return rr

    original_agg = FedMoEStrategy.aggregate

    def spy_agg(self, run, plan, updates, replies):
        aggregated[plan.round] = sorted(u.client_id for u in updates)
        assert sorted(replies) == aggregated[plan.round]
        return original_agg(self, run, plan, updates, replies)

    monkeypatch.setattr(Run, "round", spy_round)
    monkeypatch.setattr(FedMoEStrategy, "aggregate", spy_agg)
    summary = run_experiment(cfg, tmp_path)
    rounds = _rounds(tmp_path)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    r1 = {c["client_id"]: c for c in rounds[1]["clients"]}
    assert sorted(r1) == list(range(6))
    reasons = {
        "raise": "InjectedFault: injected fault: the client raised after training (fault `raise`)",
        "timeout": "rejected: no reply within the client timeout of 30 s",
        "nan": "holds NaN/Inf values", "inf": "holds NaN/Inf values",
        "shape": "has shape",
        # tiny-mixtral's experts are fused ([E, …] tensors): one expert more is a shape mismatch
        "extra_expert": "mlp.experts.base_layer.lora_A.default.weight` has shape [49, 32], expected [48, 32]",
    }
    for cid, kind in enumerate(FAULT_KINDS[:6]):
        assert reasons[kind] in r1[cid]["error"], (kind, r1[cid]["error"])
    for cid in (0, 1):  # raised / hung: nothing came back
        assert r1[cid]["bytes_up"] == 0 and r1[cid]["bytes_down"] > 0
    for cid in (2, 3, 4, 5):  # a reply crossed the wire and was rejected: its bytes count
        assert r1[cid]["bytes_up"] > 0
    assert 1 not in aggregated and aggregated[2] == sorted(c["client_id"] for c in rounds[2]["clients"])
    before, after = states[1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # empty round: global model unchanged
    assert any(not torch.equal(states[2][0][k], states[2][1][k]) for k in before)  # round 2 aggregated
    assert all(c["error"] == "" for r in (rounds[0], rounds[2]) for c in r["clients"])
    assert summary["failed_client_turns"] == 6 and summary["rounds"] == 3
    log = (tmp_path / "client_errors.log").read_text()
    assert log.count("--- round 1 client") == 6 and "Traceback" in log


def test_run_stops_after_max_empty_rounds_and_keeps_its_outputs(shared_data, tmp_path):
    faults = ",".join(f"{r}:{c}" for r in (1, 2) for c in range(6))
    cfg = _cfg(shared_data, **{"engine.inject_faults": f'"{faults}"', "engine.max_empty_rounds": 2})
    with pytest.raises(RunStopped, match="Stopped after 2 consecutive rounds") as err:
        run_experiment(cfg, tmp_path)
    assert "--resume" in str(err.value) and "engine.max_empty_rounds" in str(err.value)
    assert [r["round"] for r in _rounds(tmp_path)] == [0, 1, 2]
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "checkpoints").is_dir()
    # 0 = never stop: the same faults leave the run to finish
    out = tmp_path / "never"
    summary = run_experiment(_cfg(shared_data, **{"engine.inject_faults": f'"{faults}"',
                                                  "engine.max_empty_rounds": 0}), out)
    assert summary["rounds"] == 3 and summary["failed_client_turns"] == 12


FIELD_REASONS = {
    "bad_p": "routing statistics p are not probabilities",
    "big_update": "exceeds engine.max_update_norm = 100",
}


@pytest.mark.parametrize(("algorithm", "bad_extra"), [
    ("fedmoe", "routing statistics p are not probabilities"),  # no extras: a negative p
    ("scaffold", "holds NaN/Inf values or is not floating point"),  # Δc with NaN
])
def test_reply_fields_and_update_norm_are_checked(shared_data, tmp_path, algorithm, bad_extra):
    kinds = ["bad_p", "bad_extra", "big_update"]
    faults = ",".join(f"1:{cid}:{kind}" for cid, kind in enumerate(kinds))
    cfg = _cfg(shared_data, **{"engine.inject_faults": f'"{faults}"', "engine.max_update_norm": 100,
                               "algorithm": algorithm, "federation.rounds": 1 if algorithm == "fedmoe" else 2})
    summary = run_experiment(cfg, tmp_path)
    r1 = {c["client_id"]: c for c in _rounds(tmp_path)[1]["clients"]}
    reasons = {**FIELD_REASONS, "bad_extra": bad_extra}
    for cid, kind in enumerate(kinds):
        if cid in r1:
            assert reasons[kind] in r1[cid]["error"], (kind, r1[cid]["error"])
    assert {cid for cid, c in r1.items() if c["error"]} == {c for c in range(3) if c in r1}
    assert all(c["error"] == "" for cid, c in r1.items() if cid >= 3)
    assert summary["failed_client_turns"] == len({c for c in range(3) if c in r1}) >= 2


def test_check_reply_names_each_bad_field():
    import numpy as np

    from fedmoe.engine.client import ClientReply
    from fedmoe.engine.faults import check_reply, check_update_norm

    def reply(p=None, extra=None, score=0.5):
        return ClientReply(b"", 0.1, score, np.full((2, 4), 0.25) if p is None else p, 3, 0, extra=extra)

    c = {"w": torch.zeros(3)}
    check_reply(reply(extra={"w": torch.ones(3)}), (2, 4), c)
    check_reply(reply(extra={"choice": torch.tensor([0, 3])}), (2, 4), None)
    bad = [
        (reply(p=np.zeros((3, 4))), "shape [3, 4], expected [2, 4]"),
        (reply(p=np.full((2, 4), -0.1)), "not probabilities"),
        (reply(p=np.full((2, 4), 0.5)), "not probabilities"),  # layer sums 2
        (reply(score=float("nan")), "score is nan"),
        (reply(extra={"w": torch.ones(4)}), "extra `w` has shape [4], expected [3]"),
        (reply(extra={"w": torch.tensor([1.0, float("inf"), 0.0])}), "extra `w` holds NaN/Inf"),
        (reply(extra={"choice": torch.tensor([0, 4])}), "not one expert id per MoE layer"),
        (reply(extra={"choice": torch.tensor([0.0, 1.0])}), "not one expert id per MoE layer"),
    ]
    for r, reason in bad:
        with pytest.raises(ClientFault, match=re.escape(reason)):
            check_reply(r, (2, 4), c)
    assert check_update_norm({"a": torch.tensor([3.0, 4.0])}, {"a": torch.zeros(2)}, 5.0) == 5.0
    with pytest.raises(ClientFault, match="update norm 5 exceeds"):
        check_update_norm({"a": torch.tensor([3.0, 4.0])}, {"a": torch.zeros(2)}, 4.9)
    with pytest.raises(ClientFault, match="update norm nan"):
        check_update_norm({"a": torch.tensor([float("nan")])}, {"a": torch.zeros(1)}, 4.9)
