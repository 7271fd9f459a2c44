"""Each client is priced at the batch its own data builds (engine/budget.py): its longest
training example, tokenised as batching does it, at ``min(batch_size, rows)`` rows. Budgets
stay the run-wide draw. Oracles count tokens by hand (one token per character / byte)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.config import load_config
from fedmoe.data.examples import TCExample
from fedmoe.data.tasks import get_task
from fedmoe.engine.budget import (
    RUNTIME_FIXED_BYTES,
    RUNTIME_SLACK,
    BatchShape,
    client_batch_shape,
    plan_memory,
)
from fedmoe.engine.run import Run
from fedmoe.moe.memory import unit_training_bytes
from fedmoe.moe.models import load_model
from tests.conftest import REPO

LABELS = ("world", "sports", "business", "tech")


def _cfg(*extra: str):
    return load_config(REPO / "configs" / "tiny.toml", ["data.max_seq_len=40", "data.max_target_len=6",
                                                        "train.batch_size=4", *extra])


def _tc(words: list[str], label: int = 0) -> TCExample:
    return TCExample(f"x{len(words)}", "", " ".join(words), label, LABELS[label])


def test_encoder_client_shape_is_its_longest_example_counted_by_hand():
    cfg = _cfg('model.name="tiny-bert-moe"')
    _, _, tok = load_model("tiny-bert-moe", 0, "float32")
    task = get_task("tc", LABELS)
    short = [_tc(["ab", "cd"]), _tc(["abc", "de", "fgh"]), _tc(["a"])]  # the char WordPiece: one token per letter
    longest = 3 + 2 + 3 + 2  # letters + [CLS] + [SEP]
    assert client_batch_shape(cfg, "encoder", task, tok, short) == BatchShape(3, longest, 6)  # 3 rows < batch_size
    long = short + [_tc(["abcdefgh"] * 6), _tc(["ab"])]  # 48 letters: truncated at max_seq_len
    assert client_batch_shape(cfg, "encoder", task, tok, long) == BatchShape(4, 40, 6)
    assert client_batch_shape(cfg, "encoder", task, tok, []) == BatchShape.of_config(cfg)


def test_seq2seq_client_shape_counts_source_and_target_bytes():
    cfg = _cfg('model.name="tiny-switch-transformers"')
    _, _, tok = load_model("tiny-switch-transformers", 0, "float32")
    task = get_task("tc", LABELS)
    rows = [_tc(["ab"], 1), _tc(["abcd", "ef"], 0)]  # targets "sports" (6 bytes), "world" (5)
    src = len((task.prompt + "abcd ef").encode())  # one token per byte, + eos; targets: cut to 5 + eos
    assert client_batch_shape(cfg, "seq2seq", task, tok, rows) == BatchShape(2, min(src + 1, 40), 6)
    shape = client_batch_shape(cfg, "seq2seq", task, tok, [_tc(["ab"], 0)])
    assert shape.target_len == len(b"world") + 1


def test_short_rows_cost_less_and_equal_the_formula_at_their_length_budgets_unchanged():
    cfg = _cfg('model.name="tiny-bert-moe"')
    model, family, _ = load_model("tiny-bert-moe", 0, "float32")
    shapes = {0: BatchShape(4, 12, 6), 1: BatchShape(4, 40, 6), 2: BatchShape(2, 40, 6)}
    plan = plan_memory(model, family, cfg, [0, 1, 2], shapes)
    assert plan.table.budgets == plan_memory(model, family, cfg, [0, 1, 2]).table.budgets  # same draw
    for cid, s in shapes.items():
        dense, eb = unit_training_bytes(model, family, batch_size=s.rows, seq_len=s.seq_len, finetune="lora",
                                        lora_r=cfg.train.lora_r, target_len=s.target_len)
        got_dense, got_eb = plan.table.costs(False, cid)
        assert got_dense == dense * RUNTIME_SLACK + RUNTIME_FIXED_BYTES
        np.testing.assert_array_equal(got_eb, eb * RUNTIME_SLACK)
        assert plan.table.full_bytes(cid) == pytest.approx((dense + eb.sum()) * RUNTIME_SLACK + RUNTIME_FIXED_BYTES, rel=1e-12)
    # client 1 builds the run-wide worst batch; shorter or fewer rows cost strictly less
    assert plan.table.full_bytes(1) == pytest.approx(plan.full_bytes, rel=1e-12)
    assert plan.table.full_bytes(0) < plan.table.full_bytes(1) and plan.table.full_bytes(2) < plan.table.full_bytes(1)
    kept = [[0, 1], [2]]
    assert plan.submodel_bytes(kept, client=0) < plan.submodel_bytes(kept, client=1) == plan.submodel_bytes(kept)
    # a client with no entry is priced run-wide; restricting keeps every client's own costs
    assert plan.table.costs(False, 9)[0] == plan.table.dense_bytes
    small = plan.table.restrict([2, 2])
    np.testing.assert_array_equal(small.costs(False, 0)[1], plan.table.costs(False, 0)[1][:, :2])


def test_a_run_prices_each_tc_client_at_its_own_tokens(shared_data, tmp_path):
    """Through ``Run``: the per-client price is the formula at the longest training example,
    counted with the tokenizer directly (not through batching), and turns report it."""
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'data.data_dir="{shared_data}"', 'model.name="minilm-moe-4e"', "data.max_seq_len=160",
        "data.max_examples_per_task=16", "setting.num_clients=3", "train.max_local_steps=1", "train.batch_size=4",
        "engine.measure_memory=false", "fedmoe.stage1_rounds=1", "federation.rounds=1"])
    run = Run(cfg, tmp_path)
    by_task = {}
    for c in run.fed.clients:
        n = max(len(run.tokenizer(ex.text, truncation=True, max_length=160)["input_ids"]) for ex in c.train) \
            if c.task == "tc" else None
        by_task.setdefault(c.task, []).append((c.client_id, n, len(c.train)))
    (cid, n_tok, rows), = by_task["tc"]
    assert n_tok < 160  # AG News rows are short: the test shows something
    dense, eb = unit_training_bytes(run.base, run.family, batch_size=min(rows, cfg.train.batch_size),
                                    seq_len=n_tok, finetune="lora", lora_r=cfg.train.lora_r,
                                    target_len=cfg.data.max_target_len)
    assert run.plan.table.full_bytes(cid) == pytest.approx((dense + eb.sum()) * RUNTIME_SLACK + RUNTIME_FIXED_BYTES, rel=1e-12)
    assert run.plan.table.full_bytes(cid) < run.plan.full_bytes
    seen = 0
    for rnd in range(run.strategy.num_rounds()):
        plan = run.strategy.plan(run, rnd)
        for c in run.round(plan).clients:
            assert c.predicted_memory_bytes == int(run.plan.submodel_bytes(plan.sets[c.client_id], client=c.client_id))
            seen += c.client_id == cid
    assert seen  # the TC client took part


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-bert-moe"])
def test_layers_below_top_k_are_priced_as_the_extracted_sub_moe(name):
    """A layer keeping fewer experts than top_k routes each token to fewer of them: the plan's
    price equals the formula of the extracted sub-MoE itself (the additive table, which the θ
    search uses, stays an upper bound)."""
    import torch

    from fedmoe.moe.memory import SMOOTHED_CE_LOSS, estimate_for_model
    from fedmoe.moe.slicing import extract

    cfg = _cfg(f'model.name="{name}"')
    model, family, _ = load_model(name, 0, "float32")
    shapes = {0: BatchShape(3, 20, 6)}
    plan = plan_memory(model, family, cfg, [0], shapes)
    k = max(b.top_k for b in family.blocks(model))
    assert k == 2
    adam = "foreach" if torch.cuda.is_available() else "for-loop"
    for per_layer in (1, 2, 3):
        kept = [list(range(per_layer)) for _ in plan.num_experts]
        sub = extract(model, kept, family).model
        for cid, (b, s) in ((0, (3, 20)), (None, (cfg.train.batch_size, cfg.data.max_seq_len))):
            oracle = RUNTIME_SLACK * estimate_for_model(sub, b, s, "lora", cfg.train.lora_r, family,
                                                        factors=SMOOTHED_CE_LOSS, adam_impl=adam, target_len=6) + RUNTIME_FIXED_BYTES
            assert plan.submodel_bytes(kept, client=cid) == pytest.approx(oracle, abs=8), (per_layer, cid)
            dense, eb = plan.table.costs(False, cid)
            additive = dense + sum(float(eb[i, j]) for i, ids in enumerate(kept) for j in ids)
            assert (additive > oracle + 1e3) == (per_layer < k)
