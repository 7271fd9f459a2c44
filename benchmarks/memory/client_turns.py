"""Predicted vs measured memory of real client turns, on the engine's own path.

For each model, (batch, sequence) size and number of kept experts per MoE layer (2, 4, all):
build the engine's :class:`~fedmoe.engine.run.Run` (real data, the configured LoRA fine-tuning)
and run one client turn per task in ``--tasks`` (``Run._client``: extraction, download, local
training, validation) with ``engine.measure_memory`` on. *predicted* is what the θ search prices that
sub-MoE at (``run.plan.submodel_bytes``); *measured* is the turn's ``peak_memory_bytes`` on
the basis budgets are stated in (docs/memory.md: the sub-MoE's weights + the peak the turn adds
to its process; CPU: VmHWM, large allocations mmapped). Each turn (model, size, task, experts
kept) runs in its own fresh process as that process's first turn, the largest a client process
measures: the engine's own set-up (``prepare_process``, the task's metric warm-up, the rehearsal
step) and then the one turn. A turn's peak depends on what its process ran before: later turns
reuse heap blocks freed by earlier ones without touching new pages, so a tiny model's second and
third turns measured 0.2–0.6 MiB less than the same turn first (``tiny-mixtral`` 8 × 64, all
experts: 8.0 MiB as a third turn); in a process shared by all three tasks, an old ROUGE import
(~400 MiB of small Python objects) made it 1–2 MiB less (docs/memory.md).

Batches are padded to their longest row (``fedmoe.train.batching``), so a turn's activations
follow the longest *training batch it ran*, not ``data.max_seq_len``. The table also records
that length (*S used*: the widest collated training batch of the turn, decoder targets as
*T used*) and the same formula priced at it (*at S used*, ``RUNTIME_SLACK`` included like
*predicted*): what a price from the client's actual lengths would say.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/client_turns.py          # all models
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/client_turns.py --models minilm-moe-4e
    ... --jobs 2      # (model, size, task) processes in parallel

Writes ``benchmarks/memory/client_turns.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MiB = 2**20
MODELS = ["minilm-moe-4e", "minilm-moe-8e", "smollm2-moe-4e", "tiny-mixtral", "tiny-switch-transformers"]
#: (batch size, max sequence length) per model: the quickstart's size and a second one
SIZES = {"minilm": [(16, 96), (8, 192)], "smollm2": [(4, 96), (2, 192)], "tiny": [(8, 64), (16, 128)]}


def _sizes(name: str) -> list[tuple[int, int]]:
    return SIZES["minilm" if name.startswith("minilm") else "smollm2" if name.startswith("smollm2") else "tiny"]


def _counts(num_experts: list[int]) -> list[int]:
    """Experts kept per layer: 2, 4 and all (fewer where a layer has fewer)."""
    top = max(num_experts)
    return sorted({min(2, top), min(4, top), top})


def turn_config(name: str, b: int, s: int, data_dir: str, steps: int = 0, dtype: str = "float32",
                examples: int = 96) -> Any:
    """The benchmark's run configuration for ``name`` at ``b`` rows × ``s`` tokens."""
    from fedmoe.config import load_config

    return load_config(REPO / "configs" / "quickstart.toml", [
        f'data.data_dir="{data_dir}"', f'model.name="{name}"', f"data.max_examples_per_task={examples}",
        f"data.max_seq_len={s}", "data.max_target_len=16", f"train.batch_size={b}", f"train.max_local_steps={steps}",
        "train.eval_batch_size=8", "engine.measure_memory=true", "setting.num_clients=3",
        "federation.exclude_unfit=true",  # turns run by hand below: a budget no expert set fits must not stop the set-up
        'setting.preset="standard-hetero-t"', "federation.clients_per_round=3", f'model.dtype="{dtype}"',
    ])


def _model_rows(name: str, data_dir: str, tmp: str, tasks: list[str], steps: int,
                sizes: list[str] | None = None, dtype: str = "float32", ks: list[str] | None = None,
                examples: int = 96) -> list[dict]:
    import json

    import torch

    import fedmoe.train.loop as loop
    from fedmoe.engine.budget import RUNTIME_FIXED_BYTES, RUNTIME_SLACK, _unit_training_bytes
    from fedmoe.engine.run import Run

    torch.set_num_threads(1)
    widest = {"S": 0, "T": 0}
    collate = loop.collate

    def recording_collate(*a, **kw):  # the widths of the batches local training builds
        batch = collate(*a, **kw)
        widest["S"] = max(widest["S"], int(batch["input_ids"].shape[1]))
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            widest["T"] = max(widest["T"], int(labels.shape[1]))
        return batch

    loop.collate = recording_collate
    rows = []
    for b, s in _sizes(name):
        if sizes and f"{b}x{s}" not in sizes:
            continue
        cfg = turn_config(name, b, s, data_dir, steps, dtype, examples)
        out = Path(tmp) / f"{name}-{b}x{s}-{'-'.join(tasks)}-{'-'.join(ks or ['all'])}"
        out.mkdir(parents=True)
        run = Run(cfg, out)
        run._base_bytes = lambda cid, kept: 0  # byte accounting is not measured here
        n = run.plan.num_experts
        by_task = {run.clients[c].task: c for c in sorted(run.clients)}
        for k in _counts(n):
            if ks and str(k) not in ks:
                continue
            kept = [list(range(min(k, e))) for e in n]
            for task, cid in sorted((t, c) for t, c in by_task.items() if t in tasks):
                t0 = time.perf_counter()
                widest.update(S=0, T=0)
                rec, _, _ = run._client(cid, kept, 1, 0)
                if rec.error:
                    raise RuntimeError(f"{name} {task}: {rec.error}")
                dense, experts = _unit_training_bytes(run.base, run.family, b, widest["S"], cfg.train.finetune,
                                                      cfg.train.lora_r, target_len=min(widest["T"], cfg.data.max_target_len))
                at_used = RUNTIME_SLACK * (dense + sum(float(experts[i, j]) for i, ids in enumerate(kept) for j in ids)) + RUNTIME_FIXED_BYTES
                rows.append(dict(model=name if dtype == "float32" else f"{name} ({dtype})", task=task, B=b, S=s, kept=k, predicted=rec.predicted_memory_bytes,
                                 measured=rec.peak_memory_bytes, S_used=widest["S"], T_used=widest["T"],
                                 at_used=at_used, seconds=time.perf_counter() - t0))
                with (Path(tmp) / "rows.jsonl").open("a") as f:  # as measured (a long run can be followed)
                    f.write(json.dumps(rows[-1]) + "\n")
    return rows


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(HERE / "client_turns.md"))
    ap.add_argument("--tmp", default="/tmp/fedmoe-client-turns")
    ap.add_argument("--tasks", nargs="*", default=["tc", "rc", "ts"])
    ap.add_argument("--steps", type=int, default=0,
                    help="local steps per turn (0: one whole epoch, so the client's longest row is trained)")
    ap.add_argument("--dtype", default="float32", help="model.dtype (e.g. bfloat16 for the SmolLM2 preset)")
    ap.add_argument("--sizes", nargs="*", default=None, help="BxS sizes to run (e.g. 8x192), default: all of the model's")
    ap.add_argument("--examples", type=int, default=96, help="data.max_examples_per_task (fewer: shorter epochs)")
    ap.add_argument("--jobs", type=int, default=1, help="models measured at the same time (memory is per process)")
    args = ap.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    rows: list[dict] = []
    # one fresh process per turn (model, size, task, experts kept), each turn its process's first, as a
    # client process's first turn: a turn's peak depends on what its process ran before (docs/memory.md:
    # minilm-moe-4e RC at 8 × 192 measured 990.5 MiB after the 16 × 96 turns, 867.8 MiB in a fresh
    # process; tiny-mixtral 1–2 MiB less after TS's ROUGE import, and 0.2–0.6 MiB less on a process's
    # second and third turns than on its first)
    from fedmoe.moe.meta import load_shapes

    def counts(name: str) -> list[int]:
        model, family = load_shapes(name)
        return _counts([b.num_experts for b in family.blocks(model)])

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(_model_rows, n, args.data_dir, args.tmp, [task], args.steps, [f"{b}x{s}"], args.dtype,
                               [str(k)], args.examples)
                   for n in args.models for b, s in _sizes(n) if not args.sizes or f"{b}x{s}" in args.sizes
                   for task in args.tasks for k in counts(n)]
        results = [f.result() for f in futures]
    for got in results:
        for r in got:
            r["ratio"] = r["predicted"] / r["measured"]
            r["ratio_used"] = r["at_used"] / r["measured"]
            print(f"{r['model']:26s} {r['task']} B{r['B']:<3d} S{r['S']:<4d} kept {r['kept']:2d}  predicted "
                  f"{r['predicted'] / MiB:8.1f} MiB  measured {r['measured'] / MiB:8.1f} MiB  ratio {r['ratio']:.3f}  "
                  f"S used {r['S_used']} at S used {r['at_used'] / MiB:8.1f} MiB  ratio {r['ratio_used']:.3f}",
                  flush=True)
        rows += got
    took = time.perf_counter() - t0
    lines = [
        "# Client turns: predicted vs measured memory",
        "",
        "Generated by `" + " ".join(["OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/client_turns.py",
                                       *(["--models", *args.models] if args.models != MODELS else []),
                                       *(["--tasks", *args.tasks] if args.tasks != ["tc", "rc", "ts"] else []),
                                       *(["--sizes", *args.sizes] if args.sizes else []),
                                       *([f"--steps {args.steps}"] if args.steps else []),
                                       *([f"--dtype {args.dtype}"] if args.dtype != "float32" else []),
                                       *([f"--examples {args.examples}"] if args.examples != 96 else []),
                                       *([f"--jobs {args.jobs}"] if args.jobs > 1 else []),
                                       *([f"--out {args.out}"] if args.out != str(HERE / "client_turns.md") else [])]) + "`",
        f"(torch {torch.__version__}, {platform.machine()}, Python {platform.python_version()}, 1 thread, CPU, "
        f"{took / 60:.1f} min, on a shared machine, load {_load()}). One fresh process per turn (model, size, task, experts kept), "
        "each turn its process's first, as a client process's first turn (set-up, metric warm-up, rehearsal step, then the turn "
        "through `Run._client`; "
        f"{args.steps or 'one epoch of'} local steps, LoRA r = 8, eval batch 8, {args.examples} examples per task); *predicted* = the turn's "
        "`predicted_memory_bytes` (`run.plan.submodel_bytes(kept, client=cid)`: the client's own price, at its "
        "longest training example); *measured* = the turn's `peak_memory_bytes` (docs/memory.md). Ratio = predicted / measured. "
        "*S used* = the widest training batch the turn ran (batches are padded to their longest row); "
        "*at S used* = the same formula (× RUNTIME_SLACK, + RUNTIME_FIXED_BYTES) priced at that length (no `top_k` clip); ratio used = at S used / measured.",
        "",
        "| model | task | B | S | experts/layer | predicted MiB | measured MiB | ratio | S used | at S used MiB "
        "| ratio used |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['B']} | {r['S']} | {r['kept']} | {r['predicted'] / MiB:.1f} "
                     f"| {r['measured'] / MiB:.1f} | {r['ratio']:.3f} | {r['S_used']} | {r['at_used'] / MiB:.1f} "
                     f"| {r['ratio_used']:.3f} |")
    lines.append("")
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r["ratio"] for r in rows if r["model"] == name]
        us = [r["ratio_used"] for r in rows if r["model"] == name]
        lines.append(f"* {name}: ratio {min(rs):.3f} – {max(rs):.3f} over {len(rs)} turns; "
                     f"{sum(r['measured'] > r['predicted'] for r in rows if r['model'] == name)} measured above predicted; "
                     f"priced at S used: {min(us):.3f} – {max(us):.3f}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({took / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
