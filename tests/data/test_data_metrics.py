"""Metrics (docs/algorithms.md §6.1) with hand-computed values, and the task adapters."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from fedmoe.data.examples import RCExample, TCExample, TSExample
from fedmoe.data.metrics import accuracy, exact_match, normalize_answer, rouge_scores, squad_scores, token_f1
from fedmoe.data.tasks import RCTask, TCTask, TSTask, get_task, label_names_of
from fedmoe.errors import ConfigError


def test_normalize_answer_official_rules() -> None:
    assert normalize_answer("  The Cat, an  a-b   sat!") == "cat ab sat"
    assert normalize_answer("Theater") == "theater"  # articles only as whole words


@pytest.mark.parametrize(
    ("pred", "truth", "em", "f1"),
    [
        ("the cat sat on the mat", "a cat sat on mat", 1.0, 1.0),
        ("Denver Broncos", "Broncos", 0.0, 2 / 3),  # P=1/2, R=1
        ("in the year 1995", "1995", 0.0, 0.5),  # P=1/3, R=1
        ("in the year 1995", "year 1995", 0.0, 0.8),  # P=2/3, R=1
        ("x y y", "y y z", 0.0, 2 / 3),  # overlap counts y twice: P=R=2/3
        ("Paris!", "paris", 1.0, 1.0),
        ("", "anything", 0.0, 0.0),
    ],
)
def test_squad_em_f1_pairs(pred: str, truth: str, em: float, f1: float) -> None:
    assert exact_match(pred, truth) == em
    assert token_f1(pred, truth) == pytest.approx(f1, abs=1e-12)


def test_squad_scores_max_over_truths_then_mean() -> None:
    got = squad_scores(
        ["in the year 1995", "Denver Broncos"], [["1995", "year 1995"], ["Broncos", "Denver Broncos"]]
    )
    assert got["f1"] == pytest.approx((0.8 + 1.0) / 2, abs=1e-12)
    assert got["em"] == 0.5


def test_rouge_hand_values_and_matches_rouge_score() -> None:
    got = rouge_scores(["the cat sat"], ["the cat sat down"])
    assert got["rouge1"] == pytest.approx(6 / 7, abs=1e-12)  # P=1, R=3/4
    assert got["rouge2"] == pytest.approx(0.8, abs=1e-12)  # P=1, R=2/3
    preds = ["Police arrested two men running in the park.", "Shares fell sharply.", ""]
    refs = ["Two men were arrested by police after a run.", "The shares rose.", "Empty prediction."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    mine = rouge_scores(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert mine[key] == sum(d[key].fmeasure for d in direct) / 3


def test_accuracy_and_length_checks() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        rouge_scores([], [])


def test_tc_task() -> None:
    task = TCTask()
    ex = TCExample("agnews-test-0", "Stocks rally", "Markets rose.", 2, "Business")
    assert task.to_text2text(ex) == ("Classify the topic: Stocks rally Markets rose.", "Business")
    assert task.to_classification(ex) == ("Stocks rally Markets rose.", 2)
    assert (
        task.parse_label(" sci/tech ") == 3
        and task.parse_label("Sports news") == 1
        and task.parse_label("?") == -1
    )
    assert task.score(["Business", "world", 1, "nonsense"], [2, 0, 2, 3]) == {"accuracy": 0.5}
    assert (task.name, task.metric) == ("tc", "accuracy")
    with pytest.raises(TypeError):
        task.to_text2text(TSExample("1", "d", "s"))


def test_rc_task() -> None:
    task = RCTask()
    ex = RCExample("q1", "P", "Paris is in France.", "Where is Paris?", ("France", "in France"), (12, 9))
    assert task.to_text2text(ex) == ("question: Where is Paris? context: Paris is in France.", "France")
    assert task.to_span(ex) == ("Where is Paris?", "Paris is in France.", 12, "France")
    assert ex.context[12 : 12 + len("France")] == "France"
    assert task.score(["in France"], [task.reference(ex)]) == {"f1": 1.0, "em": 1.0}
    assert (task.metric, task.metrics) == ("f1", ("f1", "em"))


def test_ts_task_and_registry() -> None:
    task = TSTask()
    ex = TSExample("1", "Long text.", "Short.")
    assert task.to_text2text(ex) == ("summarize: Long text.", "Short.")
    assert task.score(["Short."], [task.reference(ex)]) == {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0}
    assert task.metric == "rouge2"
    assert get_task("tc", ["A", "B"]).label_names == ("A", "B")
    assert isinstance(get_task("rc"), RCTask)
    with pytest.raises(ConfigError):
        get_task("qa")
    assert label_names_of([TCExample("a", "", "x", 1, "Sport")]) == ("World", "Sport", "Business", "Sci/Tech")


_LIGHT_ROUGE = """
import json, sys
from fedmoe.data.metrics import rouge_f
pairs = json.load(sys.stdin)
scores = [rouge_f(t, p) for t, p in pairs]
print(json.dumps({"scores": scores, "nltk": sorted(m for m in sys.modules if m == "nltk" or m.startswith("nltk.")),
                  "scipy": "scipy" in sys.modules, "rouge_score": "rouge_score" in sys.modules}))
import nltk  # a later full import still works
print(json.dumps({"full_nltk": hasattr(nltk, "word_tokenize") and hasattr(nltk.stem, "WordNetLemmatizer")}))
"""


def test_rouge_equals_rouge_score_on_real_summaries_without_importing_nltk(shared_data) -> None:
    """Our ROUGE against rouge-score itself, per example and exactly, on 300 real XSum pairs (target:
    the reference summary; prediction: the document's first sentence, as a lead baseline writes it) —
    computed in a fresh process that must not import NLTK's package or SciPy."""
    import json
    import subprocess
    import sys

    from fedmoe.data.loaders import load_xsum

    examples = load_xsum(shared_data / "xsum")[:300]
    pairs = [(ex.summary, ex.document.split("\n")[0].split(". ")[0]) for ex in examples]
    proc = subprocess.run([sys.executable, "-c", _LIGHT_ROUGE], input=json.dumps(pairs), capture_output=True,
                          text=True, check=True, timeout=300)
    light, after = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert light["nltk"] == [] and not light["scipy"] and not light["rouge_score"]
    assert after["full_nltk"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    assert sum(s["rouge2"] > 0 for s in light["scores"]) > 50  # the pairs overlap: not a comparison of zeros
    for (target, prediction), mine in zip(pairs, light["scores"], strict=True):
        ref = scorer.score(target, prediction)
        assert mine == {k: ref[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}, (target, prediction)
