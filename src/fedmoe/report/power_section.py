"""The report's powered-comparison section: per-task mean ± 95 % t interval with seed counts,
paired differences of the reference method (FedMoE) against every other method (the best
baseline marked), recommendation actions, and per-client communication / memory on the
paper's terms and ours. Numbers come from :mod:`fedmoe.report.power`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fedmoe.report import metrics as M
from fedmoe.report import power as P
from fedmoe.report.load import SETTING_ORDER, Group, method_order, method_title, setting_title

MB = 2**20


def _is_table1(method: str) -> bool:
    return "/" not in method


def _scores_by_seed(g: Group, task: str) -> dict[int, float]:
    return {r.seed: v for r in g.runs if (v := M.main_score(r.summary, task)) is not None}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def curve_bands(g: Group) -> dict[str, list[tuple[int, float, float]]]:
    """Per task, (round, low, high) of the 95 % t interval over seeds of the per-seed curve values
    at each round where at least two seeds have a point (the band drawn around Fig. 4 curves)."""
    per_seed = [M.task_curves(r.rounds) for r in g.runs]
    out: dict[str, list[tuple[int, float, float]]] = {}
    for t in sorted({t for c in per_seed for t in c}):
        by_round: dict[int, list[float]] = {}
        for c in per_seed:
            for rnd, v in c.get(t, []):
                by_round.setdefault(rnd, []).append(v)
        pts = [(rnd, P.t_interval(vs)) for rnd, vs in sorted(by_round.items()) if len(vs) >= 2]
        if pts:
            out[t] = [(rnd, iv.mean - iv.half, iv.mean + iv.half) for rnd, iv in pts]
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def power_section(groups: Sequence[Group], tasks: Sequence[str], reference: str = "fedmoe",
                  title_suffix: str = "") -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and JSON data of the section, for the groups of one model."""
    md = [f"## Powered comparison: 95 % confidence intervals and paired differences{title_suffix}", "",
          "Test score in % (headline metric per task), mean ± half-width of the 95 % Student-t interval over "
          "seeds, `n` = number of seeds. Paired difference = per seed, the reference's score − the other "
          "method's (same clients, splits, budgets and sampling), then the t interval of those differences; "
          "**bold** when the interval excludes 0. Best baseline = the Table-1 method other than "
          f"{method_title(reference)} with the highest mean on that task (ablation variants are not baselines).", ""]
    data: dict[str, Any] = {}
    settings = sorted({g.setting for g in groups}, key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER
                                                                   else len(SETTING_ORDER), s))
    for s in settings:
        sg = sorted([g for g in groups if g.setting == s], key=lambda g: method_order(g.method))
        by_m = {g.method: g for g in sg}
        sd: dict[str, Any] = {"scores": {}, "paired": {}, "best_baseline": {}, "actions": {}, "traffic": {}}
        md += [f"### {setting_title(s)}", ""]
        rows = []
        for g in sg:
            cells = []
            for t in tasks:
                sc = _scores_by_seed(g, t)
                iv = P.t_interval(list(sc.values())) if sc else None
                sd["scores"].setdefault(g.method, {})[t] = None if iv is None else {
                    "mean": iv.mean, "half": iv.half if iv.n > 1 else None, "n": iv.n, "by_seed": sc}
                cells.append("—" if iv is None else iv.fmt(100))
            rows.append([method_title(g.method), *cells])
        md += _table(["Method", *[M.TASK_TITLE.get(t, t) for t in tasks]], rows) + [""]
        if reference in by_m:
            others = [g.method for g in sg if g.method != reference]
            baselines = [m for m in others if _is_table1(m)]
            rows = []
            for t in tasks:
                ref = _scores_by_seed(by_m[reference], t)
                means = {m: _mean(list(_scores_by_seed(by_m[m], t).values())) for m in others}
                best = P.best_baseline(means, reference, baselines)
                sd["best_baseline"][t] = best
                cells = []
                for m in others:
                    d = P.paired_difference(ref, _scores_by_seed(by_m[m], t))
                    sd["paired"].setdefault(m, {})[t] = None if d is None else {
                        "mean": d.mean, "half": d.half if d.n > 1 else None, "n": d.n}
                    txt = "—" if d is None else d.fmt(100, sign=True)
                    if d is not None and d.excludes_zero:
                        txt = f"**{txt}**"
                    cells.append(txt + (" ← best baseline" if m == best else ""))
                rows.append([M.TASK_TITLE.get(t, t), *cells])
            md += [f"Paired difference {method_title(reference)} − method (points):", ""]
            md += _table(["Task", *[method_title(m) for m in others]], rows) + [""]
        # recommendation actions ---------------------------------------------------------
        act_rows = []
        for g in sg:
            counts = [P.action_counts(r.rounds) for r in g.runs]
            kinds = sorted({k for c in counts for k in c})
            sd["actions"][g.method] = {str(r.seed): c for r, c in zip(g.runs, counts, strict=True)}
            if kinds:
                act_rows.append([method_title(g.method), ", ".join(f"{k} {sum(c.get(k, 0) for c in counts)}"
                                                                  for k in kinds), str(len(g.runs))])
        if act_rows:
            md += ["Structural actions logged in `rounds.jsonl` (summed over seeds; `adjust` = a stage-2 "
                   "recommendation, `changed` = one that added or removed experts, `no_change` = recommendation "
                   "left the set as it was, `keep` / `revert_and_freeze` = the judgement of an earlier change "
                   "at the client's next participation):", ""]
            md += _table(["Method", "Actions", "Seeds"], act_rows) + [""]
        # communication and memory per client --------------------------------------------
        rows = []
        for g in sg:
            tr = [c for r in g.runs for c in P.client_traffic(r.rounds)]
            if not tr:
                continue
            part = [c.participations for c in tr]
            peak_ratio = [c.peak_max / c.budget for c in tr if c.budget and c.peak_max]
            row = {
                "participations_min": min(part), "participations_mean": _mean(part),
                "one_model_mb": _mean([c.first_transfer / MB for c in tr]),
                "model_mb": _mean([c.model_bytes / MB for c in tr]),
                "trainable_down_mb_per_round": _mean([c.trainable_down_per_round / MB for c in tr]),
                "up_mb_per_round": _mean([c.up_per_round / MB for c in tr]),
                "total_mb": _mean([c.total_bytes / MB for c in tr]),
                "peak_mb_max": max(c.peak_max for c in tr) / MB,
                "peak_over_budget_max": max(peak_ratio) if peak_ratio else None,
                "over_budget_turns": sum(c.over_budget for c in tr),
            }
            sd["traffic"][g.method] = row
            ratio = "n/m" if row["peak_over_budget_max"] is None else f"{row['peak_over_budget_max']:.2f}"
            rows.append([method_title(g.method), f"{row['participations_min']} / {row['participations_mean']:.1f}",
                         f"{row['one_model_mb']:.1f}", f"{row['model_mb']:.1f}",
                         f"{row['trainable_down_mb_per_round']:.2f}", f"{row['up_mb_per_round']:.2f}",
                         f"{row['total_mb']:.1f}", f"{row['peak_mb_max']:.0f}", ratio, str(row["over_budget_turns"])])
        if rows:
            md += ["Per client (mean over clients and seeds; MiB = 2²⁰ B). *One model* = what a client receives at "
                   "its first participation (base weights + trainable tensors): the paper's Table 1 \"Comm. Vol.\" "
                   "counts one such model transfer. *Model received* = all one-time base weights a client got "
                   "(more than one model when recommendations add experts); *trainable ↓ / ↑ per round* = the "
                   "tensors exchanged each participation; *total* = model received + all trainable traffic, both "
                   "ways. Peak = measured peak of a turn; peak / budget = the largest ratio of any turn.", ""]
            md += _table(["Method", "Participations min / mean", "One model MiB (paper's Comm.)", "Model received MiB",
                          "Trainable ↓ MiB / round", "↑ MiB / round", "Total MiB", "Peak max MiB",
                          "Peak / budget max", "Over-budget turns"], rows) + [""]
        data[s] = sd
    return md, data
