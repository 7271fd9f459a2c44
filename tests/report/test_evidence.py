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
