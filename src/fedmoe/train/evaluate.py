"""Evaluation on a client's split with its task's metric (docs/algorithms.md §6.1).

* encoder heads: TC argmax; RC best span (start ≤ end, ≤ 30 tokens, inside the context);
  TS the highest-scoring sentence (extractive).
* causal LM: TC by rank classification (the label word with the highest log-likelihood);
  RC/TS by greedy generation.
* seq2seq: greedy generation for all three (TC parsed back to a label).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmoe.config import DataConfig
from fedmoe.data.examples import TCExample
from fedmoe.train.batching import IGNORE, _ids, causal_prompt, collate, model_inputs, text2text
from fedmoe.train.loop import forward_context, sequence_logprob

MAX_SPAN = 30


@torch.no_grad()
def predict(model: nn.Module, kind: str, task: Any, examples: list, tok: Any, data_cfg: DataConfig,
            device: torch.device, batch_size: int = 32) -> list[Any]:
    model.eval()
    preds: list[Any] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        with forward_context(device):
            preds.extend(_predict_chunk(model, kind, task, chunk, tok, data_cfg, device))
    return preds


def _predict_chunk(model, kind, task, chunk, tok, data_cfg, device) -> list[Any]:
    if kind == "encoder":
        batch = collate(kind, task, chunk, tok, data_cfg.max_seq_len, data_cfg.max_target_len)
        logits = model(**model_inputs(batch, kind, device)).logits.float().cpu()
        if task.name == "tc":
            return logits.argmax(-1).tolist()
        if task.name == "ts":
            best = logits.argmax(-1).tolist()
            return [s[b] if s else "" for s, b in zip(batch["sentences"], best, strict=True)]
        return _decode_spans(logits, batch)
    if kind == "causal" and task.name == "tc":
        return _rank_classify(model, task, chunk, tok, data_cfg, device)
    return _generate(model, kind, task, chunk, tok, data_cfg, device)


def _decode_spans(logits: torch.Tensor, batch: dict[str, Any]) -> list[str]:
    out = []
    for b in range(logits.shape[0]):
        seq_ids = batch["token_type_ids"][b] if "token_type_ids" in batch else None
        ctx = (seq_ids == 1) & (batch["attention_mask"][b] == 1) if seq_ids is not None else batch["attention_mask"][b] == 1
        start = logits[b, :, 0].masked_fill(~ctx, float("-inf"))
        end = logits[b, :, 1].masked_fill(~ctx, float("-inf"))
        scores = start[:, None] + end[None, :]
        n = scores.shape[0]
        valid = torch.triu(torch.ones(n, n, dtype=torch.bool)) & ~torch.triu(torch.ones(n, n, dtype=torch.bool), MAX_SPAN)
        scores = scores.masked_fill(~valid, float("-inf"))
        flat = int(scores.argmax())
        s, e = divmod(flat, n)
        offs = batch["offsets"][b]
        if not torch.isfinite(scores.reshape(-1)[flat]):
            out.append("")
            continue
        out.append(batch["contexts"][b][int(offs[s][0]) : int(offs[e][1])])
    return out


def _rank_classify(model, task, chunk, tok, data_cfg, device) -> list[int]:
    labels = list(task.label_names)
    scores = torch.empty(len(chunk), len(labels))
    for j, name in enumerate(labels):
        fake = [TCExample(ex.id, ex.title, ex.description, j, name) for ex in chunk]
        batch = collate("causal", task, fake, tok, data_cfg.max_seq_len, data_cfg.max_target_len)
        scores[:, j] = sequence_logprob(model, batch, device).float().cpu()
    return scores.argmax(-1).tolist()


def _generate(model, kind, task, chunk, tok, data_cfg, device) -> list[str]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id if tok.eos_token_id is not None else pad
    prompts = []
    for ex in chunk:
        src, _ = text2text(task, ex)
        budget = max(1, data_cfg.max_seq_len - (data_cfg.max_target_len if kind == "causal" else 1))
        prompts.append(causal_prompt(task, ex, tok, budget) if kind == "causal" else _ids(tok, src)[:budget])
    n = max(len(p) for p in prompts)
    if kind == "causal":  # left padding for decoder-only generation
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    else:
        ids = torch.tensor([p + [eos] + [pad] * (n - len(p)) for p in prompts])
        mask = torch.tensor([[1] * (len(p) + 1) + [0] * (n - len(p)) for p in prompts])
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=data_cfg.max_target_len, do_sample=False,
                         pad_token_id=pad, eos_token_id=eos)
    if kind == "causal":
        gen = gen[:, ids.shape[1]:]
    texts = []
    for row in gen.tolist():
        row = [t for t in row if t not in (pad, IGNORE)]
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


def evaluate(model: nn.Module, kind: str, task: Any, examples: list, tok: Any, data_cfg: DataConfig,
             device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """Task scores of ``model`` on ``examples`` (e.g. ``{"accuracy": 0.81}``)."""
    if not examples:
        return {}
    preds = predict(model, kind, task, examples, tok, data_cfg, device, batch_size)
    refs = [task.reference(ex) for ex in examples]
    return task.score(preds, refs)


def evaluate_with_predictions(model: nn.Module, kind: str, task: Any, examples: list, tok: Any, data_cfg: DataConfig,
                              device: torch.device, batch_size: int = 32) -> tuple[dict[str, float], list[dict]]:
    """:func:`evaluate` plus one row per example: ``id``, ``task``, ``prediction``,
    ``reference`` and ``score`` (the task's metrics on that example alone; every metric is a
    mean over examples, so the rows' mean is the returned score)."""
    if not examples:
        return {}, []
    preds = predict(model, kind, task, examples, tok, data_cfg, device, batch_size)
    refs = [task.reference(ex) for ex in examples]
    rows = [{"id": ex.id, "task": task.name, "prediction": p, "reference": list(r) if isinstance(r, tuple) else r,
             "score": task.score([p], [r])} for ex, p, r in zip(examples, preds, refs, strict=True)]
    return task.score(preds, refs), rows
