"""FedMoE server logic (Mei et al. 2024): explicit state + pure verbs.

The weights live elsewhere (aggregation: :func:`fedmoe.core.aggregation.modular_aggregate`).
This module keeps the *structure* bookkeeping of docs/algorithms.md §1:

* :func:`predict_p` — stage 1 step 2: p for clients that did not report;
* :func:`initial_expert_sets` — stage 1 step 3–4: θ binary search (eq. 3) per client, or
  random sets under the same budget (randomMoE / ablation "w/o stage 1");
* :func:`after_round` — stage 2 step 5 (Algorithm 1 lines 10–31): record p and scores, run
  expert recommendation (eq. 4–6) for stalled clients, revert-and-freeze failed changes.

Verbs never modify their input state; they return a new one (a deep copy).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.core.recommend import cosine_top_k, estimate_p_hat, recommend
from fedmoe.core.search import ExpertSets, expert_count, fit_error, random_expert_sets, theta_search
from fedmoe.errors import BudgetError

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("fedmoe", "FedMoE: stage-1 submodel search, modular aggregation, expert recommendation",
                     "fedmoe.engine.strategies.fedmoe:FedMoEStrategy", "fedmoe.algorithms.fedmoe", "§1")

ClientId = int


@dataclass
class MemoryTable:
    """Additive training-memory model: ``dense_bytes + Σ expert_bytes[i, j]`` ≤ budget.

    ``dense_bytes``/``expert_bytes`` are the costs at the run's longest batch (``data.max_seq_len``),
    the scale the budgets are drawn on. ``per_client`` holds each client's own costs, at the batch
    its data actually produces (its longest example, fewer rows when it has fewer examples); every
    consumer prices a client with :meth:`costs` ``(…, client=cid)``, which falls back to the
    run-wide costs for a client without an entry.
    """

    dense_bytes: float
    expert_bytes: np.ndarray  #: [L, E] training bytes of each expert
    budgets: dict[ClientId, float]  #: M_k per client, bytes
    #: ``(dense_bytes, expert_bytes)`` when training with gradient checkpointing (cheaper activations), if
    #: that is an option per client (``train.gradient_checkpointing = "auto"``): the initial search then
    #: gives a client these costs when they buy it more experts (:func:`initial_expert_sets`)
    checkpointed: tuple[float, np.ndarray] | None = None
    #: client → ``(dense_bytes, expert_bytes)`` at that client's own batch shape
    per_client: dict[ClientId, tuple[float, np.ndarray]] = field(default_factory=dict)
    #: client → its checkpointed costs (only with ``checkpointed``)
    per_client_checkpointed: dict[ClientId, tuple[float, np.ndarray]] = field(default_factory=dict)
    #: the fixed share F that every dense cost and every budget include (``RUNTIME_FIXED_BYTES``; for
    #: the record: the searches apply α above the whole dense part, :func:`fedmoe.core.search.search_cap`)
    fixed_bytes: float = 0.0

    def costs(self, checkpointing: bool, client: ClientId | None = None) -> tuple[float, np.ndarray]:
        """``(dense_bytes, expert_bytes)`` of a client that trains with(out) gradient checkpointing:
        the client's own costs when it has them (``client`` given), else the run-wide ones."""
        ckpt = checkpointing and self.checkpointed is not None
        own = self.per_client_checkpointed if ckpt else self.per_client
        if client is not None and client in own:
            return own[client]
        if ckpt:
            assert self.checkpointed is not None
            return self.checkpointed
        return self.dense_bytes, self.expert_bytes

    def full_bytes(self, client: ClientId | None = None, checkpointing: bool = False) -> float:
        """Training bytes of the whole MoE (every expert) for ``client`` (run-wide when None)."""
        dense, eb = self.costs(checkpointing, client)
        return float(dense + np.asarray(eb, dtype=np.float64).sum())

    def restrict(self, counts: Sequence[int]) -> MemoryTable:
        """The table of the model keeping the first ``counts[i]`` experts of each layer (budgets unchanged)."""

        def cut(pair: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
            eb = np.zeros((len(counts), max(counts)), dtype=np.float64)
            for i, n in enumerate(counts):
                eb[i, :n] = np.asarray(pair[1], dtype=np.float64)[i, :n]
            return float(pair[0]), eb

        dense, eb = cut((self.dense_bytes, self.expert_bytes))
        return MemoryTable(dense, eb, dict(self.budgets), cut(self.checkpointed) if self.checkpointed else None,
                           {c: cut(v) for c, v in self.per_client.items()},
                           {c: cut(v) for c, v in self.per_client_checkpointed.items()}, self.fixed_bytes)


@dataclass
class ClientResult:
    """What the server keeps from one client's stage-2 participation (Algorithm 1 line 7)."""

    client_id: ClientId
    num_examples: int
    score: float  #: validation score (higher is better)
    p: np.ndarray  #: [L, E] activation probabilities, 0 for experts not held


@dataclass
class PendingChange:
    """An exploratory structural change awaiting its verdict at the next participation."""

    previous_set: ExpertSets
    score_before: float
    round: int
    action: dict[str, Any]


@dataclass
class FedMoEServerState:
    """Everything the FedMoE server remembers between rounds, except the weights."""

    expert_sets: dict[ClientId, ExpertSets] = field(default_factory=dict)  #: client-expert map
    latest_p: dict[ClientId, np.ndarray] = field(default_factory=dict)
    scores: dict[ClientId, list[float]] = field(default_factory=dict)  #: score history
    stale: dict[ClientId, int] = field(default_factory=dict)  #: consecutive non-improving participations
    frozen: set[ClientId] = field(default_factory=set)
    pending: dict[ClientId, PendingChange] = field(default_factory=dict)
    stage1_p: dict[ClientId, np.ndarray] = field(default_factory=dict)  #: p used by the search
    stage1_reported: set[ClientId] = field(default_factory=set)  #: clients that measured p
    theta: dict[ClientId, float] = field(default_factory=dict)
    excluded: dict[ClientId, str] = field(default_factory=dict)  #: id → reason
    #: clients whose initial search chose gradient checkpointing (it bought them experts)
    checkpointing: set[ClientId] = field(default_factory=set)
    round: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def predict_p(
    reports: dict[ClientId, tuple[str, int, np.ndarray]],
    clients: dict[ClientId, tuple[str, int]],
    *,
    fallback: str = "all",
) -> dict[ClientId, np.ndarray]:
    """Stage 1 step 2: p for every client in ``clients``.

    ``reports``: id → (task, num_examples, measured p); ``clients``: id → (task,
    num_examples). A client that reported keeps its own p; any other gets the average of
    the same-task reports weighted by their example counts (equal weights if those are all
    0). ``fallback`` (choice) when no same-task client reported: ``"all"`` = the weighted
    average over all reports; ``"raise"`` = ValueError. No reports at all: ValueError.
    """
    if not reports:
        raise ValueError("predict_p: no client reported p in stage 1; nothing to predict from.")

    def mean(rows: list[tuple[str, int, np.ndarray]]) -> np.ndarray:
        w = np.array([n for _, n, _ in rows], dtype=np.float64)
        w = np.ones_like(w) if w.sum() <= 0 else w
        return sum((wk / w.sum()) * np.asarray(p, dtype=np.float64) for wk, (_, _, p) in zip(w, rows, strict=True))

    out: dict[ClientId, np.ndarray] = {}
    for cid, (task, _) in clients.items():
        if cid in reports:
            out[cid] = np.asarray(reports[cid][2], dtype=np.float64)
            continue
        same = [r for r in reports.values() if r[0] == task]
        if not same:
            if fallback == "raise":
                raise ValueError(f"predict_p: no client of task {task!r} reported p (client {cid}).")
            same = list(reports.values())
        out[cid] = mean(same)
    return out


def unfit_clients(memory: MemoryTable, alpha: float) -> dict[int, BudgetError]:
    """Clients no expert set can fit under the stage-1 budget rule, whatever p stage 1 measures
    (:func:`~fedmoe.core.search.fit_error` under every cost table the client may train with), with
    the error :func:`initial_expert_sets` would raise for them — so a run can stop before stage 1."""
    options = [False, True] if memory.checkpointed is not None else [False]
    out: dict[int, BudgetError] = {}
    for cid in sorted(memory.budgets):
        errors = [fit_error(*memory.costs(ckpt, cid), memory.budgets[cid], alpha, client_id=cid)
                  for ckpt in options]
        if all(e is not None for e in errors):
            out[cid] = errors[0]  # type: ignore[assignment]
    return out


def initial_expert_sets(
    state: FedMoEServerState,
    p: dict[ClientId, np.ndarray],
    memory: MemoryTable,
    *,
    alpha: float = 0.9,
    tol: float = 1e-4,
    exclude_unfit: bool = False,
    reported: Iterable[ClientId] = (),
    random_init: np.random.Generator | None = None,
) -> FedMoEServerState:
    """Stage 1 step 3–4: the initial client-expert map.

    Per client (ascending id): :func:`theta_search` on its p (eq. 3), or, when
    ``random_init`` is a generator, :func:`random_expert_sets` under the same α·M rule
    (randomMoE / "w/o stage 1"). A client that cannot fit raises :class:`BudgetError`
    unless ``exclude_unfit``, in which case it is recorded in ``state.excluded`` with the
    reason (never silently). ``latest_p`` starts as the stage-1 p.

    When ``memory.checkpointed`` is set (gradient checkpointing is an option), each client is
    searched under both cost tables and takes the checkpointed one — recorded in
    ``state.checkpointing`` and used by its later recommendations — only if it keeps strictly
    more experts there (or fits only there); ties keep the faster, non-checkpointed training.
    """
    new = copy.deepcopy(state)
    new.stage1_reported |= set(reported)
    for cid in sorted(p):
        pk = np.asarray(p[cid], dtype=np.float64)
        if cid not in memory.budgets:
            raise ValueError(f"initial_expert_sets: no memory budget for client {cid}.")
        options = [False, True] if memory.checkpointed is not None else [False]
        found: dict[bool, tuple[float | None, ExpertSets, Any]] = {}
        error: BudgetError | None = None
        for ckpt in options:
            dense, eb = memory.costs(ckpt, cid)
            rng = copy.deepcopy(random_init)  # both options draw from the same stream; the chosen one advances it
            try:
                if rng is None:
                    found[ckpt] = (*theta_search(pk, dense, eb, memory.budgets[cid], alpha, tol, client_id=cid), None)
                else:
                    found[ckpt] = (None, random_expert_sets(eb, dense, memory.budgets[cid], alpha, rng,
                                                            client_id=cid), rng)
            except BudgetError as err:
                error = error or err
        if not found:
            assert error is not None
            if not exclude_unfit:
                raise error
            new.excluded[cid] = str(error)
            continue
        ckpt = True in found and (False not in found or expert_count(found[True][1]) > expert_count(found[False][1]))
        theta, sets, used_rng = found[ckpt]
        if theta is not None:
            new.theta[cid] = theta
        if used_rng is not None:
            assert random_init is not None
            random_init.bit_generator.state = used_rng.bit_generator.state
        if ckpt:
            new.checkpointing.add(cid)
        new.expert_sets[cid] = sets
        new.stage1_p[cid] = pk
        new.latest_p[cid] = pk
        new.stale.setdefault(cid, 0)
    return new


def _record(new: FedMoEServerState, r: ClientResult) -> dict[str, Any] | None:
    """Store p and score; judge a pending change. Returns the keep/revert event, if any."""
    cid = r.client_id
    if cid not in new.expert_sets:
        why = new.excluded.get(cid, "it has no expert set")
        raise ValueError(f"after_round: result from client {cid}, which cannot participate: {why}")
    p = np.asarray(r.p, dtype=np.float64)
    want = new.latest_p[cid].shape if cid in new.latest_p else (len(new.expert_sets[cid]), -1)
    if p.ndim != 2 or p.shape[0] != want[0] or want[1] not in (-1, p.shape[1]):
        raise ValueError(f"after_round: client {cid} sent p of shape {p.shape}, expected {want}.")
    history = new.scores.setdefault(cid, [])
    improved = not history or r.score > max(history)
    history.append(float(r.score))
    new.latest_p[cid] = p
    new.stale[cid] = 0 if improved else new.stale.get(cid, 0) + 1
    change = new.pending.pop(cid, None)
    if change is None:
        return None
    if r.score > change.score_before:
        new.stale[cid] = 0
        kind = "keep"
    else:
        new.expert_sets[cid] = change.previous_set
        new.frozen.add(cid)
        kind = "revert_and_freeze"
    return {"round": new.round, "client_id": cid, "kind": kind, "score": float(r.score),
            "score_before": change.score_before, "change_round": change.round}


def _fork(state: FedMoEServerState, touched: Sequence[ClientId]) -> FedMoEServerState:
    """A copy of ``state`` that ``after_round`` may edit without touching ``state``.

    Copy-on-write instead of ``deepcopy``: containers are copied (pointers only) and only the
    mutable entries of the ``touched`` (sampled) clients are copied, so a round costs O(N)
    pointer copies plus the sampled clients' data, not a deep copy of every client's p and
    history (benchmarks/system/server_scale.py). Entries are replaced, never edited in place:
    arrays in ``latest_p``/``stage1_p`` and expert sets (``recommend`` returns new ones).
    """
    new = copy.copy(state)
    for name in ("expert_sets", "latest_p", "scores", "stale", "pending", "stage1_p", "theta", "excluded"):
        setattr(new, name, dict(getattr(state, name)))
    new.frozen, new.stage1_reported = set(state.frozen), set(state.stage1_reported)
    new.checkpointing = set(state.checkpointing)
    new.events = list(state.events)
    for cid in touched:
        if cid in new.scores:
            new.scores[cid] = list(new.scores[cid])
    return new


def after_round(
    state: FedMoEServerState,
    results: Sequence[ClientResult],
    memory: MemoryTable,
    *,
    patience: int = 2,
    top_k: int = 3,
    stage2_adjust: bool = True,
    revert_reference: str = "last",
) -> tuple[FedMoEServerState, list[dict[str, Any]]]:
    """Stage 2 step 5 after one round's aggregation; returns ``(new_state, events)``.

    For each sampled client (ascending id): record p and score; a participation
    *improves* if its score beats the client's best earlier score (the first always does);
    ``stale`` counts consecutive non-improving participations. A pending exploratory change
    is judged now: kept if the score beats ``score_before``, else the previous set is
    restored and the client frozen.

    Then, if ``stage2_adjust``, every sampled client that is not frozen, has no pending
    change and has ``stale >= patience`` (P, choice, default 2) gets a recommendation
    (eq. 4–6, :func:`fedmoe.core.recommend.recommend`, its full budget M_k) against the
    latest p of every other client in the client-expert map (its stage-1 p until it has
    taken part in stage 2), with the top-K (``top_k``, choice, default
    3) counts taken from the client-expert map as it stood before this round's changes
    (choice: all clients of a round are adjusted simultaneously). A change that alters the
    set becomes pending with ``score_before`` = this participation's score
    (``revert_reference="last"``) or the client's best score (``"best"``), both choices.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}.")
    if revert_reference not in ("last", "best"):
        raise ValueError(f"revert_reference must be 'last' or 'best', got {revert_reference!r}.")
    ordered = sorted(results, key=lambda r: r.client_id)
    new = _fork(state, [r.client_id for r in ordered])
    new.round += 1
    before = state.expert_sets  # read only: `new` replaces entries, never edits them in place
    events: list[dict[str, Any]] = []
    for r in ordered:
        ev = _record(new, r)
        if ev is not None:
            events.append(ev)
    judged = {e["client_id"] for e in events}
    for r in ordered if stage2_adjust else []:
        cid = r.client_id
        if cid in new.frozen or cid in judged or new.stale[cid] < patience:
            continue
        others = {a: pa for a, pa in new.latest_p.items() if a != cid and a in before}
        if not others:
            continue
        top = cosine_top_k(new.latest_p[cid], others, top_k)
        p_hat = estimate_p_hat(top, others)
        mean_count = float(np.mean([expert_count(before[a]) for a, _ in top]))
        dense, eb = memory.costs(cid in new.checkpointing, cid)
        new_set, action = recommend(new.expert_sets[cid], p_hat, mean_count, eb, dense, memory.budgets[cid])
        action = {**action, "similar": top}
        ev = {"round": new.round, "client_id": cid, "kind": "adjust", **action}
        if new_set != new.expert_sets[cid]:
            ref = new.scores[cid][-1] if revert_reference == "last" else max(new.scores[cid])
            new.pending[cid] = PendingChange(new.expert_sets[cid], ref, new.round, action)
            new.expert_sets[cid] = new_set
            new.stale[cid] = 0
        else:
            ev["kind"] = "no_change"
        events.append(ev)
    new.events.extend(events)
    return new, events


def final_expert_sets(state: FedMoEServerState) -> dict[ClientId, ExpertSets]:
    """Each client's sub-MoE for the final model (test evaluation, export): its current set, except
    that a change still *pending* (made at the client's last participation and never judged at a
    later one) is left out and the set before it kept (choice: an exploratory change is part of
    the model only once its next participation has kept it; an unjudged change was never trained
    on the client and never compared with the score before it)."""
    return {cid: (state.pending[cid].previous_set if cid in state.pending else sets)
            for cid, sets in sorted(state.expert_sets.items())}


def expert_count_stats(state: FedMoEServerState) -> dict[str, float]:
    """Mean / min / max expert count over clients (paper's "expert numbers" metric)."""
    counts = [expert_count(s) for s in state.expert_sets.values()]
    if not counts:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(np.mean(counts)), "min": float(min(counts)), "max": float(max(counts))}
