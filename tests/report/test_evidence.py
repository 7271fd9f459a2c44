"""benchmarks/evidence: held-out stand-in corpus vs client pool, routing restriction, JS and CI helpers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "benchmarks" / "evidence"))


@pytest.fixture(scope="module")
def common():
    import common

    return common


@pytest.mark.parametrize(("task", "n_held", "n_pool"), [("tc", 1181, 5400), ("rc", 2337, 6470), ("ts", 482, 1928)])
def test_standin_corpus_and_client_pool_are_disjoint(common, task, n_held, n_pool):
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    held, pool = common.split_task(str(SHARED_DATA), task)
    assert (len(held), len(pool)) == (n_held, n_pool)
    assert not {e.id for e in held} & {e.id for e in pool}
    if task == "rc":  # split by article: no context (paragraph) and no article in both
        assert not {e.context for e in held} & {e.context for e in pool}
        assert not {e.title for e in held} & {e.title for e in pool}
    if task == "tc":  # every train_head581 row is held out
        assert all("train_head581" not in e.id for e in pool)
    texts = common.standin_texts(str(SHARED_DATA))
    pool_text = {common.task_text(e) for e in pool}
    assert not pool_text & set(texts[common.TASK_SOURCE[task]])


def test_js_bits_known_values():
    import observation1 as o1

    p = np.array([0.5, 0.5, 0.0, 0.0])
    assert o1.js_bits(p, p) == 0.0
    assert o1.js_bits(p, np.array([0.0, 0.0, 0.5, 0.5])) == pytest.approx(1.0)
    # by hand: M = (0.75, 0.25); KL(P||M) = log2(4/3); KL(Q||M) = 0.5·log2(2/3) + 0.5·log2(2)
    q = np.array([0.5, 0.5])
    want = 0.5 * np.log2(4 / 3) + 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25))
    assert o1.js_bits(np.array([1.0, 0.0]), q) == pytest.approx(want)


def test_ci95_matches_t_table(common):
    m, h = common.ci95([1.0, 2.0, 3.0])
    assert m == 2.0
    assert h == pytest.approx(4.302652729911275 / np.sqrt(3))  # t(0.975, 2) · s / √n, s = 1
    assert common.ci95([0.7]) == (0.7, 0.0)


def test_branch_routing_is_restricted_to_the_source_experts():
    import build_standin as bs

    from fedmoe.moe.families import family_of
    from fedmoe.moe.models import build_tiny
    from fedmoe.moe.routing import RoutingStats

    model = build_tiny("tiny-bert-moe", seed=0)
    family = family_of(model)
    n_exp = family.blocks(model)[0].num_experts
    restrict = bs.Restrict(model, family)
    allowed = torch.zeros(n_exp, dtype=torch.bool)
    allowed[[0, n_exp - 1]] = True
    restrict.allowed = allowed
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    with RoutingStats(model, family) as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    used = stats.counts.sum(0) > 0
    assert used[0] and used[n_exp - 1] and not used[1:n_exp - 1].any()
    sup = restrict.pop()  # −log Σ_allowed p over the unrestricted softmax, averaged over layers
    assert float(sup) > 0
    restrict.allowed = None
    with RoutingStats(model, family) as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert (stats.counts.sum(0) > 0)[1:n_exp - 1].any()  # released: other experts are used again
    assert restrict.terms == []
    json.dumps(bs.parse([]).__dict__)  # defaults are plain values (they key the cache folder)


def test_heldout_ids_file_matches_the_rule(common):
    """The committed data.exclude_ids file of the standin grid is exactly the stand-in corpus rows."""
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    import heldout_ids

    lines = heldout_ids.OUT.read_text(encoding="utf-8").splitlines()
    ids = [ln for ln in lines if ln and not ln.startswith("#")]
    want = [e.id for t in ("tc", "rc", "ts") for e in common.split_task(str(SHARED_DATA), t)[0]]
    assert ids == want and len(ids) == 1181 + 2337 + 482


def test_ts_room_rules_score_the_sentence_they_pick():
    """``ts_room.measure`` on two documents whose sentences are seen whole: each rule's ROUGE-2 is the
    mean over rows of the sentence it picks, computed here from ``rouge_f`` directly."""
    import ts_room

    from fedmoe.data.examples import TSExample
    from fedmoe.data.metrics import rouge_f
    from fedmoe.moe.models import build_tiny
    from fedmoe.moe.tokenizer import char_wordpiece_tokenizer

    rows = [TSExample("a", "The cat sat down. Rain fell all day. The cat sat on the mat.", "The cat sat on the mat."),
            TSExample("b", "Heavy rain fell. The cat slept.", "Rain clouds gathered.")]
    model = build_tiny("tiny-bert-moe", seed=0).eval()
    res = ts_room.measure(model, char_wordpiece_tokenizer(), rows, 512, draws=3)
    r2 = [[rouge_f(ex.summary, s)["rouge2"] for s in sents] for ex, sents in
          zip(rows, (["The cat sat down.", "Rain fell all day.", "The cat sat on the mat."],
                     ["Heavy rain fell.", "The cat slept."]), strict=True)]
    sc = {k: v["rouge2"] for k, v in res["scores"].items()}
    assert res["sentences_seen_mean"] == 2.5 and res["rows"] == 2
    assert sc["lead"] == pytest.approx((r2[0][0] + r2[1][0]) / 2)
    assert sc["last"] == pytest.approx((r2[0][2] + r2[1][1]) / 2)
    assert sc["best_rouge2"] == pytest.approx((1.0 + 0.0) / 2)  # row a: the summary itself; row b: no bigram
    # targets: row a sentence 2 (the summary), row b sentence 0 (shares "rain"); the old bigram rule: 2 and 0
    assert res["target_position"] == {"0": 1, "2": 1}
    assert sc["target"] == pytest.approx(0.5) and sc["old_target"] == pytest.approx(0.5)
    assert res["no_bigram_share"] == 0.5 and res["old_target_clipped_share"] == 0.0
    assert min(sc.values()) >= 0.0 and max(v for k, v in sc.items()) <= sc["best_rouge2"] + 1e-12
