"""Stage-2 expert recommendation (paper eq. 4–6, Algorithm 1 lines 11–29).

* eq. 4: cosine similarity between two clients' p vectors (all layers flattened);
* eq. 5: the top-K most similar other clients;
* eq. 6: p̂_{i,j} = Σ_a sim(k, a)·p_{i,j}(a) / Σ_a sim(k, a) over those K;
* Algorithm 1 line 16: n = AVG(expert count of the K) − own expert count, then add the n
  best-p̂ experts not held, or remove the |n| worst-p̂ experts held.

Choice (docs/algorithms.md §1.2 step 5): n is counted over the whole model and experts are
ranked globally across layers by p̂. Expert sets are ``list[list[int]]`` (sorted indices per
layer), as in :mod:`fedmoe.core.search`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmoe.core.search import ExpertSets, expert_count, set_bytes


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 4 on flattened arrays; 0.0 if either vector is all zeros (choice: no information)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"p vectors differ in size: {x.size} vs {y.size}.")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def cosine_top_k(p_self: np.ndarray, p_others: dict[int, np.ndarray], k: int) -> list[tuple[int, float]]:
    """Eq. 4–5: the ``k`` clients of ``p_others`` most similar to ``p_self``.

    ``p_others`` must not contain the client itself (eq. 5: a ≠ k). Sorted by similarity
    descending, ties broken by lower client id; fewer than ``k`` if fewer others exist.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    sims = [(cid, cosine_similarity(p_self, p)) for cid, p in p_others.items()]
    sims.sort(key=lambda t: (-t[1], t[0]))
    return sims[:k]


def estimate_p_hat(
    top: list[tuple[int, float]], p_others: dict[int, np.ndarray], *, zero_sim: str = "uniform"
) -> np.ndarray:
    """Eq. 6: similarity-weighted mean of the top-K clients' p, shape ``[L, E]``.

    ``zero_sim`` (choice) handles Σ sim = 0 (every similarity 0, where eq. 6 is undefined):
    ``"uniform"`` averages the K clients' p with equal weights; ``"raise"`` raises ValueError.
    """
    if not top:
        raise ValueError("estimate_p_hat needs at least one similar client.")
    ps = [np.asarray(p_others[cid], dtype=np.float64) for cid, _ in top]
    sims = np.array([s for _, s in top], dtype=np.float64)
    total = float(sims.sum())
    if total <= 0.0:
        if zero_sim == "raise":
            raise ValueError(f"eq. 6 undefined: similarities {sims.tolist()} sum to {total}.")
        sims, total = np.ones_like(sims), float(len(sims))
    return sum((s / total) * p for s, p in zip(sims, ps, strict=True))


def round_half_up(x: float) -> int:
    """Rounding used for n (choice): halves round up (2.5 → 3), unlike Python's banker's ``round``."""
    return math.floor(x + 0.5)


def _preference(p_hat: np.ndarray) -> list[tuple[int, int]]:
    """All (layer, expert) units, best first: p̂ descending, ties by lower (layer, expert)."""
    n_layers, n_experts = p_hat.shape
    units = [(i, j) for i in range(n_layers) for j in range(n_experts)]
    return sorted(units, key=lambda u: (-float(p_hat[u]), u))


def recommend(
    own_set: ExpertSets,
    p_hat: np.ndarray,
    mean_count_of_top_k: float,
    expert_bytes: np.ndarray,
    dense_bytes: float,
    budget_bytes: float,
) -> tuple[ExpertSets, dict[str, Any]]:
    """Algorithm 1 lines 16–29 with the global-across-layers choice.

    ``n = round_half_up(mean_count_of_top_k) − expert_count(own_set)``:

    * ``n > 0``: walk the experts not held in descending p̂ (ties: lower (layer, expert))
      and add them while fewer than n were added and the next one keeps
      ``dense_bytes + Σ expert_bytes ≤ budget_bytes`` (the full budget M_k, not α·M_k);
      stop at the first one that would not fit;
    * ``n < 0``: walk the held experts in ascending p̂ (the reverse of the same order) and
      remove |n| of them, skipping any that is the last expert of its layer;
    * ``n = 0``: nothing.

    Returns the new set (sorted per layer; ``own_set`` is not modified) and an action dict
    ``{"n", "target_count", "own_count", "added", "removed"}`` (lists of (layer, expert)).
    """
    p_hat = np.asarray(p_hat, dtype=np.float64)
    if p_hat.ndim != 2 or len(own_set) != p_hat.shape[0]:
        raise ValueError(f"p_hat shape {p_hat.shape} does not match an expert set of {len(own_set)} layers.")
    own_count = expert_count(own_set)
    target = round_half_up(mean_count_of_top_k)
    n = target - own_count
    sets = [set(layer) for layer in own_set]
    added: list[tuple[int, int]] = []
    removed: list[tuple[int, int]] = []
    order = _preference(p_hat)
    if n > 0:
        used = set_bytes(own_set, expert_bytes, dense_bytes)
        eb = np.asarray(expert_bytes, dtype=np.float64)
        for i, j in (u for u in order if u[1] not in sets[u[0]]):
            if len(added) == n or used + float(eb[i, j]) > budget_bytes:
                break
            sets[i].add(j)
            used += float(eb[i, j])
            added.append((i, j))
    elif n < 0:
        for i, j in reversed([u for u in order if u[1] in sets[u[0]]]):
            if len(removed) == -n:
                break
            if len(sets[i]) > 1:
                sets[i].remove(j)
                removed.append((i, j))
    action = {"n": n, "target_count": target, "own_count": own_count, "added": added, "removed": removed}
    return [sorted(layer) for layer in sets], action
