"""The three task types and how a model sees them (docs/algorithms.md §5, §6).

Each task says how an example becomes model input (text-to-text, or an encoder head's
classification / span target) and how predictions are scored. Tokenisation is the
trainer's job. Scores are fractions in [0, 1]; ``metric`` names the headline score
(TC accuracy, RC F1, TS ROUGE-2), ``metrics`` all keys ``score`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedmoe.data.examples import AG_NEWS_CLASSES, Example, RCExample, TCExample, TSExample
from fedmoe.data.metrics import ROUGE_TYPES, accuracy, rouge_scores, squad_scores
from fedmoe.errors import ConfigError

TASK_TYPES: tuple[str, ...] = ("tc", "rc", "ts")


@dataclass(frozen=True)
class PromptParts:
    """A decoder-only prompt in pieces: ``head`` (instruction and field label) + ``body`` (the
    long field: the only piece cut when the window is short) + ``tail`` (the question) form
    the user's message; ``cue`` opens the answer (``"Topic:"``). How the pieces become tokens
    (chat template or plain text, truncation) is :func:`fedmoe.train.batching.causal_prompt`'s job."""

    head: str
    body: str
    tail: str
    cue: str


def _expect(example: Example, cls: type, task: str) -> Any:
    if not isinstance(example, cls):
        raise TypeError(f"task `{task}` expects a {cls.__name__}, got {type(example).__name__}.")
    return example


@dataclass(frozen=True)
class TCTask:
    """Text classification (AG News topic), scored by accuracy."""

    label_names: tuple[str, ...] = AG_NEWS_CLASSES
    name: ClassVar[str] = "tc"
    dataset: ClassVar[str] = "ag_news"
    metric: ClassVar[str] = "accuracy"
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    prompt: ClassVar[str] = "Classify the topic: "

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_text2text(self, example: Example) -> tuple[str, str]:
        """``("Classify the topic: <title> <description>", <label word>)``."""
        ex: TCExample = _expect(example, TCExample, self.name)
        return self.prompt + ex.text, self.label_names[ex.label]

    def to_prompt(self, example: Example) -> PromptParts:
        """Decoder-only prompt; the answer is the label word."""
        ex: TCExample = _expect(example, TCExample, self.name)
        head = f"What is the topic of this news article? Answer with one of: {', '.join(self.label_names)}.\n\nArticle: "
        return PromptParts(head, ex.text, "", "Topic:")

    def to_classification(self, example: Example) -> tuple[str, int]:
        """``(text, 0-based label id)`` for an encoder classification head."""
        ex: TCExample = _expect(example, TCExample, self.name)
        return ex.text, ex.label

    def reference(self, example: Example) -> int:
        return _expect(example, TCExample, self.name).label

    def parse_label(self, prediction: str | int) -> int:
        """Label id of a prediction: an int as is, a string by (case-insensitive) label word; -1 if none."""
        if isinstance(prediction, int):
            return prediction
        text = prediction.strip().lower()
        names = [n.lower() for n in self.label_names]
        if text in names:
            return names.index(text)
        starts = [i for i, n in enumerate(names) if text.startswith(n)]
        return max(starts, key=lambda i: len(names[i])) if starts else -1

    def score(self, predictions: Sequence[str | int], references: Sequence[str | int]) -> dict[str, float]:
        """Accuracy; predictions and references may be label ids or label words."""
        preds = [self.parse_label(p) for p in predictions]
        refs = [self.parse_label(r) for r in references]
        return {"accuracy": accuracy(preds, refs)}


@dataclass(frozen=True)
class RCTask:
    """Extractive reading comprehension (SQuAD v1.1), scored by F1 and EM."""

    name: ClassVar[str] = "rc"
    dataset: ClassVar[str] = "squad"
    metric: ClassVar[str] = "f1"
    metrics: ClassVar[tuple[str, ...]] = ("f1", "em")

    def to_text2text(self, example: Example) -> tuple[str, str]:
        """``("question: <q> context: <c>", <first ground-truth answer>)``."""
        ex: RCExample = _expect(example, RCExample, self.name)
        return f"question: {ex.question} context: {ex.context}", ex.answers[0]

    def to_prompt(self, example: Example) -> PromptParts:
        """Decoder-only prompt; the answer is a span of the passage."""
        ex: RCExample = _expect(example, RCExample, self.name)
        head = "Answer the question with a short span copied from the passage.\n\nPassage: "
        return PromptParts(head, ex.context, f"\n\nQuestion: {ex.question}", "Answer:")

    def to_span(self, example: Example) -> tuple[str, str, int, str]:
        """``(question, context, answer_char_start, answer_text)`` of the first answer."""
        ex: RCExample = _expect(example, RCExample, self.name)
        return ex.question, ex.context, ex.answer_starts[0], ex.answers[0]

    def reference(self, example: Example) -> tuple[str, ...]:
        return _expect(example, RCExample, self.name).answers

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        """SQuAD v1.1 F1 and EM (max over each example's ground truths)."""
        return squad_scores(predictions, references)


@dataclass(frozen=True)
class TSTask:
    """Abstractive summarization (XSum), scored by ROUGE-2 F (and ROUGE-1/L)."""

    name: ClassVar[str] = "ts"
    dataset: ClassVar[str] = "xsum"
    metric: ClassVar[str] = "rouge2"
    metrics: ClassVar[tuple[str, ...]] = ROUGE_TYPES
    prompt: ClassVar[str] = "summarize: "

    def to_text2text(self, example: Example) -> tuple[str, str]:
        """``("summarize: <document>", <summary>)``."""
        ex: TSExample = _expect(example, TSExample, self.name)
        return self.prompt + ex.document, ex.summary

    def to_prompt(self, example: Example) -> PromptParts:
        """Decoder-only prompt; the answer is the one-sentence summary."""
        ex: TSExample = _expect(example, TSExample, self.name)
        return PromptParts("Summarize the article in one sentence.\n\nArticle: ", ex.document, "", "Summary:")

    def reference(self, example: Example) -> str:
        return _expect(example, TSExample, self.name).summary

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Mean ROUGE-1/2/L F-measure (rouge-score's rules, Porter stemmer: :func:`fedmoe.data.metrics.rouge_scores`)."""
        return rouge_scores(predictions, references)


Task = TCTask | RCTask | TSTask


def get_task(name: str, label_names: Sequence[str] | None = None) -> Task:
    """The task object for ``tc`` / ``rc`` / ``ts`` (``label_names`` only for ``tc``)."""
    if name == "tc":
        return TCTask(tuple(label_names)) if label_names else TCTask()
    if name == "rc":
        return RCTask()
    if name == "ts":
        return TSTask()
    raise ConfigError(f"Unknown task `{name}` in data.tasks.", f"use a subset of {list(TASK_TYPES)}.")


def label_names_of(examples: Sequence[Example]) -> tuple[str, ...]:
    """TC label names as seen in ``examples`` (official AG News names fill any gap)."""
    names = dict(enumerate(AG_NEWS_CLASSES))
    for ex in examples:
        if isinstance(ex, TCExample):
            names[ex.label] = ex.label_name
    return tuple(names.get(i, f"label{i}") for i in range(max(names) + 1))
