"""Record conversion, wire size, settings and node identity (fast, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedmoe.config import ExperimentConfig, dump_toml, load_config
from fedmoe.engine.client import ClientReply
from fedmoe.engine.remote import ClientJob, config_fingerprint, config_from_text
from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K
from fedmoe.flower.records import (
    STYPE_TORCH_RAW,
    array_to_tensor,
    content_bytes,
    job_content,
    parse_reply,
    parse_request,
    record_to_state,
    reply_content,
    state_to_record,
    tensor_to_array,
    wire_roundtrip,
)
from fedmoe.flower.settings import (
    AppSettings,
    NodeIdentity,
    identity_content,
    parse_faults,
    parse_identity,
    parse_overrides,
    partition_of,
    resolve_path,
)
from fedmoe.moe.slicing import ExpertMap
from tests.conftest import REPO


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool])
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (2, 1, 3)])
def test_tensor_array_roundtrip_exact(dtype, shape):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    back = array_to_tensor(tensor_to_array(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    if dtype != torch.bool:
        back.add_(1)  # writable: not a read-only view of the record's bytes


def test_bfloat16_travels_raw_and_state_keeps_order():
    state = {"b": torch.ones(2, dtype=torch.bfloat16), "a": torch.arange(3.0)}
    rec = state_to_record(state)
    assert list(rec) == ["b", "a"]
    assert rec["b"].stype == STYPE_TORCH_RAW and rec["a"].stype == "numpy.ndarray"
    back = record_to_state(wire_roundtrip(RecordDict({"t": rec}))["t"])
    assert list(back) == ["b", "a"] and all(torch.equal(back[k], state[k]) for k in state)


def _job() -> ClientJob:
    em = ExpertMap("mixtral", [4, 4], [[0, 2], [1, 3]])
    down = {"w": torch.randn(4, 3), "z": torch.zeros(8, 8)}
    return ClientJob(client_id=5, task="tc", stage=2, round=3, seed=123, kept=em.kept, expert_map=em, download=down,
                     extra_down={"c": torch.ones(2)})


def test_request_roundtrip_over_the_wire():
    job = _job()
    req = parse_request(wire_roundtrip(job_content(job, "abc")))
    assert (req.client_id, req.round, req.stage, req.seed, req.fingerprint) == (5, 3, 2, 123, "abc")
    assert req.expert_map == job.expert_map
    assert all(torch.equal(req.download[k], v) for k, v in job.download.items())
    assert torch.equal(req.extra_down["c"], torch.ones(2))


def test_reply_roundtrip_over_the_wire():
    p = np.random.default_rng(0).random((2, 4))
    reply = ClientReply(upload=b"", loss=1.25, score=0.5, p=p, steps=3, peak_memory_bytes=77, extra={})
    upload = {"w": torch.randn(4, 3)}
    res = parse_reply(wire_roundtrip(reply_content(reply, upload, client_id=5, rnd=3)))
    assert (res.client_id, res.round) == (5, 3)
    assert np.array_equal(res.p, p) and res.p.dtype == np.float64
    assert res.metrics == {K.MET_LOSS: 1.25, K.MET_SCORE: 0.5, K.MET_STEPS: 3, K.MET_PEAK_MEMORY: 77}
    assert torch.equal(res.upload["w"], upload["w"]) and res.extra_up == {}


def test_content_bytes_counts_the_tensors_and_dedups_identical_chunks():
    job = _job()
    content = job_content(job, "abc")
    data = sum(t.numel() * t.element_size() for t in (*job.download.values(), *job.extra_down.values()))
    assert data < content_bytes(content) < data + 4096
    assert content_bytes(wire_roundtrip(content)) == content_bytes(content)
    twice = RecordDict({"a": state_to_record({"x": torch.zeros(1000)}), "b": state_to_record({"y": torch.zeros(1000)})})
    once = RecordDict({"a": state_to_record({"x": torch.zeros(1000)})})
    assert content_bytes(twice) < 1.2 * content_bytes(once)  # the same array object crosses once


def test_overrides_faults_and_settings_defaults():
    assert parse_overrides(" a.b=1; c.d=x ;\n e=[1, 2];") == ["a.b=1", "c.d=x", "e=[1, 2]"]
    assert parse_faults("2:1, 3:4:nan") == {(2, 1): "raise", (3, 4): "nan"} and parse_faults("") == {}
    for bad in ("2-1", "2:1:melt", "1:2:3:4"):
        with pytest.raises(ConfigError, match=K.RUN_INJECT_FAULT):
            parse_faults(bad)
    s = AppSettings.from_run_config({})
    assert s.experiment == "configs/tiny.toml" and s.overrides == () and s.faults == {}
    s = AppSettings.from_run_config({K.RUN_OVERRIDES: "federation.rounds=3", K.RUN_INJECT_FAULT: "1:2",
                                     K.RUN_EXPERIMENT: str(REPO / "configs" / "tiny.toml")})
    cfg = s.experiment_config(data_dir="/data/here")
    assert cfg.federation.rounds == 3 and cfg.data.data_dir == "/data/here" and s.faults == {(1, 2): "raise"}


def test_resolve_path(tmp_path, monkeypatch):
    (tmp_path / "exp.toml").write_text("seed = 1\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("exp.toml") == tmp_path / "exp.toml"
    monkeypatch.chdir(REPO.parent)
    monkeypatch.syspath_prepend(str(tmp_path))  # where Flower puts the installed app
    assert resolve_path("exp.toml") == tmp_path / "exp.toml"
    with pytest.raises(ConfigError):
        resolve_path("nope/missing.toml")


def test_node_identity_and_partitions():
    ident = NodeIdentity.from_node_config({"partition-id": 1, "num-partitions": 2, "data-dir": "/d"})
    assert ident == NodeIdentity(1, 2, "/d")
    assert [c for c in range(6) if ident.serves(c)] == [1, 3, 5]
    assert [partition_of(c, 3) for c in range(6)] == [0, 1, 2, 0, 1, 2]
    assert parse_identity(wire_roundtrip(identity_content(ident))) == (1, 2)
    with pytest.raises(ConfigError):
        NodeIdentity.from_node_config({})
    with pytest.raises(ConfigError):
        NodeIdentity.from_node_config({"partition-id": 2, "num-partitions": 2})


def test_config_text_roundtrip_and_fingerprint():
    cfg = load_config(REPO / "configs" / "tiny.toml", ["federation.rounds=2"])
    assert config_from_text(dump_toml(cfg)) == cfg
    other = load_config(REPO / "configs" / "tiny.toml", ["federation.rounds=2", 'data.data_dir="/elsewhere"'])
    assert config_fingerprint(other) == config_fingerprint(cfg)  # data_dir is node-local
    assert config_fingerprint(other, ignore=()) != config_fingerprint(cfg, ignore=())
    assert config_fingerprint(ExperimentConfig()) != config_fingerprint(cfg)


def test_flat_run_config_keys_set_the_experiment():
    """FlowerTune-style flat keys: any experiment key (`-` or `_`), "" = the file's value, `overrides` last;
    pyproject's defaults change nothing; an unknown key is one ConfigError naming it and the nearest key."""
    import tomllib

    from flwr.common.config import flatten_dict

    from fedmoe.config import load_config
    from fedmoe.flower.settings import flat_overrides

    exp = str(REPO / "configs" / "tiny.toml")
    defaults = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert "model.name" in defaults and flat_overrides(defaults) == []
    file_cfg = load_config(exp)
    assert AppSettings.from_run_config({**defaults, K.RUN_EXPERIMENT: exp}).experiment_config() == file_cfg
    rc = {**defaults, K.RUN_EXPERIMENT: exp, "model.name": "tiny-qwen2-moe", "train.lr": 0.005,
          "setting.num-clients": 9, "train.gradient-checkpointing": "auto", "engine.measure_memory": False,
          "data.hub-split.tc": "train", "federation.rounds": 4, K.RUN_OVERRIDES: "federation.rounds=7"}
    cfg = AppSettings.from_run_config(rc).experiment_config()
    assert (cfg.model.name, cfg.train.lr, cfg.setting.num_clients, cfg.train.gradient_checkpointing) == \
        ("tiny-qwen2-moe", 0.005, 9, "auto")
    assert cfg.engine.measure_memory is False and cfg.data.hub_split == {"tc": "train"}
    assert cfg.federation.rounds == 7  # `overrides` wins over a flat key
    assert cfg.seed == file_cfg.seed and cfg.setting.preset == file_cfg.setting.preset  # "" keeps the file's
    with pytest.raises(ConfigError, match=r"Unknown config key `train.lr_max`.*train.lr"):
        AppSettings.from_run_config({K.RUN_EXPERIMENT: exp, "train.lr-max": 0.1}).experiment_config()
