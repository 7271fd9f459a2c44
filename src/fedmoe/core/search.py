"""Stage-1 heuristic submodel search (paper eq. 3; docs/algorithms.md §1.1 steps 3–4).

Eq. 3: maximise θ subject to Σ_j x_{i,j}·p_{i,j} ≥ θ in every layer i and
mem(w_d + Σ x_{i,j}·w_{i,j}) ≤ α·M (here α applies above the dense part: :func:`search_cap`). The paper solves it by binary search over θ ∈ [0, 1],
building for each θ the *smallest submodel* and checking its memory.

Memory is additive here: ``dense_bytes + Σ expert_bytes[i, j]`` over kept experts, where
``dense_bytes`` and ``expert_bytes`` are whatever per-part training cost the caller's memory
model says (weights + grads + optimiser state + activations); this module only sums them.

Expert sets are ``list[list[int]]``: for each layer, the sorted global expert indices kept.
"""

from __future__ import annotations

import math

import numpy as np

from fedmoe.errors import BudgetError

ExpertSets = list[list[int]]

#: tolerance of the float comparison "cumulative p ≥ θ" (absorbs float summation error,
#: e.g. a layer whose p sums to 0.9999999999 still reaches θ = 1)
CUMULATIVE_EPS = 1e-9


def _as_2d(p: np.ndarray, name: str = "p") -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a [layers, experts] array, got shape {arr.shape}.")
    return arr


def set_bytes(sets: ExpertSets, expert_bytes: np.ndarray, dense_bytes: float) -> float:
    """Memory of a submodel: ``dense_bytes + Σ_{(i,j) kept} expert_bytes[i, j]``."""
    eb = np.asarray(expert_bytes, dtype=np.float64)
    return float(dense_bytes) + float(sum(eb[i, j] for i, layer in enumerate(sets) for j in layer))


def expert_count(sets: ExpertSets) -> int:
    """Number of experts kept over all layers."""
    return sum(len(layer) for layer in sets)


def smallest_submodel(p: np.ndarray, theta: float, eps: float = CUMULATIVE_EPS) -> ExpertSets:
    """Per layer, the fewest experts whose cumulative p reaches θ (eq. 3, first constraint).

    Experts are taken in descending p (ties: lower index first) until the cumulative sum is
    ``≥ θ − eps`` (``eps``: float-summation tolerance, :data:`CUMULATIVE_EPS`); at least one
    expert per layer; if a layer's total never reaches θ, all its experts are kept.
    Returns each layer's kept indices sorted ascending.
    """
    arr = _as_2d(p)
    sets: ExpertSets = []
    for row in arr:
        order = np.argsort(-row, kind="stable")  # stable: equal p keep ascending index order
        cum = np.cumsum(row[order])
        reached = np.nonzero(cum >= theta - eps)[0]
        count = int(reached[0]) + 1 if reached.size else len(row)
        sets.append(sorted(int(j) for j in order[: max(1, count)]))
    return sets


def search_cap(budget_bytes: float, alpha: float, dense_bytes: float = 0.0) -> float:
    """The bytes a client's submodel may use: ``D + α·(M − D)`` (choice), ``D`` the dense part every
    submodel of the client holds. α keeps headroom (for stage 2's additions) in the share of the budget
    experts can use, never in the dense part the budget is drawn to hold: with ``α·M`` a model whose dense
    part is most of its budget (``tiny-switch-transformers``: ≈ 98 % at u = 0.3) could not run FedMoE
    at any budget the setting draws. Prices and budgets both carry the runtime's fixed share, which lies
    inside ``D``. A budget below ``D`` is its own cap (the dense part does not fit)."""
    room = float(budget_bytes) - float(dense_bytes)
    return float(dense_bytes) + alpha * room if room >= 0 else float(budget_bytes)


def _budget_error(client_id: int | None, what: str, needed: float, cap: float, budget: float, alpha: float,
                  dense_bytes: float) -> BudgetError:
    """``what`` = ``needed`` bytes do not fit the search's cap; the fix names the smallest α that would
    hold them (when one ≤ 1 does: the budget itself holds them) before the other remedies."""
    who = "A client" if client_id is None else f"Client {client_id}"
    room = float(budget) - float(dense_bytes)
    rule = (f"D + α·(M − D) = {dense_bytes:.0f} + {alpha}·({budget:.0f} − {dense_bytes:.0f})" if room >= 0
            else "its budget")
    least = (float(needed) - float(dense_bytes)) / room if room > 0 else float("inf")
    alpha_fix = (f"set fedmoe.alpha to at least {math.ceil(least * 1000) / 1000:g} (the budget holds it; α leaves "
                 "the rest as headroom), or " if alpha < least <= 1 else "")
    return BudgetError(
        f"{who} cannot hold its submodel: {what} {needed:.0f} bytes > {rule} = {cap:.0f} bytes.",
        f"{alpha_fix}give the client a larger memory budget (setting.budget_low), raise fedmoe.alpha, use a smaller "
        "model, or set federation.exclude_unfit=true to leave such clients out.",
    )


def fit_error(dense_bytes: float, expert_bytes: np.ndarray, budget_bytes: float, alpha: float, *,
              client_id: int | None = None) -> BudgetError | None:
    """The error :func:`theta_search` / :func:`random_expert_sets` would raise for *every* p (or
    draw), known before any training: the dense part alone, or the dense part with the cheapest
    expert of every layer, exceeds the cap ``D + α·(M − D)``. ``None`` when some set can fit."""
    eb = _as_2d(expert_bytes, "expert_bytes")
    cap = search_cap(budget_bytes, alpha, dense_bytes)
    if dense_bytes > cap:
        return _budget_error(client_id, "dense part", dense_bytes, cap, budget_bytes, alpha, dense_bytes)
    least = float(dense_bytes) + float(eb.min(axis=1).sum())
    if least > cap:
        return _budget_error(client_id, "dense + one expert per layer =", least, cap, budget_bytes, alpha, dense_bytes)
    return None


def theta_search(
    p: np.ndarray,
    dense_bytes: float,
    expert_bytes: np.ndarray,
    budget_bytes: float,
    alpha: float = 0.9,
    tol: float = 1e-4,
    *,
    client_id: int | None = None,
    eps: float = CUMULATIVE_EPS,
) -> tuple[float, ExpertSets]:
    """Binary search for the largest θ ∈ [0, 1] whose smallest submodel fits the cap (eq. 3, with α as :func:`search_cap` applies it).

    Invariant: ``lo`` is feasible, ``hi`` infeasible; stops when ``hi − lo ≤ tol`` and returns
    ``(lo, smallest_submodel(p, lo))``. Feasibility is monotone in θ (a larger θ never keeps
    fewer experts), so ``lo`` is within ``tol`` below the exact optimum. If θ = 1 fits, returns
    ``1.0`` at once. ``alpha`` ∈ (0, 1] is the share of the budget the search may use
    (docs/algorithms.md §1.1 step 3, choice, default 0.9; the rest is stage-2 headroom),
    applied to the share above the dense part (:func:`search_cap`: ``mem ≤ D + α·(M − D)``).

    Raises :class:`BudgetError` (naming ``client_id`` and the byte counts) if the dense part
    alone exceeds the budget, or if even θ = 0 (the top expert of every layer) does not fit.
    """
    arr = _as_2d(p)
    eb = _as_2d(expert_bytes, "expert_bytes")
    if eb.shape != arr.shape:
        raise ValueError(f"expert_bytes has shape {eb.shape}, p has shape {arr.shape}.")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    cap = search_cap(budget_bytes, alpha, dense_bytes)
    if dense_bytes > cap:
        raise _budget_error(client_id, "dense part", dense_bytes, cap, budget_bytes, alpha, dense_bytes)

    def fits(theta: float) -> bool:
        return set_bytes(smallest_submodel(arr, theta, eps), eb, dense_bytes) <= cap

    if not fits(0.0):
        need = set_bytes(smallest_submodel(arr, 0.0, eps), eb, dense_bytes)
        raise _budget_error(client_id, "dense + one expert per layer =", need, cap, budget_bytes, alpha, dense_bytes)
    if fits(1.0):
        return 1.0, smallest_submodel(arr, 1.0, eps)
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, smallest_submodel(arr, lo, eps)


def random_expert_sets(
    expert_bytes: np.ndarray,
    dense_bytes: float,
    budget_bytes: float,
    alpha: float,
    rng: np.random.Generator,
    *,
    client_id: int | None = None,
) -> ExpertSets:
    """Random expert sets under the stage-1 budget rule (randomMoE; ablation "w/o stage 1").

    Rule (choice): the cap is the same ``D + α·(M − D)`` as :func:`theta_search`. First one uniformly
    random expert per layer (guaranteed; :class:`BudgetError` if these plus the dense part do
    not fit, or the dense part alone does not); then every remaining (layer, expert) unit in
    one uniformly shuffled order is added if it still fits (units that do not fit are
    skipped, later smaller ones may still be added). Deterministic given ``rng``.
    """
    eb = _as_2d(expert_bytes, "expert_bytes")
    cap = search_cap(budget_bytes, alpha, dense_bytes)
    if dense_bytes > cap:
        raise _budget_error(client_id, "dense part", dense_bytes, cap, budget_bytes, alpha, dense_bytes)
    n_layers, n_experts = eb.shape
    sets: ExpertSets = [[int(rng.integers(n_experts))] for _ in range(n_layers)]
    used = set_bytes(sets, eb, dense_bytes)
    if used > cap:
        raise _budget_error(client_id, "dense + one expert per layer =", used, cap, budget_bytes, alpha, dense_bytes)
    rest = [(i, j) for i in range(n_layers) for j in range(n_experts) if j != sets[i][0]]
    for k in rng.permutation(len(rest)):
        i, j = rest[int(k)]
        if used + eb[i, j] <= cap:
            sets[i].append(j)
            used += float(eb[i, j])
    return [sorted(layer) for layer in sets]
