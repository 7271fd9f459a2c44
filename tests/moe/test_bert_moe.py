"""BERT-MoE family: shapes of the three task heads, save/load, registry, sub-MoE slicing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from fedmoe.moe.bert_moe import (
    BertMoeConfig,
    BertMoeExperts,
    BertMoeForFedTasks,
    BertMoeModel,
    BertMoeSparseMoeBlock,
    load_balancing_loss,
)
from fedmoe.moe.families import get_family
from fedmoe.moe.families.bert_moe import FAMILY

B, T = 3, 11


def _tiny(seed: int = 0, **kw) -> BertMoeForFedTasks:
    torch.manual_seed(seed)
    model = AutoModel.from_config(FAMILY.build_config(**kw))
    return model.eval()


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_config_defaults_and_auto_registration():
    cfg = BertMoeConfig()
    assert cfg.model_type == "bert_moe" and cfg.num_labels == 4
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.router_init_std) == (8, 2, 0.0)
    assert BertMoeConfig(num_labels=3).num_labels == 3
    assert type(AutoConfig.for_model("bert_moe")) is BertMoeConfig
    assert isinstance(_tiny(), BertMoeForFedTasks)


def test_three_tasks_have_the_right_shapes():
    model, x = _tiny(), _inputs()
    tc = model(**x, task="tc").logits
    rc = model(**x, task="rc").logits
    pos = torch.tensor([[0, 3, 6, -1], [0, 2, -1, -1], [0, 1, 5, 9]])
    ts = model(**x, task="ts", sentence_positions=pos).logits
    assert tc.shape == (B, 4) and rc.shape == (B, T, 2) and ts.shape == (B, 4)
    assert torch.isinf(ts[pos < 0]).all() and torch.isfinite(ts[pos >= 0]).all()
    # the ts score of a position is the per-token score at that position
    hidden = model.bert(**x).last_hidden_state
    assert torch.allclose(ts[2, 3], model.ts_head(hidden[2, 9]).squeeze(), atol=1e-6)
    with pytest.raises(ValueError):
        model(**x, task="ts")
    with pytest.raises(ValueError):
        model(**x, task="mlm")


def test_backward_reaches_experts_router_and_heads():
    model = _tiny().train()
    x = _inputs()
    out = model(**x, task="rc", output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (B * T, 6)
    (out.logits.square().mean() + out.aux_loss).backward()
    block = model.bert.encoder.layer[0].mlp
    assert block.experts.up_proj.grad.abs().sum() > 0
    assert block.gate.weight.grad.abs().sum() > 0
    assert model.rc_head.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_for_a_uniform_router():
    logits = (torch.zeros(10, 4),)
    assert load_balancing_loss(logits, 2).item() == pytest.approx(1.0)
    mask = torch.tensor([1] * 6 + [0] * 4)
    assert load_balancing_loss(logits, [1], mask).item() == pytest.approx(1.0)


def test_save_pretrained_round_trip_with_auto_model(tmp_path):
    model, x = _tiny(seed=3), _inputs(1)
    model.save_pretrained(tmp_path)
    back = AutoModel.from_pretrained(tmp_path).eval()
    assert type(back) is BertMoeForFedTasks
    for task in ("tc", "rc"):
        assert torch.equal(model(**x, task=task).logits, back(**x, task=task).logits)
    # the encoder alone loads from the same checkpoint (base_model_prefix = "bert")
    enc = BertMoeModel.from_pretrained(tmp_path).eval()
    assert torch.equal(enc(**x).last_hidden_state, model.bert(**x).last_hidden_state)


def test_family_is_registered_and_finds_blocks():
    assert get_family("bert_moe") is FAMILY
    model = _tiny()
    blocks = FAMILY.blocks(model)
    assert [b.path for b in blocks] == ["bert.encoder.layer.0.mlp", "bert.encoder.layer.1.mlp"]
    assert all(b.num_experts == 6 and b.top_k == 2 for b in blocks)
    assert all(isinstance(model.get_submodule(b.path), BertMoeSparseMoeBlock) for b in blocks)
    keys = {t.key for t in FAMILY.expert_slices(blocks[0].path, model.get_submodule(blocks[0].path), 2)}
    assert keys == {f"bert.encoder.layer.0.mlp.experts.{n}" for n in ("up_proj", "up_bias", "down_proj", "down_bias")}
    assert set(model.state_dict()) >= keys


def test_sub_moe_equals_masked_full_model_and_reloads(tmp_path):
    slicing = pytest.importorskip("fedmoe.moe.slicing")
    from tests.moe.helpers import dropped_logits_masked

    model, x = _tiny(seed=1), _inputs(2)
    kept = [[4], [0, 2, 5]]
    sub = slicing.extract(model, kept, FAMILY)
    assert [b.num_experts for b in FAMILY.blocks(sub.model)] == [1, 3]
    assert [b.top_k for b in FAMILY.blocks(sub.model)] == [1, 2]
    with torch.no_grad(), dropped_logits_masked(model, FAMILY, kept):
        ref = model(**x, task="rc").logits
    with torch.no_grad():
        got = sub.model(**x, task="rc").logits
        full = model(**x, task="rc").logits
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - full).abs().max().item() > 1e-6
    back = slicing.load_sub_moe(slicing.save_sub_moe(sub, tmp_path))
    with torch.no_grad():
        assert torch.equal(back.model(**x, task="rc").logits, got)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_experts_forward_and_grads_match_a_naive_loop(k):
    torch.manual_seed(k)
    cfg = FAMILY.build_config(num_experts=5)
    fused = BertMoeExperts(cfg)
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(13, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:k] for _ in range(13)])  # expert 4 is never hit
    w = torch.rand(13, k)
    got = fused(x, idx, w)
    ref = torch.zeros_like(got)
    for t in range(13):
        for s in range(k):
            e = int(idx[t, s])
            h = fused.act_fn(x[t] @ fused.up_proj[e].T + fused.up_bias[e])
            ref[t] += w[t, s] * (h @ fused.down_proj[e].T + fused.down_bias[e])
    assert torch.allclose(got, ref, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), [x, fused.up_proj, fused.down_bias])
    refs = torch.autograd.grad((ref * g).sum(), [x, fused.up_proj, fused.down_bias])
    for a, b in zip(grads, refs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads[1][4].abs().sum() == 0


def test_local_folder_given_with_tilde_loads_its_own_tokenizer(tmp_path, monkeypatch):
    """`model.name = "~/…"`: the folder's saved WordPiece tokenizer is used, not the char-level
    fallback (the stand-in's TC collapse, docs/results.md, came from exactly that fallback)."""
    from transformers import BertTokenizerFast

    from fedmoe.moe.models import load_model

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "wall", "street", "bears", "claw", "back"]
    folder = tmp_path / "home" / "standin"
    _tiny(seed=2).save_pretrained(folder)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, _, tok = load_model("~/standin")
    # [CLS] wall street bears claw back [SEP], by the vocabulary written above (one id per word)
    assert tok("Wall Street bears claw back")["input_ids"] == [2, 5, 6, 7, 8, 9, 3]


def test_local_folder_without_tokenizer_says_so_in_one_note(tmp_path):
    """No tokenizer files beside the weights: the byte-level test tokenizer is used, announced by one
    DataNotice (the CLI's `note:` line), never silently."""
    import warnings

    from fedmoe.errors import DataNotice
    from fedmoe.moe.models import load_model
    from fedmoe.moe.tokenizer import char_wordpiece_tokenizer

    folder = tmp_path / "weights-only"
    _tiny(seed=2).save_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, tok = load_model(str(folder))
    notes = [w for w in caught if issubclass(w.category, DataNotice)]
    assert len(notes) == 1 and str(folder) in str(notes[0].message) and "byte-level" in str(notes[0].message)
    text = "wall street"
    assert tok(text)["input_ids"] == char_wordpiece_tokenizer(tok.vocab_size)(text)["input_ids"]
