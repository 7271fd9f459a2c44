"""Observation 1 (paper Fig. 1): do tasks activate different experts?

For each model (the plain upcycled preset ``minilm-moe-8e`` and the stand-in of
``build_standin.py``) and each task, the activation map ``p`` (layers × experts: share of
the top-2 choices of REAL tokens — padding excluded via the attention mask, by
:class:`fedmoe.moe.routing.RoutingStats`) on client-pool examples that the
stand-in never saw, fed exactly as a client feeds them (``fedmoe.train.batching.collate``).

Reported per layer: Jensen–Shannon divergence (bits) between every pair of tasks, the
split-half JS of each task with itself (two disjoint halves of its examples: the noise
floor), and the overlap of two tasks' top-4 experts. Writes ``results/observation1.json``,
``results/observation1.md`` and ``results/observation1.png``.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/evidence/observation1.py [--standin DIR] [--per-task 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, RESULTS, client_pool, load_note, now, setup_threads

from fedmoe.config import DataConfig
from fedmoe.data.tasks import get_task
from fedmoe.moe.models import load_model
from fedmoe.moe.routing import RoutingStats
from fedmoe.train.batching import collate, model_inputs

TASKS = ("tc", "rc", "ts")
TOPK = 4


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def sample(data_dir: str, task: str, n: int, seed: int) -> list:
    pool = client_pool(data_dir, task)
    idx = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in sorted(idx)]


def counts(model, tok, task: str, examples: list, max_len: int, batch: int = 16) -> np.ndarray:
    """Top-k choice counts of real tokens, layers × experts (``RoutingStats``, padding masked)."""
    t = get_task(task)
    cfg = DataConfig(max_seq_len=max_len)
    with RoutingStats(model) as stats, torch.no_grad():
        for i in range(0, len(examples), batch):
            b = model_inputs(collate("encoder", t, examples[i:i + batch], tok, cfg.max_seq_len, cfg.max_target_len),
                             "encoder", torch.device("cpu"))
            stats.token_masks = [b["attention_mask"]]
            model(**b)
    return stats.counts.copy()


def norm(c: np.ndarray) -> np.ndarray:
    return c / c.sum(axis=1, keepdims=True)


def analyse(p: dict[str, dict[str, np.ndarray]]) -> dict:
    full = p["full"]
    layers = next(iter(full.values())).shape[0]
    out: dict = {"js_between": {}, "js_split_half": {}, "topk_overlap": {}}
    for a, b in itertools.combinations(TASKS, 2):
        out["js_between"][f"{a}-{b}"] = [js_bits(full[a][i], full[b][i]) for i in range(layers)]
        ta = [set(np.argsort(-full[a][i])[:TOPK]) for i in range(layers)]
        tb = [set(np.argsort(-full[b][i])[:TOPK]) for i in range(layers)]
        out["topk_overlap"][f"{a}-{b}"] = [len(x & y) for x, y in zip(ta, tb, strict=True)]
    for t in TASKS:
        out["js_split_half"][t] = [js_bits(p["half0"][t][i], p["half1"][t][i]) for i in range(layers)]
    out["top_experts"] = {t: [sorted(int(j) for j in np.argsort(-full[t][i])[:TOPK]) for i in range(layers)] for t in TASKS}
    return out


def run_model(name: str, path: str, args) -> dict:
    model, _, tok = load_model(path, seed=0)
    model.eval()
    p: dict[str, dict[str, np.ndarray]] = {"full": {}, "half0": {}, "half1": {}}
    t0 = now()
    for task in TASKS:
        ex = sample(args.data_dir, task, args.per_task, args.seed)
        half = len(ex) // 2
        c0 = counts(model, tok, task, ex[:half], args.max_len)
        c1 = counts(model, tok, task, ex[half:], args.max_len)
        p["half0"][task], p["half1"][task], p["full"][task] = norm(c0), norm(c1), norm(c0 + c1)
        print(f"[{name}] {task}: {len(ex)} examples, {now() - t0:.0f} s", flush=True)
    res = analyse(p)
    res["p"] = {t: p["full"][t].round(5).tolist() for t in TASKS}
    res["seconds"] = round(now() - t0, 1)
    return res


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Observation 1: per-task activation maps", "",
             f"Command: `{meta['command']}`; {meta['threads']} torch thread; {meta['load']}; "
             f"{meta['per_task']} client-pool examples per task (max {meta['max_len']} tokens), split-half = 2 × {meta['per_task'] // 2}.",
             "", "JS divergence in bits (log2), per MoE layer 0..5; noise = split-half JS of a task with itself.", ""]
    for name, r in results.items():
        lines += [f"## {name}", "", "| pair | JS per layer | mean | top-4 overlap per layer |", "|---|---|---|---|"]
        for pair, js in r["js_between"].items():
            lines.append(f"| {pair} | {' '.join(f'{v:.4f}' for v in js)} | {np.mean(js):.4f} | "
                         f"{' '.join(str(v) for v in r['topk_overlap'][pair])} |")
        for t, js in r["js_split_half"].items():
            lines.append(f"| {t} split-half (noise) | {' '.join(f'{v:.4f}' for v in js)} | {np.mean(js):.4f} | |")
        lines += ["", "Top-4 experts per layer: " + "; ".join(
            f"{t}: {r['top_experts'][t]}" for t in TASKS), ""]
    return "\n".join(lines)


def figure(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(TASKS), figsize=(3.4 * len(TASKS), 3.0 * len(results)), squeeze=False,
                             constrained_layout=True)
    for r, (name, res) in enumerate(results.items()):
        for c, t in enumerate(TASKS):
            ax = axes[r][c]
            im = ax.imshow(np.asarray(res["p"][t]), vmin=0, vmax=0.5, cmap="viridis", aspect="auto")
            ax.set_title(f"{name}: {t}", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="p (share of top-2 choices)")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--standin", default=None, help="stand-in folder (default: build_standin's cache dir)")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", default="", help="run only the model whose name starts with this (plain / stand-in)")
    args = ap.parse_args(argv)
    setup_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"plain minilm-moe-8e": "minilm-moe-8e", "stand-in": args.standin}
    if args.only:
        models = {k: v for k, v in models.items() if k.startswith(args.only)}
    results = {}
    for name, path in models.items():
        if path is None:
            import build_standin

            path = models[name] = str(build_standin.main([]))
        tag = "plain" if path == "minilm-moe-8e" else Path(path).name.replace("minilm-moe-8e-", "")
        cache = out / f"observation1-{tag}.json"  # one file per finished model (resumable)
        if not cache.is_file():
            res = run_model(name, path, args)
            res["load"], res["model"] = load_note(), path
            cache.write_text(json.dumps(res, indent=1))
        results[name] = json.loads(cache.read_text())
    if len(results) < 2:
        return
    meta = {"command": "python benchmarks/evidence/observation1.py", "threads": torch.get_num_threads(),
            "load": "; ".join(f"{k}: {r['load']}" for k, r in results.items()), "per_task": args.per_task,
            "max_len": args.max_len, "standin": results["stand-in"]["model"]}
    (out / "observation1.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "observation1.md").write_text(markdown(results, meta))
    figure(results, out / "observation1.png")
    print((out / "observation1.md").read_text())


if __name__ == "__main__":
    main()
