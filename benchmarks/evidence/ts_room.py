"""How far can extractive TS move on this CPU set-up? Bounds and simple rules on the TS evaluation rows.

The CPU presets score TS (XSum) by extracting one sentence (docs/algorithms.md: BERT-MoE has no
decoder). This script measures, on the same 968 evaluation rows as ``observation2.py --task ts``
(the TS client pool, one fixed permutation, after its 960 training rows), at each ``--max-len``:

* what the model can pick from: the sentences whose start fits in the window (``ts_row``);
* ROUGE-2 (and ROUGE-1 / L) F of fixed rules: the first sentence (lead), the last sentence it
  sees, a uniformly random one it sees (mean of ``--draws`` draws), the most *central* one
  (highest cosine between its mean-pooled encoder state and the whole window's, no training);
* the ceiling: the best sentence it sees by ROUGE-2 itself, and the score of always picking
  the training target (``oracle_sentence``: ROUGE-1 + ROUGE-2, first on ties);
* the targets' position histogram, and how many documents share no bigram with the summary in
  the sentences the model sees;
* for comparison, the target rule used before 2026-12-01 (bigram F1 over the first 12 sentences,
  clipped to the last sentence the model sees): how often it clipped and what always picking it
  scores.

and, with ``--memorise N``, whether the TS head can fit at all: the stand-in is LoRA-fine-tuned
(the client path, lr 2e-3) for 80 steps on its first ``N`` training rows and its target accuracy
on those same rows is reported before and after (a head that cannot even memorise would be a bug;
one that memorises but does not generalise is what the table above is about).

One command, deterministic (seed 0); ~10 min per window length on one thread beside other work::

    OMP_NUM_THREADS=1 python benchmarks/evidence/ts_room.py [--model DIR] [--max-len 96,256] [--memorise 32]

Writes ``results/ts_room.json`` and ``results/ts_room.md`` (``--memorise`` adds its entry to them).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import DEFAULT_DATA, RESULTS, load_note, now, setup_threads
from observation2 import data_split

from fedmoe.data.metrics import rouge_f
from fedmoe.moe.models import load_model
from fedmoe.train.batching import oracle_sentence, sentences, ts_row

KEYS = ("rouge1", "rouge2", "rougeL")


def _bigram_oracle_clipped(document: str, summary: str, n_seen: int) -> tuple[int, bool]:
    """The pre-2026-12-01 target: bigram F1 over the first 12 sentences, clipped to what the model sees."""

    def bigrams(text: str) -> set[tuple[str, str]]:
        w = re.findall(r"\w+", text.lower())
        return set(zip(w, w[1:], strict=False))

    ref, best, best_f = bigrams(summary), 0, -1.0
    for i, s in enumerate(sentences(document)):
        b = bigrams(s)
        inter = len(b & ref)
        f = 0.0 if not inter else 2 * inter / (len(b) + len(ref))
        if f > best_f:
            best, best_f = i, f
    return min(best, n_seen - 1), best >= n_seen


@torch.no_grad()
def _central(model, tok, seen: list[str], max_len: int) -> int:
    """The sentence whose mean-pooled encoder state is closest (cosine) to the whole window's."""
    texts = [*seen, " ".join(seen)]
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    h = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   token_type_ids=enc.get("token_type_ids")).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return int((e[:-1] @ e[-1]).argmax())


def measure(model, tok, rows: list, max_len: int, draws: int) -> dict:
    rng = np.random.default_rng(0)
    rules = {k: [] for k in ("lead", "last", "random", "central", "best_rouge2", "target", "old_target")}
    n_seen, target_pos, zero_bigram, clipped = [], Counter(), 0, 0
    for ex in rows:
        _, _, seen = ts_row(tok, ex.document, max_len)
        f = [rouge_f(ex.summary, s) for s in seen]
        n_seen.append(len(seen))
        t = oracle_sentence(seen, ex.summary)
        target_pos[t] += 1
        old, was_clipped = _bigram_oracle_clipped(ex.document, ex.summary, len(seen))
        clipped += was_clipped
        r2 = [x["rouge2"] for x in f]
        zero_bigram += max(r2) == 0.0
        picks = {"lead": 0, "last": len(seen) - 1, "central": _central(model, tok, seen, max_len),
                 "best_rouge2": int(np.argmax(r2)), "target": t, "old_target": old}
        for name, i in picks.items():
            rules[name].append(f[i])
        rand = rng.integers(0, len(seen), size=draws)
        rules["random"].append({k: float(np.mean([f[i][k] for i in rand])) for k in KEYS})
    n = len(rows)
    return {
        "max_len": max_len, "rows": n, "sentences_seen_mean": float(np.mean(n_seen)),
        "scores": {name: {k: float(np.mean([x[k] for x in v])) for k in KEYS} for name, v in rules.items()},
        "target_position": {str(k): target_pos[k] for k in sorted(target_pos)},
        "no_bigram_share": zero_bigram / n, "old_target_clipped_share": clipped / n,
    }


def memorise(model, tok, rows: list, max_len: int) -> dict:
    """Target accuracy on ``rows`` before and after 80 LoRA steps on exactly those rows."""
    from fedmoe.config import DataConfig, TrainConfig
    from fedmoe.data.tasks import get_task
    from fedmoe.moe.families import family_of
    from fedmoe.moe.lora import apply_lora
    from fedmoe.train.batching import collate, model_inputs
    from fedmoe.train.loop import local_train

    task, cpu = get_task("ts"), torch.device("cpu")
    pm = apply_lora(model, r=8, alpha=16)

    def accuracy() -> float:
        pm.eval()
        batch = collate("encoder", task, rows, tok, max_len, 32)
        with torch.no_grad():
            logits = pm(**model_inputs(batch, "encoder", cpu)).logits
        return float((logits.argmax(-1) == batch["labels"]).float().mean())

    before = accuracy()
    cfg = TrainConfig(lr=2e-3, batch_size=8, local_epochs=20, max_local_steps=80)
    res = local_train(pm, family_of(pm), "encoder", task, rows, tok, cfg, DataConfig(max_seq_len=max_len), cpu, 0)
    return {"rows": len(rows), "max_len": max_len, "steps": res.steps, "accuracy_before": before,
            "accuracy_after": accuracy(), "train_loss": res.loss}


def summarise(res: dict) -> str:
    lines = ["# TS room: extractive one-sentence ROUGE on the TS evaluation rows", "",
             f"{res['windows'][0]['rows'] if res['windows'] else 0} rows (the 968 of `observation2.py --task ts`), model `{Path(res['model']).name}`; "
             f"{res['seconds'] / 60:.1f} min ({res['threads']} thread; load: {res['load']}). ROUGE F in %.", "",
             "| window (tokens) | sentences seen | lead | last | random | central (untrained) | training target | "
             "best by ROUGE-2 (ceiling) | old target | no shared bigram | old target clipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["windows"]:
        s = {k: 100 * v["rouge2"] for k, v in m["scores"].items()}
        lines.append(f"| {m['max_len']} | {m['sentences_seen_mean']:.2f} | {s['lead']:.2f} | {s['last']:.2f} | "
                     f"{s['random']:.2f} | {s['central']:.2f} | {s['target']:.2f} | {s['best_rouge2']:.2f} | "
                     f"{s['old_target']:.2f} | {100 * m['no_bigram_share']:.1f} % | {100 * m['old_target_clipped_share']:.1f} % |")
    lines += ["", "ROUGE-2 columns: the score of always picking that sentence. Training-target positions "
              "(sentence index: rows): " + "; ".join(f"{m['max_len']} tokens: {m['target_position']}" for m in res["windows"]), ""]
    if "memorise" in res:
        m = res["memorise"]
        lines += [f"Memorising: {m['rows']} training rows at {m['max_len']} tokens, {m['steps']} LoRA steps on them: target "
                  f"accuracy on those rows {100 * m['accuracy_before']:.1f} % -> {100 * m['accuracy_after']:.1f} % "
                  f"(mean training loss {m['train_loss']:.3f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--model", default=None, help="stand-in folder (default: build_standin's cache)")
    ap.add_argument("--max-len", default="96", help="comma-separated window lengths in tokens")
    ap.add_argument("--draws", type=int, default=5, help="random draws per row for the random rule")
    ap.add_argument("--memorise", type=int, default=0, help="only add the memorising check on this many training rows")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--summary", action="store_true", help="only rewrite ts_room.md from ts_room.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        text = summarise(json.loads((out / "ts_room.json").read_text()))
        (out / "ts_room.md").write_text(text)
        print(text)
        return
    setup_threads()
    if args.model is None:
        import build_standin

        args.model = str(build_standin.main([]))
    train, rows, note = data_split(args.data_dir, "ts", 960, 1000)
    if note:
        print(note)
    t0 = now()
    model, _, tok = load_model(args.model, seed=0)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    if args.memorise:
        done = out / "ts_room.json"
        res = json.loads(done.read_text()) if done.is_file() else {"model": args.model, "windows": [], "seconds": 0.0,
                                                                  "threads": torch.get_num_threads(), "load": load_note()}
        res["memorise"] = {**memorise(model, tok, train[: args.memorise], int(args.max_len.split(",")[0])),
                           "seconds": round(now() - t0, 1), "load": load_note()}
    else:
        windows = [measure(model, tok, rows, int(L), args.draws) for L in args.max_len.split(",")]
        res = {"model": args.model, "windows": windows, "seconds": round(now() - t0, 1),
               "threads": torch.get_num_threads(), "load": load_note()}
    (out / "ts_room.json").write_text(json.dumps(res, indent=1))
    text = summarise(res)
    (out / "ts_room.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
