"""engine.wire_dtype on Flower: the server casts downloads to the wire dtype and reads uploads
back as float32, as the in-process engine does."""

from __future__ import annotations

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
