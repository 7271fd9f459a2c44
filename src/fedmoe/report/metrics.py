"""Pure functions behind ``fedmoe report`` (docs/algorithms.md §6): every number in the report is
recomputed here from the records a run wrote (``rounds.jsonl`` rows and ``summary.json``),
passed in as plain dicts/lists. Nothing here reads files or plots.

Conventions (**choices**, documented once here and repeated in the report's notes):

* scores are the task's headline metric (:data:`MAIN_METRIC`: TC accuracy, RC F1, TS
  ROUGE-2), fractions in [0, 1];
* *mean ± std over seeds* uses the sample standard deviation (``ddof=1``; 0 for one seed);
* *c_v = σ/μ* across settings uses the population standard deviation (``ddof=0``), and
  CVI is the unweighted mean of c_v over the tasks present in at least two settings;
* the *score curve* of a task is, per round, the unweighted mean validation score of that
  task's clients that took part in the round (clients whose record has an ``error`` are
  left out); rounds where no client of the task took part have no point. Rounds are counted
  as *rounds completed* (``round + 1``), stage-1 rounds included;
* *wall time* to a round is the cumulative sum of the rounds' ``wall_time_s`` up to and
  including it (client training, aggregation and server logic; no setup or final test);
* curves of several seeds are averaged per round over the seeds that have a point there;
  wall times likewise;
* a method's *final score* on a task is the mean of the last ``window`` points of its curve
  (default 1: the last point); the *target* at level q is q × the best final score over
  the methods compared; *rounds to q* is the first round whose curve value is ≥ the target
  (``None`` if never reached);
* *speed-up* of a reference method over another = other's rounds (or seconds) / the
  reference's, so > 1 means the reference is faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: headline metric per task type (the paper's Table 1 columns)
MAIN_METRIC: dict[str, str] = {"tc": "accuracy", "rc": "f1", "ts": "rouge2"}
#: column titles of the headline metrics
TASK_TITLE: dict[str, str] = {"tc": "TC acc", "rc": "RC F1", "ts": "TS ROUGE-2"}
#: bytes per GB in the tables (decimal gigabytes, as in the paper)
GB: float = 1e9

Curve = list[tuple[int, float]]  #: (rounds completed, score), ascending rounds


@dataclass(frozen=True)
class MeanStd:
    """Mean and standard deviation of ``n`` values."""

    mean: float
    std: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """``mean ± std`` (just ``mean`` when n = 1), both multiplied by ``scale``."""
        if self.n <= 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def mean_std(values: Iterable[float], ddof: int = 1) -> MeanStd:
    """Mean and standard deviation (``ddof=1``: sample std; 0.0 for a single value).

    Raises ValueError for no values.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std: no values.")
    n = len(xs)
    mu = sum(xs) / n
    if n - ddof <= 0:
        return MeanStd(mu, 0.0, n)
    var = sum((x - mu) ** 2 for x in xs) / (n - ddof)
    return MeanStd(mu, math.sqrt(var), n)


def coefficient_of_variation(values: Iterable[float], ddof: int = 0) -> float:
    """c_v = σ/μ (``ddof=0``: population σ). NaN when the mean is 0 or there are no values."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan
    ms = mean_std(xs, ddof=ddof)
    return math.nan if ms.mean == 0 else ms.std / ms.mean


def cvi(scores_by_setting: Mapping[str, Mapping[str, float]], ddof: int = 0) -> tuple[float, dict[str, float]]:
    """Robustness index of one method: ``(CVI, {task: c_v})``.

    ``scores_by_setting``: setting → task → score. c_v of a task is taken across the settings
    that have it; tasks present in fewer than two settings are left out. CVI = mean c_v over
    the remaining tasks (NaN tasks, i.e. mean score 0, are left out of the mean; NaN if none).
    """
    by_task: dict[str, list[float]] = {}
    for scores in scores_by_setting.values():
        for task, v in scores.items():
            by_task.setdefault(task, []).append(float(v))
    per_task = {t: coefficient_of_variation(v, ddof) for t, v in sorted(by_task.items()) if len(v) >= 2}
    finite = [v for v in per_task.values() if not math.isnan(v)]
    return (sum(finite) / len(finite) if finite else math.nan), per_task


# -- curves ------------------------------------------------------------------------------


def task_curves(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Curve]:
    """Per task, the mean validation score of its clients in each round they took part in."""
    out: dict[str, Curve] = {}
    for rr in sorted(rounds, key=lambda r: int(r["round"])):
        by_task: dict[str, list[float]] = {}
        for c in rr.get("clients", []):
            if c.get("error"):
                continue
            by_task.setdefault(str(c["task"]), []).append(float(c["score"]))
        for task, scores in by_task.items():
            out.setdefault(task, []).append((int(rr["round"]) + 1, sum(scores) / len(scores)))
    return dict(sorted(out.items()))


def cumulative_wall(rounds: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Rounds completed → cumulative ``wall_time_s`` of all rounds up to and including it."""
    out: dict[int, float] = {}
    total = 0.0
    for rr in sorted(rounds, key=lambda r: int(r["round"])):
        total += float(rr.get("wall_time_s", 0.0))
        out[int(rr["round"]) + 1] = total
    return out


def average_curves(curves: Sequence[Curve]) -> Curve:
    """Per round, the mean over the curves that have a point at that round."""
    acc: dict[int, list[float]] = {}
    for curve in curves:
        for r, s in curve:
            acc.setdefault(int(r), []).append(float(s))
    return [(r, sum(v) / len(v)) for r, v in sorted(acc.items())]


def average_walls(walls: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Per round, the mean cumulative wall time over the runs that reached that round."""
    acc: dict[int, list[float]] = {}
    for w in walls:
        for r, t in w.items():
            acc.setdefault(int(r), []).append(float(t))
    return {r: sum(v) / len(v) for r, v in sorted(acc.items())}


def final_score(curve: Curve, window: int = 1) -> float:
    """Mean of the last ``window`` points of ``curve`` (ValueError if it is empty)."""
    if not curve:
        raise ValueError("final_score: empty curve.")
    if window < 1:
        raise ValueError(f"final_score: window must be >= 1, got {window}.")
    tail = curve[-window:]
    return sum(s for _, s in tail) / len(tail)


def rounds_to_reach(curve: Curve, target: float) -> int | None:
    """First round (rounds completed) whose score is ≥ ``target``; None if never."""
    for r, s in curve:
        if s >= target:
            return r
    return None


def speedup(reference: float | None, other: float | None) -> float | None:
    """``other / reference`` (> 1: the reference gets there faster); None when undefined."""
    if reference is None or other is None or reference <= 0:
        return None
    return other / reference


@dataclass
class Reach:
    """When one method reached one level on one task."""

    rounds: int | None
    wall_s: float | None


@dataclass
class TaskConvergence:
    """Convergence of several methods on one task (one setting)."""

    task: str
    best_method: str
    best_final: float
    finals: dict[str, float]
    #: level (e.g. 0.9) → method → reach
    reach: dict[float, dict[str, Reach]] = field(default_factory=dict)

    def target(self, level: float) -> float:
        return level * self.best_final


def convergence(
    curves: Mapping[str, Curve],
    walls: Mapping[str, Mapping[int, float]],
    levels: Sequence[float] = (0.9, 0.99),
    window: int = 1,
) -> TaskConvergence | None:
    """Rounds and wall time for each method to reach ``level`` × the best final score.

    ``curves``: method → score curve of one task; ``walls``: method → cumulative wall time
    per round (:func:`cumulative_wall` / :func:`average_walls`). Methods with an empty curve
    are ignored; returns None when no method has a point. Ties for the best final score go
    to the method listed first.
    """
    finals = {m: final_score(c, window) for m, c in curves.items() if c}
    if not finals:
        return None
    best = max(finals, key=lambda m: finals[m])  # max keeps the first of equal values
    result = TaskConvergence(task="", best_method=best, best_final=finals[best], finals=finals)
    for q in levels:
        target = q * finals[best]
        row: dict[str, Reach] = {}
        for m in finals:
            r = rounds_to_reach(curves[m], target)
            row[m] = Reach(r, None if r is None else walls.get(m, {}).get(r))
        result.reach[q] = row
    return result


# -- summaries ---------------------------------------------------------------------------


def main_score(summary: Mapping[str, Any], task: str) -> float | None:
    """The headline test score of ``task`` in a ``summary.json`` dict (None if absent)."""
    scores = summary.get("scores", {}).get(task)
    if not scores:
        return None
    key = MAIN_METRIC.get(task)
    if key is None or key not in scores:
        key = next(iter(scores))
    return float(scores[key])


def comm_bytes(summary: Mapping[str, Any]) -> int:
    """Total communication of a run: one-time base weights + per-round down + up."""
    return int(summary.get("bytes_down_base", 0)) + int(summary.get("bytes_down", 0)) + int(summary.get("bytes_up", 0))


def expert_numbers(summaries: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Expert numbers over seeds: mean of the per-run averages at start and end; min / max:
    the extremes of the per-run end min / max. None when no run recorded end counts."""
    ends = [s.get("experts_end") or {} for s in summaries]
    starts = [s.get("experts_start") or {} for s in summaries]
    if not any("mean" in e for e in ends):
        return None
    out: dict[str, float] = {
        "end_mean": mean_std(e["mean"] for e in ends if "mean" in e).mean,
        "end_min": min(float(e["min"]) for e in ends if "min" in e),
        "end_max": max(float(e["max"]) for e in ends if "max" in e),
    }
    s_means = [float(s["mean"]) for s in starts if "mean" in s]
    out["start_mean"] = mean_std(s_means).mean if s_means else math.nan
    return out


def mean_matrix(mats: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Element-wise mean of equally shaped matrices (ValueError if shapes differ or none)."""
    if not mats:
        raise ValueError("mean_matrix: no matrices.")
    shape = (len(mats[0]), len(mats[0][0]) if mats[0] else 0)
    for m in mats:
        if (len(m), len(m[0]) if m else 0) != shape or any(len(row) != shape[1] for row in m):
            raise ValueError("mean_matrix: matrices of different shapes.")
    n = len(mats)
    return [[sum(float(m[i][j]) for m in mats) / n for j in range(shape[1])] for i in range(shape[0])]
