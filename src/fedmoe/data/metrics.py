"""Task scores (docs/algorithms.md §6.1): TC accuracy, RC SQuAD v1.1 EM/F1, TS ROUGE-1/2/L F.

All scores are fractions in [0, 1] (multiply by 100 for the paper's tables), averaged over
examples. The SQuAD rules are the official v1.1 evaluation script's, hand-written here:
normalise (lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace),
then exact match and token-overlap F1, each the maximum over the ground truths.
ROUGE is :mod:`rouge_score` with ``use_stemmer=True`` (F-measure).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("no predictions to score.")


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Share of positions where prediction equals reference."""
    _check(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower, remove punctuation, remove articles, fix whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def token_f1(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 of the normalised strings (0.0 when nothing overlaps, as in v1.1)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1, each the maximum over an example's ground-truth answers."""
    _check(predictions, references)
    em = f1 = 0.0
    for pred, truths in zip(predictions, references, strict=True):
        if isinstance(truths, str):
            truths = [truths]
        em += max(exact_match(pred, t) for t in truths)
        f1 += max(token_f1(pred, t) for t in truths)
    return {"f1": f1 / len(predictions), "em": em / len(predictions)}


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples (``RougeScorer.score(target, prediction)``)."""
    _check(predictions, references)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    scorer = _scorer()
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}
