"""How examples become model inputs for the three model kinds.

* ``causal`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek): ``prompt + target + eos``; the loss is on
  the target tokens only (prompt labels = −100); the prompt is :func:`causal_prompt` (chat
  template when the tokenizer has one, an answer cue, only the article/passage truncated).
* ``seq2seq`` (SwitchTransformers): encoder gets the prompt, decoder the target.
* ``encoder`` (our BERT-MoE): task heads — TC classification on [CLS], RC start/end span,
  TS extractive: score each sentence start, the target is the *oracle* sentence — of the
  sentences the model sees (their starts fit in ``max_seq_len``) — with the highest
  ROUGE-1 + ROUGE-2 F against the reference summary (BertSum's oracle criterion, one
  sentence; a (choice)).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmoe.data.examples import Example, RCExample, TCExample, TSExample
from fedmoe.data.metrics import rouge_f

IGNORE = -100
MAX_SENTENCES = 12
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def model_kind(family_name: str) -> str:
    if family_name == "bert_moe":
        return "encoder"
    if family_name == "switch_transformers":
        return "seq2seq"
    return "causal"


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def text2text(task: Any, ex: Example) -> tuple[str, str]:
    return task.to_text2text(ex)


def sentences(document: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(document.strip()) if s][:MAX_SENTENCES]


def oracle_sentence(candidates: Sequence[str], summary: str) -> int:
    """Index of the candidate with the highest ROUGE-1 + ROUGE-2 F against ``summary`` (first on ties).

    ``candidates`` are the sentences the model can pick from (those whose start it sees): an
    oracle beyond them would be a target the model cannot reach. ROUGE-1 is in the criterion
    because on XSum a third of the documents share no bigram with the summary in their first
    sentences: a bigram-only oracle sends all of them to sentence 0 on the tie.
    """
    return _oracle(tuple(candidates), summary)


@functools.lru_cache(maxsize=8192)
def _oracle(candidates: tuple[str, ...], summary: str) -> int:
    # cached: a client's rows are collated again every turn, and ROUGE's stemming costs ~0.4 ms a sentence
    scores = [f["rouge1"] + f["rouge2"] for f in (rouge_f(summary, s) for s in candidates)]
    return int(np.argmax(scores)) if scores else 0  # argmax: the first of tied maxima


def ts_row(tok: Any, document: str, max_len: int) -> tuple[list[int], list[int], list[str]]:
    """The extractive TS input ``[CLS] s1 [SEP] s2 [SEP] …`` cut to ``max_len`` tokens: its ids, the
    position of each sentence start the model sees, and those sentences (the last may be cut)."""
    sents = sentences(document) or [document]
    ids, pos = [tok.cls_token_id], []
    for s in sents:
        if len(ids) + 2 > max_len:  # no room for this sentence's first token and its [SEP]
            break
        pos.append(len(ids))
        ids += _ids(tok, s)[: max_len - len(ids) - 1] + [tok.sep_token_id]
    return ids, pos, sents[: len(pos)]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def collate(kind: str, task: Any, examples: Sequence[Example], tok: Any, max_len: int, max_target: int) -> dict[str, Any]:
    """One training batch (tensors) for ``examples`` of one task."""
    if kind == "encoder":
        return _collate_encoder(task, examples, tok, max_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id if tok.eos_token_id is not None else pad
    if kind == "seq2seq":
        enc, dec = [], []
        for ex in examples:
            src, tgt = text2text(task, ex)
            enc.append(_ids(tok, src)[: max_len - 1] + [eos])
            dec.append(_ids(tok, tgt)[: max_target - 1] + [eos])
        ids = _pad(enc, pad)
        labels = _pad(dec, IGNORE)
        return {"input_ids": ids, "attention_mask": (ids != pad).long() if pad != eos else _mask(enc), "labels": labels}
    rows, labels = [], []
    for ex in examples:
        _, tgt = text2text(task, ex)
        t = _ids(tok, " " + tgt)[: max_target - 1] + [eos]
        s = causal_prompt(task, ex, tok, max(1, max_len - len(t)))
        rows.append(s + t)
        labels.append([IGNORE] * len(s) + t)
    return {"input_ids": _pad(rows, pad), "attention_mask": _mask(rows), "labels": _pad(labels, IGNORE)}


_FRAMES: dict[int, tuple[Any, tuple[str, str] | None]] = {}
_SLOT = "\x00message\x00"


def chat_frame(tok: Any) -> tuple[str, str] | None:
    """``(before, after)`` the user's message in the tokenizer's chat template, generation
    prompt included; None when the tokenizer has no template (then plain text is used)."""
    hit = _FRAMES.get(id(tok))
    if hit is None or hit[0] is not tok:
        frame = None
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                           tokenize=False)
            before, after = text.split(_SLOT)
            frame = (before, after)
        hit = _FRAMES[id(tok)] = (tok, frame)
    return hit[1]


def causal_prompt(task: Any, ex: Example, tok: Any, budget: int) -> list[int]:
    """Prompt ids for a decoder-only model, at most ``budget`` tokens.

    The task's :class:`~fedmoe.data.tasks.PromptParts` go into the tokenizer's chat template
    (user turn, then the assistant turn opened) when it has one, as plain text otherwise; the
    answer cue (``Topic:`` / ``Answer:`` / ``Summary:``) follows either way. When the window is
    short only the body (article / passage) is cut, from its end, so the instruction, the
    question and the cue always survive; if even they do not fit, the prompt keeps its end.
    """
    parts = task.to_prompt(ex)
    frame = chat_frame(tok)
    before, after = frame or ("", "\n")
    head = _ids(tok, before + parts.head)
    tail = _ids(tok, parts.tail + after + parts.cue)
    room = budget - len(head) - len(tail)
    if room >= 0:
        return head + _ids(tok, parts.body)[:room] + tail
    return (head + tail)[-budget:] if budget > 0 else []


def _mask(rows: list[list[int]]) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=torch.long)


def _collate_encoder(task: Any, examples: Sequence[Example], tok: Any, max_len: int) -> dict[str, Any]:
    name = task.name
    if name == "tc":
        enc = tok([ex.text for ex in examples if isinstance(ex, TCExample)], truncation=True,
                  max_length=max_len, padding=True, return_tensors="pt")
        return {**dict(enc), "task": "tc", "labels": torch.tensor([ex.label for ex in examples])}
    if name == "rc":
        qs = [_cap(tok, ex.question, max_len // 2) for ex in examples if isinstance(ex, RCExample)]
        cs = [ex.context for ex in examples if isinstance(ex, RCExample)]
        enc = tok(qs, cs, truncation="only_second", max_length=max_len, padding=True,
                  return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        starts, ends = [], []
        for b, ex in enumerate(examples):
            s_char = ex.answer_starts[0]
            e_char = s_char + len(ex.answers[0])
            seq_ids = enc.sequence_ids(b)
            s_tok = e_tok = 0
            for t, (o, sid) in enumerate(zip(offsets[b].tolist(), seq_ids, strict=True)):
                if sid != 1:
                    continue
                if o[0] <= s_char < o[1] and s_tok == 0:
                    s_tok = t
                if o[0] < e_char <= o[1]:
                    e_tok = t
            if e_tok < s_tok or s_tok == 0:
                s_tok = e_tok = 0  # answer truncated away: point at [CLS]
            starts.append(s_tok)
            ends.append(e_tok)
        return {**dict(enc), "task": "rc", "start": torch.tensor(starts), "end": torch.tensor(ends),
                "offsets": offsets, "contexts": cs}
    # ts: [CLS] s1 [SEP] s2 [SEP] …, scoring each sentence's first token
    rows, positions, targets, sents_all = [], [], [], []
    for ex in examples:
        assert isinstance(ex, TSExample)
        ids, pos, seen = ts_row(tok, ex.document, max_len)
        rows.append(ids)
        positions.append(pos)
        targets.append(oracle_sentence(seen, ex.summary))
        sents_all.append(seen)
    n_s = max(len(p) for p in positions)
    pos_t = torch.tensor([p + [-1] * (n_s - len(p)) for p in positions], dtype=torch.long)
    return {"input_ids": _pad(rows, tok.pad_token_id), "attention_mask": _mask(rows), "task": "ts",
            "sentence_positions": pos_t, "labels": torch.tensor(targets), "sentences": sents_all}


def _cap(tok: Any, text: str, n: int) -> str:
    """``text`` cut to its first ``n`` tokens (a question longer than half the window would
    leave no room for the context under ``only_second`` truncation)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc["input_ids"]) <= n else text[: enc["offset_mapping"][n - 1][1]]


def iterate_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "task", "sentence_positions")


def model_inputs(batch: dict[str, Any], kind: str, device: torch.device) -> dict[str, Any]:
    """The subset of a batch the model's forward takes, moved to ``device``."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "task", "sentence_positions") if kind == "encoder" else (
        "input_ids", "attention_mask", "labels")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k in keys}
