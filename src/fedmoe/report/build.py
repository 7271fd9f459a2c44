"""``fedmoe report``: the paper's tables and figures rebuilt from run directories.

:func:`build_report` reads finished runs, groups them by (model, setting, method variant)
and seeds, computes every number with :mod:`fedmoe.report.metrics`, and writes
``report.md`` (Tables 1 and 2, communication breakdown, convergence speed-ups, CVI),
``report.json`` (the same numbers, machine-readable) and PNG figures under ``figures/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.report import metrics as M
from fedmoe.report.figures import SNAPSHOT_TITLE, matplotlib_available, plot_curves, plot_heatmaps
from fedmoe.report.load import (
    ABLATIONS,
    SETTING_SHORT,
    Group,
    ReportError,
    find_run_dirs,
    group_runs,
    load_run,
    method_order,
    method_title,
    setting_order,
    setting_title,
)
from fedmoe.report.power_section import curve_bands, power_section

TASK_ORDER = ("tc", "rc", "ts")
LEVELS = (0.9, 0.99)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    markdown: Path
    json: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tasks(groups: Sequence[Group]) -> list[str]:
    found = {t for g in groups for r in g.runs for t in r.summary.get("scores", {})}
    return [t for t in TASK_ORDER if t in found] + sorted(found - set(TASK_ORDER))


def _is_table1(method: str) -> bool:
    return "/" not in method


def _ms(values: list[float]) -> M.MeanStd | None:
    return M.mean_std(values) if values else None


def _cell(ms: M.MeanStd | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if ms is None else ms.fmt(scale, digits)


def group_stats(g: Group, tasks: Sequence[str]) -> dict[str, Any]:
    """Seed statistics of one group: scores, bytes, memory, expert numbers."""
    sums = [r.summary for r in g.runs]
    scores = {t: _ms([v for s in sums if (v := M.main_score(s, t)) is not None]) for t in tasks}
    return {
        "scores": scores,
        "comm_gb": _ms([M.comm_bytes(s) / M.GB for s in sums]),
        "base_gb": _ms([int(s.get("bytes_down_base", 0)) / M.GB for s in sums]),
        "down_gb": _ms([int(s.get("bytes_down", 0)) / M.GB for s in sums]),
        "up_gb": _ms([int(s.get("bytes_up", 0)) / M.GB for s in sums]),
        "mem_max_gb": _ms([float(s.get("peak_memory_max", 0)) / M.GB for s in sums]),
        "mem_mean_gb": _ms([float(s.get("peak_memory_mean", 0)) / M.GB for s in sums]),
        "experts": M.expert_numbers(sums),
        "seeds": g.seeds,
    }


def group_curves(g: Group) -> tuple[dict[str, M.Curve], dict[int, float]]:
    """Seed-averaged score curves per task and cumulative wall time per round."""
    per_seed = [M.task_curves(r.rounds) for r in g.runs]
    tasks = sorted({t for c in per_seed for t in c})
    curves = {t: M.average_curves([c[t] for c in per_seed if t in c]) for t in tasks}
    return curves, M.average_walls([M.cumulative_wall(r.rounds) for r in g.runs])


def group_p(g: Group) -> tuple[dict[str, dict[str, list[list[float]]]] | None, str]:
    """Seed-mean ``p_by_task`` of a group; ``(None, why)`` when no run logged it."""
    logged = [r.p_by_task for r in g.runs if r.p_by_task]
    if not logged:
        return None, "no p_by_task.json"
    out: dict[str, dict[str, list[list[float]]]] = {}
    for snap in sorted({s for p in logged for s in p}):
        for task in sorted({t for p in logged for t in p.get(snap, {})}):
            mats = [p[snap][task] for p in logged if task in p.get(snap, {}) and p[snap][task]]
            if not mats:
                continue
            try:
                out.setdefault(snap, {})[task] = M.mean_matrix(mats)
            except ValueError:
                out.setdefault(snap, {})[task] = mats[0]
    return (out or None), ("" if out else "p_by_task.json is empty")


def _mem(ms: M.MeanStd | None) -> str:
    """Memory cell; ``n/m`` (not measured) when every seed recorded 0 bytes."""
    if ms is not None and ms.mean == 0 and ms.std == 0:
        return "n/m"
    return _cell(ms, 1, 3)


def _fmt_reach(reach: M.Reach) -> str:
    if reach.rounds is None:
        return "not reached"
    wall = "" if reach.wall_s is None else f" / {reach.wall_s:.1f} s"
    return f"{reach.rounds} r{wall}"


def _fmt_speed(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def _section(model: str, groups: list[Group], tasks: list[str], out: Path, fig_dir: Path, *, window: int,
             reference: str, figures: bool, title_suffix: str, slug: str) -> tuple[list[str], dict[str, Any], list[Path]]:
    md: list[str] = []
    data: dict[str, Any] = {"model": model, "settings": {}}
    made: list[Path] = []
    stats = {(g.setting, g.method): group_stats(g, tasks) for g in groups}
    settings = sorted({g.setting for g in groups}, key=setting_order)
    t1_methods = sorted({g.method for g in groups if _is_table1(g.method)}, key=method_order)

    # Table 1 ----------------------------------------------------------------------------
    md += [f"## Table 1 — end-to-end performance{title_suffix}", "",
           "Scores: headline test metric in % (TC accuracy, RC F1, TS ROUGE-2), example-weighted over clients; "
           "Comm.: total bytes down (one-time base weights + per-round trainable tensors) + up, in GB (10⁹ B); "
           "Mem.: peak memory of a client's local step, max over clients, in GB (n/m: not measured, "
           "`engine.measure_memory=false`). "
           "`mean ± std` over seeds (sample std) where a cell has several seeds.", ""]
    header = ["Method"]
    for s in settings:
        short = SETTING_SHORT.get(s, s)
        header += [f"{short} {M.TASK_TITLE.get(t, t)}" for t in tasks] + [f"{short} Comm. GB", f"{short} Mem. GB"]
    rows = []
    for m in t1_methods:
        row = [method_title(m)]
        for s in settings:
            st = stats.get((s, m))
            if st is None:
                row += ["—"] * (len(tasks) + 2)
                continue
            row += [_cell(st["scores"][t], 100) for t in tasks]
            row += [_cell(st["comm_gb"], 1, 4), _mem(st["mem_max_gb"])]
        rows.append(row)
    md += _table(header, rows)
    md += ["", "Settings: " + ", ".join(f"{SETTING_SHORT.get(s, s)} = {setting_title(s)}" for s in settings)
           + ". Seeds per cell: "
           + ", ".join(f"{SETTING_SHORT.get(g.setting, g.setting)}/{method_title(g.method)} {g.seeds}"
                       for g in groups if _is_table1(g.method)) + ".", ""]

    # communication breakdown -------------------------------------------------------------
    md += [f"### Communication and memory breakdown{title_suffix}", ""]
    rows = []
    for g in groups:
        st = stats[(g.setting, g.method)]
        rows.append([setting_title(g.setting), method_title(g.method), _cell(st["base_gb"], 1, 4),
                     _cell(st["down_gb"], 1, 4), _cell(st["up_gb"], 1, 4), _cell(st["comm_gb"], 1, 4),
                     _mem(st["mem_max_gb"]), _mem(st["mem_mean_gb"]), str(len(g.runs))])
    md += _table(["Setting", "Method", "Base (one-time) GB", "Down GB", "Up GB", "Total GB", "Mem. max GB",
                  "Mem. mean GB", "Seeds"], rows) + [""]

    # Table 2 ------------------------------------------------------------------------------
    ablation = [g for g in groups if g.method in ABLATIONS]
    if any(g.method != "fedmoe" for g in ablation):
        md += [f"## Table 2 — ablation{title_suffix}", "",
               "w/o stage 1: random initial expert sets under the same budget (`fedmoe.stage1=false`); "
               "w/o stage 2: no expert recommendation (`fedmoe.stage2_adjust=false`). Expert numbers: "
               "experts per client summed over layers, average over clients at the start of stage 2 → end "
               "(mean over seeds), and min/max at the end (extremes over seeds).", ""]
        rows = []
        for s in settings:
            for m in ABLATIONS:
                st = stats.get((s, m))
                if st is None:
                    continue
                ex = st["experts"]
                nums = "—" if ex is None else f"{ex['start_mean']:.1f} → {ex['end_mean']:.1f}"
                rng = "—" if ex is None else f"{ex['end_min']:.0f} / {ex['end_max']:.0f}"
                rows.append([setting_title(s), method_title(m)] + [_cell(st["scores"][t], 100) for t in tasks]
                            + [nums, rng])
        md += _table(["Setting", "Variant"] + [M.TASK_TITLE.get(t, t) for t in tasks]
                     + ["Experts avg start → end", "Experts min / max (end)"], rows) + [""]
    else:
        md += [f"## Table 2 — ablation{title_suffix}", "",
               "No ablation runs (`fedmoe.stage1=false` / `fedmoe.stage2_adjust=false`) among the inputs.", ""]

    # confidence intervals, paired differences, actions, per-client comm./mem. ------------------
    sec, data["power"] = power_section(groups, tasks, reference, title_suffix)
    md += sec

    # convergence --------------------------------------------------------------------------
    md += [f"## Convergence{title_suffix}", "",
           "Per-round validation score = unweighted mean over the task's clients sampled in that round "
           "(seed-averaged per round); rounds counted as rounds completed, stage-1 rounds included; wall time "
           "= cumulative round wall time. Target = level × the best method's final score (mean of the last "
           f"{window} point(s) of its curve). Speed-up of {method_title(reference)} = other's rounds (time) / "
           f"{method_title(reference)}'s; > 1 means {method_title(reference)} is faster.", ""]
    curves_by_setting: dict[str, dict[str, dict[str, M.Curve]]] = {}
    for s in settings:
        sgroups = [g for g in groups if g.setting == s]
        cw = {g.method: group_curves(g) for g in sgroups}
        curves_by_setting[s] = {g.method: cw[g.method][0] for g in sgroups}
        methods = [g.method for g in sgroups if _is_table1(g.method)]
        conv_rows, speed_rows, conv_data = [], [], {}
        ref = reference if reference in methods else (methods[0] if methods else reference)
        others = [m for m in methods if m != ref]
        for t in tasks:
            conv = M.convergence({m: cw[m][0].get(t, []) for m in methods}, {m: cw[m][1] for m in methods},
                                 LEVELS, window)
            if conv is None:
                continue
            conv.task = t
            if conv.best_final <= 0:
                conv_rows.append([M.TASK_TITLE.get(t, t), "—", "0.00"] + ["best final score is 0"] * len(methods))
                continue
            conv_data[t] = {
                "best_method": conv.best_method, "best_final": conv.best_final, "finals": conv.finals,
                "levels": {str(q): {m: {"rounds": r.rounds, "wall_s": r.wall_s} for m, r in conv.reach[q].items()}
                           for q in LEVELS},
            }
            for q in LEVELS:
                reach = conv.reach[q]
                conv_rows.append([M.TASK_TITLE.get(t, t), f"{q:.0%}", f"{100 * conv.target(q):.2f}"]
                                 + [_fmt_reach(reach[m]) if m in reach else "—" for m in methods])
                if ref in reach:
                    cells = []
                    for o in others:
                        if o not in reach:
                            cells.append("—")
                            continue
                        sr = M.speedup(reach[ref].rounds, reach[o].rounds)
                        sw = M.speedup(reach[ref].wall_s, reach[o].wall_s)
                        cells.append(f"{_fmt_speed(sr)} / {_fmt_speed(sw)}")
                    speed_rows.append([M.TASK_TITLE.get(t, t), f"{q:.0%}"] + cells)
                    conv_data[t].setdefault("speedup", {})[str(q)] = {
                        o: {"rounds": M.speedup(reach[ref].rounds, reach[o].rounds) if o in reach else None,
                            "wall": M.speedup(reach[ref].wall_s, reach[o].wall_s) if o in reach else None}
                        for o in others}
        data["settings"].setdefault(s, {})["convergence"] = conv_data
        if not conv_rows:
            continue
        md += [f"### {setting_title(s)}", ""]
        md += _table(["Task", "Level", "Target (%)"] + [method_title(m) for m in methods], conv_rows) + [""]
        if others and speed_rows:
            md += [f"Speed-up of {method_title(ref)} (rounds / wall time):", ""]
            md += _table(["Task", "Level"] + [f"vs {method_title(o)}" for o in others], speed_rows) + [""]

    # CVI ----------------------------------------------------------------------------------
    md += [f"## Robustness (CVI){title_suffix}", ""]
    if len(settings) < 2:
        md += ["CVI needs runs of one method in at least two settings.", ""]
    else:
        md += ["c_v = σ/μ (population σ) of a task's score across settings (seed means); CVI = mean c_v over "
               "tasks. Lower is more robust.", ""]
        rows = []
        for m in sorted({g.method for g in groups}, key=method_order):
            by_setting = {s: {t: st["scores"][t].mean for t in tasks if st["scores"][t] is not None}
                          for s in settings if (st := stats.get((s, m))) is not None}
            value, per_task = M.cvi(by_setting)
            data.setdefault("cvi", {})[m] = {"cvi": _finite(value),
                                             "per_task": {t: _finite(v) for t, v in per_task.items()},
                                             "settings": sorted(by_setting, key=setting_order)}
            rows.append([method_title(m)] + [("—" if t not in per_task or math.isnan(per_task[t])
                                              else f"{per_task[t]:.4f}") for t in tasks]
                        + ["—" if math.isnan(value) else f"{value:.4f}", str(len(by_setting))])
        md += _table(["Method"] + [f"c_v {M.TASK_TITLE.get(t, t).split()[0]}" for t in tasks] + ["CVI", "Settings"],
                     rows) + [""]

    # figures ------------------------------------------------------------------------------
    md += [f"## Figures{title_suffix}", ""]
    if not figures:
        md += ["Figures skipped: matplotlib is not installed (`pip install 'fedmoe[report]'`).", ""]
    else:
        for s in settings:
            curves = {method_title(m): c for m, c in sorted(curves_by_setting[s].items(), key=lambda kv: method_order(kv[0]))}
            bands = {method_title(g.method): curve_bands(g) for g in groups if g.setting == s}
            path = plot_curves(curves, tasks, fig_dir / f"fig4_{slug}{s}.png",
                               f"Validation score vs round — {setting_title(s)} (bands: 95 % t interval over seeds)",
                               dashed=[method_title(m) for m in curves_by_setting[s] if not _is_table1(m)], bands=bands)
            made.append(path)
            md += [f"Figure 4-style, {setting_title(s)}:", "", f"![score vs round]({path.relative_to(out).as_posix()})", ""]
        missing = []
        for g in groups:
            p, why = group_p(g)
            if p is None:
                missing.append(f"{setting_title(g.setting)}/{method_title(g.method)} ({why})")
                continue
            path = plot_heatmaps(p, tasks, fig_dir / f"fig1_{slug}{g.setting}_{g.method.replace('/', '_')}.png",
                                 f"Expert activation p — {method_title(g.method)}, {setting_title(g.setting)}")
            made.append(path)
            md += [f"Figure 1-style, {method_title(g.method)}, {setting_title(g.setting)} "
                   f"(per-task mean p over clients' latest reports; rows: "
                   f"{', '.join(SNAPSHOT_TITLE.get(s, s) for s in p)}):", "",
                   f"![p heat map]({path.relative_to(out).as_posix()})", ""]
        if missing:
            md += ["Heat maps need `p` logging (`p_by_task.json` in the run directory, written by the engine); "
                   "skipped for: " + "; ".join(missing) + ".", ""]

    for s in settings:
        data["settings"].setdefault(s, {})["methods"] = {
            m: _stats_json(stats[(s2, m)]) for (s2, m) in stats if s2 == s}
    return md, data, made


def _stats_json(st: dict[str, Any]) -> dict[str, Any]:
    def ms(x: M.MeanStd | None) -> dict[str, float] | None:
        return None if x is None else {"mean": x.mean, "std": x.std, "n": x.n}

    return {"scores": {t: ms(v) for t, v in st["scores"].items()},
            **{k: ms(st[k]) for k in ("comm_gb", "base_gb", "down_gb", "up_gb", "mem_max_gb", "mem_mean_gb")},
            "experts": st["experts"], "seeds": st["seeds"]}


def build_report(paths: Sequence[str | Path], out: str | Path, *, window: int = 1, reference: str = "fedmoe",
                 figures: bool = True) -> Report:
    """Read the runs at or below ``paths`` and write ``out/report.md``, ``out/report.json``
    and ``out/figures/*.png``. Raises :class:`ReportError` when there is nothing to report."""
    if window < 1:
        raise ReportError(f"--final-window must be >= 1, got {window}.", "use 1 (the last point) or more.")
    dirs, notes = find_run_dirs([Path(p) for p in paths])
    if not dirs:
        raise ReportError(f"No finished run directory (with summary.json) at or below {', '.join(map(str, paths))}.",
                          "pass directories written by `fedmoe run --out DIR`.")
    runs = []
    for d in dirs:  # one broken folder must not sink the report: it is named in the notes
        try:
            r = load_run(d)
            if not isinstance(r.summary, dict) or not isinstance(r.summary.get("scores"), dict):
                raise ReportError(f"{d / 'summary.json'} has no `scores` table.")
            runs.append(r)
        except ReportError as exc:
            notes.append(f"skipped broken run {d}: {str(exc).splitlines()[0]}")
    if not runs:
        raise ReportError(f"No readable run directory at or below {', '.join(map(str, paths))} ({'; '.join(notes)}).",
                          "re-run those cells or pass other directories.")
    groups, gnotes = group_runs(runs)
    notes += gnotes
    out_dir = Path(out)
    fig_dir = out_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    can_plot = figures and matplotlib_available()
    models = sorted({g.model for g in groups})
    md = ["# FedMoE benchmark report", "",
          f"{len(runs)} finished run(s) in {len(groups)} cell(s) (setting × method); "
          f"model(s): {', '.join(f'`{m}`' for m in models)}. All numbers are recomputed from each run's "
          "`rounds.jsonl` and `summary.json` by `fedmoe.report.metrics`.", ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    data: dict[str, Any] = {"runs": [str(r.path) for r in runs], "notes": notes, "models": {}}
    made: list[Path] = []
    for model in models:
        mg = [g for g in groups if g.model == model]
        suffix = f" — `{model}`" if len(models) > 1 else ""
        slug = (model.replace("/", "_") + "_") if len(models) > 1 else ""
        sec, sdata, figs = _section(model, mg, _tasks(mg), out_dir, fig_dir, window=window, reference=reference,
                                    figures=can_plot, title_suffix=suffix, slug=slug)
        md += sec
        data["models"][model] = sdata
        made += figs
    md += ["## Inputs", ""] + [f"- `{r.path}` — {r.setting}, {method_title(r.method)}, seed {r.seed}" for r in runs] + [""]
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text("\n".join(md) + "\n")
    json_path.write_text(json.dumps(data, indent=1, default=str))
    return Report(md_path, json_path, made, notes)
