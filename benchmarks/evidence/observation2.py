"""Observation 2 (paper Fig. 2): is a sub-MoE of the task's most-used experts as good as the full MoE,
and better than random experts?

Per task and seed, three arms are fine-tuned centrally with the same steps on the same rows
and scored on the same evaluation rows:

* ``full``: the whole MoE (8 experts per layer);
* ``top``: the sub-MoE of the ``k`` experts per layer with the highest ``p`` (activation
  probabilities of the *untrained* model on the first 200 training rows, real tokens only);
* ``random``: ``k`` experts per layer drawn uniformly (a new draw per seed).

Sub-MoEs come from :func:`fedmoe.moe.slicing.extract`; fine-tuning is the project's client
path (:func:`fedmoe.moe.lora.apply_lora`: LoRA r=8 on attention and experts, router rows
and the task head trainable; :func:`fedmoe.train.loop.local_train`), scoring
:func:`fedmoe.train.evaluate.evaluate`. Data: the client pool of ``common.py`` (never in the
stand-in corpus), one fixed permutation: ``--train`` rows for training, the next ``--eval``
rows for evaluation (same for all arms and seeds).

Resumable: each finished cell is one JSON under ``results/observation2/<model>/<task>/``;
finished cells are skipped. ``--summary`` only (re)writes ``results/observation2.md``.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/evidence/observation2.py --task tc [--model DIR|minilm-moe-8e]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, RESULTS, ci95, client_pool, load_note, now, setup_threads

from fedmoe.config import DataConfig, TrainConfig
from fedmoe.data.tasks import get_task
from fedmoe.moe.lora import apply_lora
from fedmoe.moe.models import load_model
from fedmoe.moe.routing import activation_probabilities
from fedmoe.moe.slicing import extract
from fedmoe.train.batching import collate, model_inputs
from fedmoe.train.evaluate import evaluate
from fedmoe.train.loop import local_train

ARMS = ("full", "top", "random")
CPU = torch.device("cpu")


def data_split(data_dir: str, task: str, n_train: int, n_eval: int) -> tuple[list, list, str]:
    pool = client_pool(data_dir, task)
    order = np.random.default_rng(12345).permutation(len(pool))
    train = [pool[i] for i in order[:n_train]]
    rest = order[n_train:n_train + n_eval]
    note = "" if len(rest) == n_eval else f"only {len(rest)} evaluation rows available (asked {n_eval})"
    return train, [pool[i] for i in rest], note


def expert_sets(model, tok, task, train: list, arm: str, k: int, seed: int, data_cfg: DataConfig) -> list[list[int]]:
    n_layers, n_exp = 6, 8
    if arm == "full":
        return [list(range(n_exp))] * n_layers
    if arm == "random":
        rng = np.random.default_rng(1000 + seed)
        return [sorted(int(j) for j in rng.choice(n_exp, k, replace=False)) for _ in range(n_layers)]
    rows = train[:200]
    batches = (model_inputs(collate("encoder", task, rows[i:i + 16], tok, data_cfg.max_seq_len, data_cfg.max_target_len),
                            "encoder", CPU) for i in range(0, len(rows), 16))
    p = activation_probabilities(model, batches)
    return [sorted(int(j) for j in np.argsort(-p[i], kind="stable")[:k]) for i in range(p.shape[0])]


def run_cell(args, model_name: str, arm: str, seed: int, train: list, evals: list) -> dict:
    t0 = now()
    model, _, tok = load_model(model_name, seed=0)
    task = get_task(args.task)
    data_cfg = DataConfig(max_seq_len=args.max_len)
    kept = expert_sets(model, tok, task, train, arm, args.k, seed, data_cfg)
    sub = extract(model, kept).model if arm != "full" else model
    torch.manual_seed(seed)
    pm = apply_lora(sub, r=8, alpha=16)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch, local_epochs=args.epochs, max_local_steps=args.steps)
    res = local_train(pm, _family(pm), "encoder", task, train, tok, cfg, data_cfg, CPU, seed)
    t_train = now() - t0
    scores = evaluate(pm, "encoder", task, evals, tok, data_cfg, CPU, batch_size=64)
    return {"model": model_name, "task": args.task, "arm": arm, "seed": seed, "k": args.k, "kept": kept,
            "scores": scores, "metric": task.metric, "train_loss": res.loss, "steps": res.steps,
            "n_train": len(train), "n_eval": len(evals), "lr": args.lr, "batch": args.batch,
            "max_len": args.max_len, "train_seconds": round(t_train, 1),
            "seconds": round(now() - t0, 1), "threads": torch.get_num_threads(), "load": load_note()}


def _family(model):
    from fedmoe.moe.families import family_of

    return family_of(model)


def slug(name: str) -> str:
    if name == "minilm-moe-8e":
        return "plain"
    folder = Path(name).name
    return folder.replace("minilm-moe-8e-", "") if folder.startswith("standin") else re.sub(r"\W+", "_", name)[-40:]


def summarise(root: Path) -> str:
    lines = ["# Observation 2: full MoE vs top-k (by p) vs random-k sub-MoE", "",
             "Mean over seeds ± half-width of the 95 % t interval; paired differences per seed (same rows, same seed).", ""]
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for task_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            cells = [json.loads(f.read_text()) for f in sorted(task_dir.glob("*.json"))]
            if not cells:
                continue
            c0 = cells[0]
            by = {a: {c["seed"]: c["scores"][c["metric"]] for c in cells if c["arm"] == a} for a in ARMS}
            secs = sum(c["seconds"] for c in cells)
            lines += [f"## {model_dir.name} / {task_dir.name}", "",
                      f"k = {c0['k']} of 8 experts per layer; {c0['steps']} steps × batch {c0['batch']}, lr {c0['lr']}, "
                      f"{c0['n_train']} training rows, {c0['n_eval']} evaluation rows, max {c0['max_len']} tokens; "
                      f"{len(cells)} cells, {secs / 60:.1f} min in all ({c0['threads']} thread; last load: {cells[-1]['load']}).", "",
                      f"| arm | seeds | {c0['metric']} mean ± 95 % CI | per seed |", "|---|---|---|---|"]
            for a in ARMS:
                v = [by[a][s] for s in sorted(by[a])]
                if v:
                    m, h = ci95(v)
                    ci = f"± {100 * h:.2f}" if len(v) > 1 else "(1 seed: no CI)"
                    lines.append(f"| {a} | {len(v)} | {100 * m:.2f} {ci} | {' '.join(f'{100 * x:.2f}' for x in v)} |")
            for a, b in (("top", "random"), ("full", "top"), ("full", "random")):
                seeds = sorted(set(by[a]) & set(by[b]))
                if seeds:
                    d = [by[a][s] - by[b][s] for s in seeds]
                    m, h = ci95(d)
                    ci = f"± {100 * h:.2f}" if len(d) > 1 else "(1 seed: no CI)"
                    lines.append(f"| {a} − {b} (paired) | {len(d)} | {100 * m:+.2f} {ci} | "
                                 f"{' '.join(f'{100 * x:+.2f}' for x in d)} |")
            tops = sorted({json.dumps(c["kept"]) for c in cells if c["arm"] == "top"})
            lines += ["", f"top-{c0['k']} experts per layer (by p): {', '.join(tops)}", ""]
    return "\n".join(lines)


def figure(root: Path, path: Path) -> None:
    """Paper Fig. 2 style: mean score per arm (point) with its 95 % CI and the seeds' scores, one panel per model/task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [d for m in sorted(p for p in root.iterdir() if p.is_dir()) for d in sorted(m.iterdir()) if any(d.glob("*.json"))]
    if not groups:
        return
    # one panel per model/task, each with its own score axis (RC F1 and TS ROUGE-2 sit far below TC accuracy)
    fig, axes = plt.subplots(1, len(groups), figsize=(2.4 * len(groups) + 0.6, 3.2), squeeze=False)
    for ax, d in zip(axes[0], groups, strict=True):
        cells = [json.loads(f.read_text()) for f in d.glob("*.json")]
        tops = []
        for a, arm in enumerate(ARMS):
            v = [c["scores"][c["metric"]] for c in cells if c["arm"] == arm]
            if v:
                m, h = ci95(v)
                # points, not bars: each panel's axis starts near its scores, where bar lengths would mislead
                ax.errorbar(a, 100 * m, yerr=100 * h, fmt="o", capsize=4, color=f"C{a}", label=arm)
                ax.plot([a] * len(v), [100 * x for x in v], ".", color=f"C{a}", alpha=0.45)
                ax.text(a, 100 * (m + h), f"n={len(v)}", ha="center", va="bottom", fontsize=7)
                tops.append((100 * (m - h), 100 * (m + h)))
        lo, hi = min(t[0] for t in tops), max(t[1] for t in tops)
        pad = max(0.5, 0.25 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(range(len(ARMS)), ARMS, fontsize=7)
        ax.set_xlim(-0.6, len(ARMS) - 0.4)
        ax.set_title(f"{d.parent.name}\n{d.name} ({cells[0]['metric']})", fontsize=8)
    axes[0][0].set_ylabel("score (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--model", default=None, help="stand-in folder (default: build_standin's cache) or minilm-moe-8e")
    ap.add_argument("--task", default="tc", choices=("tc", "rc", "ts"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seeds", default="", help="comma-separated seeds this process runs (parallel parts)")
    ap.add_argument("--only-arms", default="", help="comma-separated arms this process runs (parallel parts)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--train", type=int, default=960)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--summary", action="store_true", help="only rewrite the summary from finished cells")
    args = ap.parse_args(argv)
    root = Path(args.out) / "observation2"
    if not args.summary:
        setup_threads()
        if args.model is None:
            import build_standin

            args.model = str(build_standin.main([]))
        train, evals, note = data_split(args.data_dir, args.task, args.train, args.eval)
        if note:
            print(note)
        cell_dir = root / slug(args.model) / f"{args.task}-k{args.k}"
        cell_dir.mkdir(parents=True, exist_ok=True)
        seeds = [int(x) for x in args.only_seeds.split(",") if x] or list(range(args.seeds))
        for seed in seeds:
            for arm in [a for a in args.only_arms.split(",") if a] or ARMS:
                f = cell_dir / f"{arm}-s{seed}.json"
                if f.is_file():
                    continue
                cell = run_cell(args, args.model, arm, seed, train, evals)
                f.write_text(json.dumps(cell, indent=1))
                print(f"{f.name}: {cell['scores']} in {cell['seconds']:.0f} s", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    text = summarise(root)
    (Path(args.out) / "observation2.md").write_text(text)
    figure(root, Path(args.out) / "observation2.png")
    print(text)


if __name__ == "__main__":
    main()
