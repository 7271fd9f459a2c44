"""Seed statistics of a powered comparison (issue #17): t intervals, paired differences,
recommendation actions and per-client communication / memory, all from run records.

Conventions (**choices**, repeated in the report):

* *mean ± h (n)*: mean over the ``n`` seeds and the half-width ``h`` of the two-sided 95 %
  Student-t interval, ``h = t(0.975, n−1) · s / √n`` with the sample std ``s`` (``ddof=1``);
  no interval for one seed;
* *paired difference* A − B on a task: per seed present in both, A's score − B's score; then
  the t interval of those differences (paired by seed: both runs share the seed's clients,
  data splits, budgets and sampling);
* the *best baseline* of a task is the Table-1 method other than the reference (FedMoE) with
  the highest seed-mean score; ablation variants are not baselines;
* per-client traffic sums a client's records over every round it took part in: *model bytes
  received* = one-time base weights (``bytes_down_base``), *trainable bytes per round* = the
  mean of its per-turn trainable download (``bytes_down``); *total* = base + trainable down +
  up. *One model transfer* (the paper's "Comm. Vol.", Table 1) = what a client receives at
  its first participation (base + trainable), i.e. the model it trains, sent once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with the half-width of its 95 % t interval (NaN when n < 2)."""

    mean: float
    half: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
        m = f"{self.mean * scale:+.{digits}f}" if sign else f"{self.mean * scale:.{digits}f}"
        if self.n < 2 or math.isnan(self.half):
            return f"{m} (n={self.n})"
        return f"{m} ± {self.half * scale:.{digits}f} (n={self.n})"

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely above or below 0 (never true for n < 2)."""
        return self.n >= 2 and not math.isnan(self.half) and abs(self.mean) > self.half


def t_quantile(q: float, df: int) -> float:
    """Quantile ``q`` of Student's t with ``df`` degrees of freedom."""
    from scipy import stats  # scipy comes with scikit-learn, a core dependency

    return float(stats.t.ppf(q, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and half-width of the two-sided ``level`` t interval (ValueError for no values)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("t_interval: no values.")
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return Interval(mu, math.nan, n)
    s = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))
    return Interval(mu, t_quantile(0.5 + level / 2, n - 1) * s / math.sqrt(n), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval | None:
    """t interval of ``a[seed] − b[seed]`` over the seeds in both (None when no seed is shared)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return t_interval([a[s] - b[s] for s in seeds], level)


def best_baseline(means: Mapping[str, float], reference: str, baselines: Sequence[str]) -> str | None:
    """The method in ``baselines`` (not ``reference``) with the highest mean; None when there is none."""
    cands = [m for m in baselines if m != reference and m in means and not math.isnan(means[m])]
    return max(cands, key=lambda m: (means[m], m)) if cands else None


def action_counts(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How often each structural action (``adjust``, ``no_change``, ``keep``, ``revert_and_freeze`` …)
    was logged in ``rounds.jsonl``; ``changed`` = adjust actions that added or removed experts."""
    c: Counter[str] = Counter()
    for r in rounds:
        for a in r.get("actions", []):
            kind = str(a.get("kind", "?"))
            c[kind] += 1
            if kind == "adjust" and (a.get("added") or a.get("removed")):
                c["changed"] += 1
    return dict(c)


@dataclass(frozen=True)
class ClientTraffic:
    """One client's communication and memory over a run."""

    client_id: int
    participations: int
    model_bytes: int  #: one-time base weights received (sum)
    trainable_down_per_round: float
    up_per_round: float
    total_bytes: int
    first_transfer: int  #: base + trainable received at the first participation
    peak_max: int
    budget: int
    over_budget: int  #: turns over budget


def client_traffic(rounds: Sequence[Mapping[str, Any]]) -> list[ClientTraffic]:
    """Per-client sums over the client records of ``rounds`` (clients with an ``error`` count too)."""
    per: dict[int, list[Mapping[str, Any]]] = {}
    for r in rounds:
        for c in r.get("clients", []):
            per.setdefault(int(c["client_id"]), []).append(c)
    out = []
    for cid in sorted(per):
        recs = per[cid]
        n = len(recs)
        base = sum(int(c.get("bytes_down_base", 0)) for c in recs)
        down = sum(int(c.get("bytes_down", 0)) for c in recs)
        up = sum(int(c.get("bytes_up", 0)) for c in recs)
        first = recs[0]
        out.append(ClientTraffic(
            cid, n, base, down / n, up / n, base + down + up,
            int(first.get("bytes_down_base", 0)) + int(first.get("bytes_down", 0)),
            max(int(c.get("peak_memory_bytes", 0)) for c in recs),
            max(int(c.get("budget_bytes", 0)) for c in recs),
            sum(bool(c.get("over_budget")) for c in recs)))
    return out
