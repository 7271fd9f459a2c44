"""Task scores (docs/algorithms.md §6.1): TC accuracy, RC SQuAD v1.1 EM/F1, TS ROUGE-1/2/L F.

All scores are fractions in [0, 1] (multiply by 100 for the paper's tables), averaged over
examples. The SQuAD rules are the official v1.1 evaluation script's, hand-written here:
normalise (lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace),
then exact match and token-overlap F1, each the maximum over the ground truths.
ROUGE is rouge-score's (``RougeScorer(..., use_stemmer=True)``, F-measure), computed here with its
rules — its tokenizer, NLTK's Porter stemmer on tokens longer than 3 characters, n-gram overlap and
LCS — because importing ``rouge_score`` imports all of NLTK (and SciPy with it): ~200 MiB resident and
~1.5 s in every process that validates a TS client, which on a small model is more than its whole
training turn (and its freed import temporaries made that process's later turns measure 1–2 MiB less,
docs/memory.md). Only NLTK's ``stem/porter.py`` is loaded (:func:`_porter_stemmer`); the test suite
checks the scores against ``rouge_score`` itself on real XSum summaries.
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
def _porter_stemmer() -> Any:
    """NLTK's ``PorterStemmer()`` (its default NLTK_EXTENSIONS mode, as rouge-score uses) from
    ``nltk/stem/porter.py`` alone: NLTK's package ``__init__`` imports every NLTK module (and SciPy).
    The loaded modules are removed from ``sys.modules`` again, so a later ``import nltk`` is complete."""
    import importlib
    import importlib.util
    import sys
    import types
    from pathlib import Path

    if "nltk" in sys.modules:  # already imported in full by someone else: use it
        from nltk.stem.porter import PorterStemmer

        return PorterStemmer()
    spec = importlib.util.find_spec("nltk")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise ImportError("ROUGE needs NLTK's Porter stemmer: pip install nltk (rouge-score depends on it).")
    root = Path(spec.origin).parent
    shells = {"nltk": root, "nltk.stem": root / "stem"}  # package shells whose __init__ is not run
    for name, folder in shells.items():
        shell = types.ModuleType(name)
        shell.__path__ = [str(folder)]
        sys.modules[name] = shell
    try:
        porter = importlib.import_module("nltk.stem.porter")  # + nltk.stem.api, nltk.redos, nltk.termsec
    finally:
        for name in [n for n in sys.modules if n == "nltk" or n.startswith("nltk.")]:
            del sys.modules[name]
    return porter.PorterStemmer()


_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer with stemming: lowercase, non-alphanumerics → spaces, split, Porter-stem
    the tokens longer than 3 characters, drop empty and invalid tokens."""
    stem = _porter_stemmer().stem
    tokens = [stem(t) if len(t) > 3 else t for t in re.split(r"\s+", _NON_ALNUM.sub(" ", text.lower()))]
    return [t for t in tokens if _VALID_TOKEN.match(t)]


def _f(overlap: int, n_pred: int, n_target: int) -> float:
    precision, recall = overlap / max(n_pred, 1), overlap / max(n_target, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_f(target: str, prediction: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of one prediction against one target (``RougeScorer.score(target,
    prediction)[k].fmeasure`` for k in :data:`ROUGE_TYPES`)."""
    t, p = rouge_tokens(target), rouge_tokens(prediction)
    out = {}
    for key in ROUGE_TYPES:
        if key == "rougeL":
            out[key] = _f(_lcs_length(t, p), len(p), len(t)) if t and p else 0.0
        else:
            n = int(key[5:])
            tn, pn = _ngrams(t, n), _ngrams(p, n)
            out[key] = _f(sum((tn & pn).values()), sum(pn.values()), sum(tn.values()))
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples (rouge-score's ``score(target, prediction)``)."""
    _check(predictions, references)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        for key, value in rouge_f(ref, pred).items():
            totals[key] += value
    return {key: value / len(predictions) for key, value in totals.items()}
