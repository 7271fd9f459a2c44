"""Tied / shared tensors in payloads, checkpoints and base-byte counts (issue 14)."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save, save_model

from fedmoe.engine.payload import from_bytes, load_tensors_file, payload_size, save_tensors_file, to_bytes
from fedmoe.moe.models import build_tiny

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.int32, torch.float32,
          torch.float64, torch.int64]


def _tied_mixtral():
    model = build_tiny("tiny-mixtral", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("name", ["tiny-switch-transformers", "tied-mixtral"])
def test_model_state_counted_once_as_save_model_writes_it(name, tmp_path):
    model = _tied_mixtral() if name == "tied-mixtral" else build_tiny(name)
    state = model.state_dict()
    path = tmp_path / "m.safetensors"
    save_model(model, str(path))  # the reference: safetensors' own way of writing shared tensors
    assert payload_size(state) == len(to_bytes(state)) == path.stat().st_size
    back = from_bytes(to_bytes(state))
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    if name == "tiny-switch-transformers":
        assert back["lm_head.weight"] is back["shared.weight"] is back["encoder.embed_tokens.weight"]
        unique = {k: v for k, v in state.items() if k != "lm_head.weight" and "embed_tokens" not in k}
        assert path.stat().st_size - len(save(unique)) < 1024  # only header metadata on top: data counted once


def test_payload_size_equals_serialised_length_random():
    rng = random.Random(0)
    for _ in range(200):
        tensors = {}
        for i in range(rng.randint(1, 10)):
            shape = [rng.randint(0, 30) for _ in range(rng.randint(0, 3))]
            tensors[rng.choice(["a", "b.c", "é", 'x"y', "lm_head.weight"]) + str(i) * rng.randint(1, 3)] = (
                torch.zeros(shape, dtype=rng.choice(DTYPES)))
        if rng.random() < 0.5:
            first = next(iter(tensors))
            tensors["tied." + first] = tensors[first]
        assert payload_size(tensors) == len(to_bytes(tensors))


def test_partial_overlap_is_copied_not_lost():
    big = torch.arange(12.0)
    tensors = {"all": big, "head": big[:6], "mid": big[3:9]}
    back = from_bytes(to_bytes(tensors))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    assert payload_size(tensors) == len(to_bytes(tensors))


def test_file_round_trip_keeps_ties(tmp_path):
    w = torch.randn(5, 3)
    tensors = {"embed": w, "lm_head": w, "other": torch.ones(2)}
    save_tensors_file(tensors, tmp_path / "t.safetensors")
    back = load_tensors_file(tmp_path / "t.safetensors")
    assert back["embed"] is back["lm_head"] and torch.equal(back["embed"], w)
    assert torch.equal(back["other"], torch.ones(2))
    assert not list(tmp_path.glob("*.tmp"))
    save_tensors_file({}, tmp_path / "empty.safetensors")
    assert load_tensors_file(tmp_path / "empty.safetensors") == {}


def test_from_bytes_returns_keys_in_sorted_order_whatever_the_writer_order():
    """Dicts read back from bytes (SCAFFOLD's client variates in a checkpoint) have one order in
    every process: sorted keys, not the order of safetensors' hash map."""
    names = [f"layers.{i}.mlp.w{j}" for i in range(12) for j in range(4)]
    random.Random(3).shuffle(names)
    tensors = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    back = from_bytes(to_bytes(tensors))
    assert list(back) == sorted(names)
    assert all(torch.equal(back[n], tensors[n]) for n in names)
