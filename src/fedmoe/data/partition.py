"""Client partitions of the task data (docs/algorithms.md §5.1).

* Tasks go to clients round-robin (client ``c`` holds ``tasks[c % len(tasks)]``), so 30 clients
  over TC/RC/TS are 10/10/10.
* Within a task the examples are split across that task's clients IID (a seeded permutation cut
  into near-equal parts) or non-IID by a Dirichlet over *groups* (FedNLP / NIID-Bench
  ``hetero-dir``): groups are labels for TC and, for RC/TS which have no labels, k-means
  clusters of a text embedding (FedNLP's clustering-based partition).
* **(choice)** the embedding is TF-IDF (8192 terms, English stop words, sublinear tf) reduced
  by TruncatedSVD to 32 dimensions and L2-normalised; k-means uses ``random_state=0`` so the
  clusters are a fixed property of the data, like FedNLP's published cluster files, and the
  experiment seed drives only the Dirichlet draws and splits. RC embeds the paragraph
  (title + context), TS the document.
* Each client's share is split train/val/test from the seed; every split of every client
  holds at least :data:`MIN_PER_SPLIT` examples (a split whose fraction is 0 is empty), so a
  client needs at least ``3 * MIN_PER_SPLIT`` examples.

All randomness comes from :func:`rng_for`: a numpy Generator seeded by the experiment seed
plus string/int keys, so each draw is independent of what else is computed.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np

from fedmoe.errors import ConfigError

#: minimum examples in each non-empty split of every client (so >= 6 per client by default)
MIN_PER_SPLIT = 2
#: attempts at a Dirichlet draw where every client gets its minimum, before topping up
DIRICHLET_TRIES = 100
EMBED_FEATURES = 8192
EMBED_DIM = 32

_CLUSTER_CACHE: dict[tuple[str, int], np.ndarray] = {}


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A Generator seeded from ``seed`` and ``keys`` (strings hashed with CRC-32)."""
    words = [seed & 0xFFFFFFFFFFFFFFFF] + [
        zlib.crc32(k.encode()) if isinstance(k, str) else k & 0xFFFFFFFFFFFFFFFF for k in keys
    ]
    return np.random.default_rng(words)


def assign_tasks(num_clients: int, tasks: Sequence[str]) -> list[str]:
    """Round-robin task per client: ``tasks[c % len(tasks)]`` (balanced to within one client)."""
    if not tasks:
        raise ConfigError("data.tasks is empty.", 'list at least one task, e.g. data.tasks=["tc"].')
    if num_clients < len(tasks):
        raise ConfigError(
            f"setting.num_clients={num_clients} is fewer than the {len(tasks)} tasks in data.tasks.",
            f"use at least {len(tasks)} clients.",
        )
    return [tasks[c % len(tasks)] for c in range(num_clients)]


def min_share(val_fraction: float, test_fraction: float) -> int:
    """Fewest examples a client may hold: :data:`MIN_PER_SPLIT` per non-empty split."""
    return MIN_PER_SPLIT * (1 + int(val_fraction > 0) + int(test_fraction > 0))


def iid_partition(n: int, num_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into ``num_parts`` near-equal parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_parts)]


def dirichlet_partition(
    groups: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    """NIID-Bench/FedNLP ``hetero-dir``: per group, client shares ~ Dir(alpha).

    A client already holding more than ``n / num_parts`` examples gets no more of later
    groups (the published balancing rule). The draw is repeated until every client holds
    ``min_size`` examples; after :data:`DIRICHLET_TRIES` attempts the smallest clients are
    topped up with random examples of the largest one.
    """
    if alpha <= 0:
        raise ConfigError(
            f"setting.dirichlet_alpha={alpha} must be > 0.", "use e.g. 0.5 (smaller = more skewed)."
        )
    n = len(groups)
    if n < num_parts * min_size:
        raise ValueError(f"{n} examples cannot give {num_parts} clients {min_size} each.")
    parts: list[list[int]] = []
    for _ in range(DIRICHLET_TRIES):
        parts = [[] for _ in range(num_parts)]
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_parts, alpha))
            p = p * np.array([len(q) < n / num_parts for q in parts])
            p = p / p.sum() if p.sum() > 0 else np.full(num_parts, 1.0 / num_parts)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
                q.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            break
    else:
        for q in parts:
            while len(q) < min_size:
                donor = max(parts, key=len)
                q.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


def split_share(
    indices: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one client's share into (train, val, test), each sorted, sizes rounded from the fractions."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be >= 0 and sum < 1.",
            "e.g. val_fraction=0.1, test_fraction=0.2.",
        )
    n = len(indices)
    n_val = max(MIN_PER_SPLIT, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(MIN_PER_SPLIT, round(test_fraction * n)) if test_fraction > 0 else 0
    while n - n_val - n_test < MIN_PER_SPLIT and max(n_val, n_test) > MIN_PER_SPLIT:
        if n_val > n_test:
            n_val -= 1
        else:
            n_test -= 1
    if n - n_val - n_test < MIN_PER_SPLIT:
        raise ValueError(f"a share of {n} examples is too small for train/val/test.")
    perm = rng.permutation(indices)
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def draw_budgets(num_clients: int, low_bytes: float, high_bytes: float, seed: int) -> list[int]:
    """Memory budgets (bytes) drawn uniformly from ``[low_bytes, high_bytes]`` (docs/algorithms.md §5.3)."""
    if not 0 < low_bytes <= high_bytes:
        raise ConfigError(
            f"Budget range [{low_bytes}, {high_bytes}] bytes is empty or not positive.",
            "set setting.budget_low <= setting.budget_high, both > 0.",
        )
    draws = rng_for(seed, "budgets").uniform(low_bytes, high_bytes, size=num_clients)
    return [int(b) for b in draws]


def cluster_texts(texts: Sequence[str], num_clusters: int) -> np.ndarray:
    """k-means cluster id per text over a TF-IDF + TruncatedSVD embedding (module docstring (choice)).

    Identical texts are embedded once; results are cached in-process by content.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    if num_clusters < 1:
        raise ConfigError(f"setting.num_clusters={num_clusters} must be >= 1.", "use e.g. 5.")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (digest, num_clusters)
    if key in _CLUSTER_CACHE:
        return _CLUSTER_CACHE[key].copy()
    uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    k = min(num_clusters, len(uniq))
    if k <= 1:
        labels = np.zeros(len(texts), dtype=np.int64)
    else:
        try:
            x = TfidfVectorizer(
                max_features=EMBED_FEATURES,
                stop_words="english",
                sublinear_tf=True,
                min_df=2 if len(uniq) >= 50 else 1,
            ).fit_transform(list(uniq))
        except ValueError:  # empty vocabulary (e.g. only stop words)
            x = TfidfVectorizer(max_features=EMBED_FEATURES).fit_transform(list(uniq))
        dim = min(EMBED_DIM, x.shape[1] - 1, len(uniq) - 1)
        emb = TruncatedSVD(dim, random_state=0).fit_transform(x) if dim >= 1 else x.toarray()
        emb = normalize(emb)[inverse]
        labels = KMeans(k, n_init=2, random_state=0).fit_predict(emb).astype(np.int64)
    _CLUSTER_CACHE[key] = labels
    return labels.copy()
