"""PNG figures of the report (matplotlib, Agg backend; ``pip install 'fedmoe[report]'``).

* Figure 4 style: validation score vs round, one subplot per task, one line per method;
* Figure 1 style: heat maps of the expert activation probabilities p (MoE layer × expert),
  one panel per task and snapshot (after stage 1 / end of training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fedmoe.report.metrics import TASK_TITLE, Curve

SNAPSHOT_TITLE = {"after_stage1": "after stage 1", "end": "end of training"}


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (figures are skipped otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator


def plot_curves(curves: Mapping[str, Mapping[str, Curve]], tasks: Sequence[str], path: Path, title: str,
                dashed: Sequence[str] = (),
                bands: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]] | None = None) -> Path:
    """Score-vs-round curves: ``curves[method_title][task]``; methods in ``dashed`` are dashed;
    ``bands[method_title][task]`` = (round, low, high) points drawn as a shaded interval."""
    plt = _pyplot()
    MaxNLocator = _locator()  # noqa: N806
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rounds = [r for by_task in curves.values() for r, _ in by_task.get(task, [])]
        if rounds:
            pad = 0.5 if max(rounds) - min(rounds) >= 2 else 1.0  # ≥ 2 integer ticks even for one point
            ax.set_xlim(min(rounds) - pad, max(rounds) + pad)
        for method, by_task in curves.items():
            curve = by_task.get(task, [])
            if curve:
                xs, ys = zip(*curve, strict=True)
                line = ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, linewidth=1.4, label=method,
                               linestyle="--" if method in dashed else "-")[0]
                band = (bands or {}).get(method, {}).get(task, [])
                if band:
                    bx, lo, hi = zip(*band, strict=True)
                    ax.fill_between(bx, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(),
                                    alpha=0.15, linewidth=0)
        ax.set_title(TASK_TITLE.get(task, task))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation score (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(p: Mapping[str, Mapping[str, list[list[float]]]], tasks: Sequence[str], path: Path,
                  title: str) -> Path:
    """Heat maps of ``p[snapshot][task]`` ([layers][experts]); rows = snapshots, columns = tasks."""
    plt = _pyplot()
    MaxNLocator = _locator()  # noqa: N806
    snaps = [s for s in ("after_stage1", "end") if s in p] + [s for s in p if s not in ("after_stage1", "end")]
    fig, axes = plt.subplots(len(snaps), len(tasks), figsize=(3.8 * len(tasks) + 1.0, 3.0 * len(snaps)),
                             squeeze=False, layout="constrained")
    vmax = max((max(max(row) for row in m) for s in snaps for m in p[s].values() if m and m[0]), default=1.0)
    image = None
    for r, snap in enumerate(snaps):
        for c, task in enumerate(tasks):
            ax = axes[r][c]
            mat = p[snap].get(task)
            if not mat:
                ax.set_axis_off()
                ax.set_title(f"{TASK_TITLE.get(task, task)} — {SNAPSHOT_TITLE.get(snap, snap)}: no data", fontsize=8)
                continue
            image = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax or 1.0)
            ax.set_title(f"{TASK_TITLE.get(task, task).split()[0]} — {SNAPSHOT_TITLE.get(snap, snap)}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="activation probability p")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
