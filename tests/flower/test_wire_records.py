"""engine.wire_dtype on Flower: the server casts downloads to the wire dtype and reads uploads
back as float32, as the in-process engine does."""

from __future__ import annotations

import pytest
import torch

from fedmoe.engine.client import ClientReply
from fedmoe.engine.payload import from_bytes, to_bytes, to_wire
from fedmoe.engine.remote import ClientJob
from fedmoe.flower.records import (
    content_bytes,
    job_content,
    parse_reply,
    parse_request,
    reply_content,
    wire_roundtrip,
)
from fedmoe.moe.slicing import ExpertMap


def test_flower_messages_travel_in_the_wire_dtype():
    em = ExpertMap("mixtral", [4], [[0]])
    down = {"w": torch.randn(256, 256), "i": torch.arange(3)}
    job = ClientJob(1, "tc", 1, 0, 0, em.kept, em, down)
    c32, c16 = job_content(job, "x"), job_content(job, "x", "bf16")
    assert content_bytes(c16) < 0.55 * content_bytes(c32)
    req = parse_request(wire_roundtrip(c16))
    assert req.download["w"].dtype == torch.bfloat16 and torch.equal(req.download["w"], down["w"].bfloat16())
    assert torch.equal(req.download["i"], down["i"])
    up = to_wire({"w": torch.randn(64, 32)}, "bf16")  # what a node's run_client uploads
    reply = ClientReply(to_bytes(up), 0.5, 0.1, torch.zeros(1, 4).numpy(), 1, 0)
    got = parse_reply(wire_roundtrip(reply_content(reply, from_bytes(reply.upload), 1, 0)), "bf16")
    assert got.upload["w"].dtype == torch.float32 and torch.equal(got.upload["w"], up["w"].float())


def test_bf16_local_grid_matches_inprocess(tmp_path, shared_data):
    """End to end: a bf16 wire on the Flower message path trains exactly as in-process."""
    from safetensors.torch import load_file

    from fedmoe.engine.run import run_experiment
    from fedmoe.flower import keys as K
    from fedmoe.flower.client_app import app as client_app
    from fedmoe.flower.local import LocalGrid, node_configs
    from fedmoe.flower.server_app import run_federated
    from fedmoe.flower.settings import AppSettings
    from tests.flower.test_local import rounds_of, run_config

    rc = run_config(shared_data)
    rc[K.RUN_OVERRIDES] = f"{rc[K.RUN_OVERRIDES]}; engine.wire_dtype=bf16"
    settings = AppSettings.from_run_config(rc)
    assert settings.experiment_config().engine.wire_dtype == "bf16"
    run_experiment(settings.experiment_config(), tmp_path / "inprocess")
    run_federated(LocalGrid(client_app, node_configs(2), rc), settings, tmp_path / "flower")
    a = load_file(str(tmp_path / "inprocess" / "global_trainable.safetensors"))
    b = load_file(str(tmp_path / "flower" / "global_trainable.safetensors"))
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ra, rb = rounds_of(tmp_path / "inprocess"), rounds_of(tmp_path / "flower")
    assert [c["loss"] for r in ra for c in r["clients"]] == pytest.approx([c["loss"] for r in rb for c in r["clients"]], abs=1e-5)
