"""HFedMoE (Fang et al. 2026): budget-aware expert selection + sparsity-aware aggregation.

docs/algorithms.md §3 is the specification; every numbered step is one function here:

* :func:`compute_budget` — §3.1: C_k, the experts per layer a client can train, from memory;
* :func:`importance` — §3.2: s_cumul, s_spec and s = λ·s_cumul + (1−λ)·s_spec;
* :func:`ib_score` — §3.3: KL_e and the information-bottleneck score I(e) = s(e) − β·KL_e;
* :func:`select_active` — §3.4: top-C_k experts by I(e) among the experts the router used;
* :func:`expert_aggregate` — §3.5: τ-filtered, example-weighted expert averaging;
* :func:`gate_weights` / :func:`gate_aggregate` — §3.6: importance-weighted router averaging;
* :class:`HFedMoEServerState` with the verbs :func:`configure` and :func:`aggregate`.

Notation: ``G`` is ``[B, E]``, the router probabilities G_e(x_b) of one MoE layer on B rows
(the model side feeds one row per non-padding token, :func:`fedmoe.moe.graft.collect_router_stats`).
:class:`RouterStats` accumulates the same quantities in one streaming pass. ``u_c(e)`` (§3.5),
the mean router probability of expert e on client c's data, equals ``s_cumul(e)`` of that
pass. Training on the active set only is :func:`fedmoe.moe.graft.mask_routing`. Pure
numpy/torch; verbs never modify their inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.core.aggregation import ClientUpdate, modular_aggregate, weighted_mean
from fedmoe.core.layout import UnitId, UnitLayout
from fedmoe.core.router_stats import DEFAULT_BETA, DEFAULT_LAMBDA, RouterStats  # noqa: F401 — RouterStats lives in core
from fedmoe.core.router_stats import as_probs as _probs
from fedmoe.core.search import search_cap
from fedmoe.errors import BudgetError

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("hfedmoe", "HFedMoE: budget-aware expert selection, sparsity-aware aggregation",
                     "fedmoe.engine.strategies.hfedmoe:HFedMoEStrategy", "fedmoe.algorithms.hfedmoe", "§3")

ClientId = int


def importance(G: Any, lam: float = DEFAULT_LAMBDA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.2: ``(s_cumul, s_spec, s)``, each ``[E]``.

    s_cumul(e) = (1/B) Σ_b G_e(x_b); s_spec(e) = max_b G_e(x_b);
    s(e) = λ·s_cumul(e) + (1−λ)·s_spec(e), λ ∈ [0, 1] (``lam``, default 0.5, choice).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}.")
    g = _probs(G)
    s_cumul, s_spec = g.mean(axis=0), g.max(axis=0)
    return s_cumul, s_spec, lam * s_cumul + (1.0 - lam) * s_spec


def ib_score(G: Any, s: Any, beta: float = DEFAULT_BETA) -> tuple[np.ndarray, np.ndarray]:
    """§3.3: ``(KL, I)``, each ``[E]``.

    KL_e = (1/B) Σ_b G_e(x_b)·log(G_e(x_b)/p̄_e) with p̄_e = (1/B) Σ_b G_e(x_b), and
    I(e) = s(e) − β·KL_e (``beta`` ≥ 0, default 0.1, choice). Terms with G_e(x_b) = 0 are
    exactly 0 (0·log 0 = 0); no eps is added anywhere: whenever some G_e(x_b) > 0, p̄_e > 0,
    and an expert with p̄_e = 0 has KL_e = 0. KL_e ≥ 0 (Jensen), clamped at 0 against rounding
    as in :class:`~fedmoe.core.router_stats.RouterStats` (all-equal rows gave −3.7e-17).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    g = _probs(G)
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (g.shape[1],):
        raise ValueError(f"s has shape {s.shape}; expected ({g.shape[1]},).")
    p_bar = g.mean(axis=0)
    pos = g > 0
    ratio = np.where(pos, g / np.where(p_bar > 0, p_bar, 1.0), 1.0)
    kl = np.maximum(np.where(pos, g * np.log(ratio), 0.0).mean(axis=0), 0.0)  # ≥ 0 (rounding)
    return kl, s - beta * kl


def select_active(I: Any, used_mask: Any, C_k: int, *, fallback: str = "all") -> list[int]:  # noqa: E741
    """§3.4: the sorted ids of the top-``C_k`` experts by I(e) among those with ``used_mask``.

    Ties go to the lower expert id. Fewer used experts than C_k: all used experts are
    selected (the set is never padded with unused ones). No expert used at all (e.g. no
    data): ``fallback`` (choice) ``"all"`` = top-C_k over all experts, ``"raise"`` =
    ValueError. Training keeps top-k routing over the set, k clipped to its size.
    """
    score = np.asarray(I, dtype=np.float64)
    used = np.asarray(used_mask, dtype=bool)
    if score.ndim != 1 or used.shape != score.shape:
        raise ValueError(f"I {score.shape} and used_mask {used.shape} must be the same 1-D shape.")
    if not np.isfinite(score).all():
        raise ValueError("I must be finite.")
    if C_k < 1:
        raise ValueError(f"C_k must be >= 1, got {C_k}.")
    cand = np.flatnonzero(used)
    if cand.size == 0:
        if fallback != "all":
            raise ValueError("select_active: the router used no expert on this client's data.")
        cand = np.arange(score.size)
    order = sorted(cand.tolist(), key=lambda e: (-score[e], e))
    return sorted(int(e) for e in order[:C_k])


def compute_budget(
    memory_budget: float, dense_bytes: float, expert_bytes: Any, *, alpha: float = 1.0,
    client_id: ClientId | None = None,
) -> int:
    """§3.1: C_k from a memory budget M_k (bytes).

    ``expert_bytes`` ``[L, E]`` is the training memory of each expert (0 = absent). C_k is the
    largest C such that ``dense_bytes + Σ_i (sum of the C largest expert_bytes[i])`` ≤
    ``alpha``·M_k: the worst case over which C experts per layer get selected, so every
    selection fits (``alpha``, choice, default 1.0, is a safety factor applied as in FedMoE, to the
    share of the budget above the dense part: ``D + alpha·(M_k − D)``, :func:`fedmoe.core.search.search_cap`).
    Clipped to E. Raises :class:`BudgetError` when not even one expert per layer fits.
    """
    eb = np.asarray(expert_bytes, dtype=np.float64)
    if eb.ndim != 2:
        raise ValueError(f"expert_bytes must be [L, E], got shape {eb.shape}.")
    cum = np.cumsum(-np.sort(-eb, axis=1), axis=1).sum(axis=0)  # [E]: cost of C = 1..E
    cap = search_cap(memory_budget, alpha, dense_bytes)
    fits = np.flatnonzero(dense_bytes + cum <= cap)
    if fits.size == 0:
        need = dense_bytes + cum[0]
        raise BudgetError(
            f"Client {client_id}: budget {cap:.0f} B cannot hold one expert per layer ({need:.0f} B).",
            "raise its memory budget or exclude the client.",
        )
    return int(fits[-1]) + 1


# -- aggregation ----------------------------------------------------------------------
def default_tau(layout: UnitLayout) -> dict[int, float]:
    """τ_i = 1/(2·E_i) per MoE layer i (§3.5, choice), E_i = the layer's expert count."""
    counts: dict[int, int] = {}
    for i, _ in layout.experts:
        counts[i] = counts.get(i, 0) + 1
    return {i: 1.0 / (2.0 * n) for i, n in counts.items()}


def _taus(layout: UnitLayout, tau: float | Mapping[int, float] | None) -> dict[int, float]:
    base = default_tau(layout)
    if tau is None:
        return base
    if isinstance(tau, Mapping):
        return {i: float(tau.get(i, t)) for i, t in base.items()}
    return dict.fromkeys(base, float(tau))


def expert_aggregate(
    global_state: dict[str, Tensor], layout: UnitLayout, updates: Sequence[ClientUpdate],
    usage: Mapping[ClientId, np.ndarray], *, tau: float | Mapping[int, float] | None = None,
) -> tuple[dict[str, Tensor], dict[UnitId, list[ClientId]]]:
    """§3.5: E_e ← Σ_c |D_c|·1[u_c(e) ≥ τ]·E_e(c) / Σ_c |D_c|·1[u_c(e) ≥ τ].

    ``usage[c]`` is ``[L, E]`` u_c over global ids; ``tau`` a float, a per-layer mapping, or
    None = :func:`default_tau`. A client's expert counts only if it sent it *and* passes τ;
    no such client → the expert is unchanged (bit-identical). Dense keys are FedAvg'd and
    router rows are left to :func:`gate_aggregate` (this call ignores ``updates[*].routers``).
    Implemented by τ-filtering the updates and reusing :func:`modular_aggregate`. Returns
    the new state (see its sharing rules) and the contributors of each written unit.
    """
    taus = _taus(layout, tau)
    filtered, who = [], {}
    for upd in updates:
        if upd.client_id not in usage:
            raise ValueError(f"expert_aggregate: no usage u_c reported by client {upd.client_id}.")
        u = np.asarray(usage[upd.client_id], dtype=np.float64)
        keep = {unit: ts for unit, ts in upd.experts.items() if u[unit] >= taus[unit[0]]}
        for unit in keep:
            who.setdefault(unit, []).append(upd.client_id)
        filtered.append(ClientUpdate(upd.client_id, upd.num_examples, dict(upd.dense), keep, {}))
    return modular_aggregate(global_state, layout, filtered), who


def gate_weights(usage: Sequence[Any], scores: Sequence[Any], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """§3.6 for one layer: ``(a, a_normalised)`` over the clients.

    S_c = {e : u_c(e) ≥ τ}; p_c(e) = u_c(e)·s_c(e); a_c = Σ_{e∈S_c} p_c(e) / |∪_c S_c|.
    The normalised weights a_c / Σ a_c (choice: the notes leave a_c unnormalised; the
    |∪ S_c| factor then cancels) are all 0 when Σ a_c = 0.
    """
    u = [np.asarray(x, dtype=np.float64) for x in usage]
    s = [np.asarray(x, dtype=np.float64) for x in scores]
    sets = [uc >= tau for uc in u]
    union = int(np.logical_or.reduce(sets).sum()) if sets else 0
    a = np.array([float((uc * sc)[m].sum()) / union if union else 0.0 for uc, sc, m in zip(u, s, sets, strict=True)])
    total = a.sum()
    return a, (a / total if total > 0 else np.zeros_like(a))


def gate_aggregate(
    global_router: Tensor, client_routers: Sequence[Tensor], usage: Sequence[Any], scores: Sequence[Any], tau: float,
) -> tuple[np.ndarray, Tensor]:
    """§3.6: router ← Σ_c a_c·router_c / Σ_c a_c; returns ``(normalised a, router)``.

    Σ a_c = 0 → ``global_router`` itself (unchanged). Clients with a_c = 0 are left out of the
    float64 :func:`weighted_mean`.
    """
    _, w = gate_weights(usage, scores, tau)
    if not w.any():
        return w, global_router
    pairs = [(r, float(x)) for r, x in zip(client_routers, w, strict=True) if x > 0]
    mean = weighted_mean([r for r, _ in pairs], [x for _, x in pairs], "router",
                         dtype=global_router.dtype, device=global_router.device)
    return w, mean


# -- server state and verbs ------------------------------------------------------------
@dataclass
class ClientStats:
    """What a client reports for aggregation, ``[L, E]`` over global expert ids."""

    usage: np.ndarray  #: u_c(e) (§3.5)
    importance: np.ndarray  #: s_c(e) (§3.2)


@dataclass
class HFedMoEServerState:
    """Everything the HFedMoE server remembers between rounds, except the weights."""

    budgets: dict[ClientId, int] = field(default_factory=dict)  #: C_k per client (§3.1)
    active_sets: dict[ClientId, list[list[int]]] = field(default_factory=dict)  #: per layer
    scores: dict[ClientId, np.ndarray] = field(default_factory=dict)  #: latest I(e), [L, E]
    stats: dict[ClientId, ClientStats] = field(default_factory=dict)  #: latest u, s
    round: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def configure(
    state: HFedMoEServerState, client_id: ClientId, layer_stats: Sequence[RouterStats], *,
    lam: float = DEFAULT_LAMBDA, beta: float = DEFAULT_BETA, fallback: str = "all",
) -> HFedMoEServerState:
    """§3.2–3.4 for one client: its active set per layer from its routing pass.

    ``layer_stats[i]`` is layer i's :class:`RouterStats` on the client's data under the global
    model. Stores the active sets, I(e) and the client's u, s (used by :func:`aggregate`).
    """
    if client_id not in state.budgets:
        raise ValueError(f"configure: no budget C_k for client {client_id}.")
    new = copy.deepcopy(state)
    width = max(st.num_experts for st in layer_stats)
    scores, usage, imp = (np.zeros((len(layer_stats), width)) for _ in range(3))
    sets = []
    for i, st in enumerate(layer_stats):
        n = st.num_experts
        _, score = st.ib_score(lam, beta)
        scores[i, :n], usage[i, :n], imp[i, :n] = score, st.usage(), st.importance(lam)
        sets.append(select_active(score, st.used(), state.budgets[client_id], fallback=fallback))
    new.active_sets[client_id] = sets
    new.scores[client_id] = scores
    new.stats[client_id] = ClientStats(usage, imp)
    return new


def _router_keys(layout: UnitLayout) -> dict[int, list[str]]:
    keys: dict[int, list[str]] = {}
    for (i, _), slices in sorted(layout.routers.items()):
        for sl in slices:
            if sl.key not in keys.setdefault(i, []):
                keys[i].append(sl.key)
    return keys


def aggregate(
    state: HFedMoEServerState, global_state: dict[str, Tensor], layout: UnitLayout, updates: Sequence[ClientUpdate],
    stats: Mapping[ClientId, ClientStats] | None = None, *, tau: float | Mapping[int, float] | None = None,
) -> tuple[HFedMoEServerState, dict[str, Tensor], dict[str, Any]]:
    """§3.5 + §3.6: returns ``(new_state, new_global_state, info)``.

    Dense keys: FedAvg; experts: :func:`expert_aggregate`; routers, per layer and router
    tensor: :func:`gate_aggregate` over the clients' *full* router tensors, a client's rows it
    did not send being the global ones it received (choice: the spec averages whole routers).
    ``stats`` defaults to the ones :func:`configure` stored. ``info`` holds the expert
    contributors and the normalised gate weights per layer.
    """
    stats = dict(state.stats if stats is None else stats)
    missing = [u.client_id for u in updates if u.client_id not in stats]
    if missing:
        raise ValueError(f"aggregate: no usage/importance stats for clients {missing}.")
    taus = _taus(layout, tau)
    out, who = expert_aggregate(global_state, layout, updates, {c: s.usage for c, s in stats.items()}, tau=taus)
    gates: dict[int, dict[ClientId, float]] = {}
    for i, keys in _router_keys(layout).items():
        fulls: list[dict[str, Tensor]] = []
        for upd in updates:
            full = {k: global_state[k].detach().clone() for k in keys}
            for unit, tensors in upd.routers.items():
                if unit[0] == i:
                    for sl, t in zip(layout.routers[unit], tensors, strict=True):
                        sl.write(full, t)
            fulls.append(full)
        u = [stats[x.client_id].usage[i] for x in updates]
        s = [stats[x.client_id].importance[i] for x in updates]
        for key in keys:
            w, out[key] = gate_aggregate(global_state[key], [f[key] for f in fulls], u, s, taus[i])
        gates[i] = {x.client_id: float(wc) for x, wc in zip(updates, w, strict=True)} if keys else {}
    new = copy.deepcopy(state)
    new.round += 1
    info = {"round": new.round, "expert_contributors": who, "gate_weights": gates}
    new.events.append({"round": new.round, "kind": "aggregate", "gate_weights": gates,
                       "experts_updated": len(who)})
    return new, out, info

