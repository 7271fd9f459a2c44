"""Partitions, splits and budgets (docs/algorithms.md §5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.data.partition import (
    MIN_PER_SPLIT,
    assign_tasks,
    cluster_texts,
    dirichlet_partition,
    draw_budgets,
    iid_partition,
    min_share,
    rng_for,
    split_share,
)
from fedmoe.errors import ConfigError


def test_round_robin_tasks_balanced() -> None:
    got = assign_tasks(30, ["tc", "rc", "ts"])
    assert got[:4] == ["tc", "rc", "ts", "tc"]
    assert [got.count(t) for t in ("tc", "rc", "ts")] == [10, 10, 10]
    with pytest.raises(ConfigError):
        assign_tasks(2, ["tc", "rc", "ts"])


def test_iid_partition_is_an_exact_cover() -> None:
    parts = iid_partition(103, 10, rng_for(0, "iid"))
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    alpha=st.sampled_from([0.05, 0.5, 5.0]),
    n=st.integers(60, 400),
    clients=st.integers(2, 10),
    groups=st.integers(1, 6),
)
def test_dirichlet_cover_and_minimum(seed: int, alpha: float, n: int, clients: int, groups: int) -> None:
    labels = rng_for(seed, "labels").integers(groups, size=n)
    parts = dirichlet_partition(labels, clients, alpha, rng_for(seed, "d"), min_size=6)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert min(len(p) for p in parts) >= 6


def test_dirichlet_deterministic_and_rejects_bad_alpha() -> None:
    labels = np.repeat(np.arange(4), 50)
    a = dirichlet_partition(labels, 5, 0.5, rng_for(1, "d"), 6)
    b = dirichlet_partition(labels, 5, 0.5, rng_for(1, "d"), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ConfigError):
        dirichlet_partition(labels, 5, 0.0, rng_for(1, "d"))


def test_split_sizes_and_minimum() -> None:
    train, val, test = split_share(np.arange(100), 0.1, 0.2, rng_for(0, "s"))
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    small = split_share(np.arange(min_share(0.1, 0.2)), 0.1, 0.2, rng_for(0, "s"))
    assert [len(s) for s in small] == [MIN_PER_SPLIT] * 3
    assert [len(s) for s in split_share(np.arange(10), 0.0, 0.2, rng_for(0, "s"))] == [8, 0, 2]
    with pytest.raises(ConfigError):
        split_share(np.arange(10), 0.5, 0.5, rng_for(0, "s"))


def test_budgets_uniform_seeded() -> None:
    b = draw_budgets(30, 1_000, 2_000, seed=4)
    assert b == draw_budgets(30, 1_000, 2_000, seed=4) != draw_budgets(30, 1_000, 2_000, seed=5)
    assert len(b) == 30 and all(1_000 <= x <= 2_000 for x in b)
    with pytest.raises(ConfigError):
        draw_budgets(3, 0, 10, seed=0)


def test_cluster_texts_deterministic_and_topical() -> None:
    sports = [f"football match goal striker league team {i}" for i in range(30)]
    money = [f"bank shares market profit investors stocks {i}" for i in range(30)]
    texts = sports + money
    a = cluster_texts(texts, 2)
    from fedmoe.data import partition

    partition._CLUSTER_CACHE.clear()
    assert np.array_equal(a, cluster_texts(texts, 2))
    assert len(set(a[:30])) == 1 and len(set(a[30:])) == 1 and a[0] != a[30]
    assert cluster_texts(["same"] * 5, 3).tolist() == [0] * 5
