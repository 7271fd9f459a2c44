"""Does TS move when the model *writes* the summary? A decoder MoE on the TS rows, before and after fine-tuning.

The CPU presets' BERT-MoE can only extract a sentence, and ``ts_room.py`` shows that choice does
not generalise at this size. This script fine-tunes a causal MoE (default ``smollm2-moe-8e``:
Mixtral upcycled from SmolLM2-135M-Instruct, the GPU preset's model) on the same TS rows as
``observation2.py --task ts`` (the first ``--train`` rows of its permutation) through the client
path (:func:`fedmoe.moe.lora.apply_lora`, :func:`fedmoe.train.loop.local_train`) and scores
greedy summaries (:func:`fedmoe.train.evaluate.evaluate`) on the first ``--eval`` of its
evaluation rows, before training and after ``--steps`` steps.

One command, ~16 min on one thread for the defaults (SmolLM2 is ~15 s per 8 × 192-token step on
this CPU; generation ~1.6 s per row)::

    OMP_NUM_THREADS=1 python benchmarks/evidence/ts_abstractive.py [--steps 40 --eval 96]

Writes ``results/ts_abstractive/<model>-s<steps>-e<eval>.json`` (skipped if it exists).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from common import DEFAULT_DATA, RESULTS, load_note, now, setup_threads
from observation2 import data_split

from fedmoe.config import DataConfig, TrainConfig
from fedmoe.data.tasks import get_task
from fedmoe.moe.families import family_of
from fedmoe.moe.lora import apply_lora
from fedmoe.moe.models import load_model
from fedmoe.train.evaluate import evaluate
from fedmoe.train.loop import local_train

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-moe-8e")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--train", type=int, default=960)
    ap.add_argument("--eval", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--max-target", type=int, default=48)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = Path(args.out) / "ts_abstractive"
    name = re.sub(r"[^\w.-]+", "_", Path(args.model).name)
    f = out / f"{name}-s{args.steps}-e{args.eval}.json"
    if f.is_file():
        print(f"{f} exists")
        return
    setup_threads()
    train, evals, _ = data_split(args.data_dir, "ts", args.train, 1000)
    evals = evals[: args.eval]
    model, _, tok = load_model(args.model, seed=0)
    task = get_task("ts")
    data_cfg = DataConfig(max_seq_len=args.max_len, max_target_len=args.max_target)
    pm = apply_lora(model, r=16, alpha=32)
    kind = "causal"
    t0 = now()
    before = evaluate(pm, kind, task, evals, tok, data_cfg, CPU, batch_size=16)
    t1 = now()
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch, local_epochs=1, max_local_steps=args.steps)
    res = local_train(pm, family_of(pm), kind, task, train, tok, cfg, data_cfg, CPU, 0)
    t2 = now()
    after = evaluate(pm, kind, task, evals, tok, data_cfg, CPU, batch_size=16)
    cell = {"model": args.model, "task": "ts", "steps": res.steps, "batch": args.batch, "lr": args.lr,
            "max_len": args.max_len, "max_target": args.max_target, "n_train_seen": res.steps * args.batch,
            "n_eval": len(evals), "before": before, "after": after, "train_loss": res.loss,
            "eval_seconds": round(t1 - t0, 1), "train_seconds": round(t2 - t1, 1),
            "seconds": round(now() - t0, 1), "threads": torch.get_num_threads(), "load": load_note()}
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(cell, indent=1))
    print(f"{f.name}: ROUGE-2 {100 * before['rouge2']:.2f} -> {100 * after['rouge2']:.2f} "
          f"({res.steps} steps, {cell['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
