"""Frozen example records for the three task types (docs/algorithms.md §5).

Every example carries a stable ``id`` so partitions can be hashed and compared across
builds: ``agnews-<file stem>-<row>`` for AG News, the SQuAD question id, the XSum id.
"""

from __future__ import annotations

from dataclasses import dataclass

#: AG News label names in the official ``classes.txt`` order (label 1..4 -> index 0..3).
AG_NEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")


@dataclass(frozen=True)
class TCExample:
    """A text-classification (AG News) example; ``label`` is 0-based."""

    id: str
    title: str
    description: str
    label: int
    label_name: str

    @property
    def text(self) -> str:
        """Title and description joined the way the hub ``ag_news`` ``text`` field is."""
        return f"{self.title} {self.description}".strip() if self.title else self.description.strip()


@dataclass(frozen=True)
class RCExample:
    """A reading-comprehension (SQuAD v1.1) question with all ground-truth answers."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass(frozen=True)
class TSExample:
    """A summarization (XSum) document/summary pair."""

    id: str
    document: str
    summary: str


Example = TCExample | RCExample | TSExample
