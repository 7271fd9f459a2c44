"""Record types written to ``rounds.jsonl`` / ``summary.json`` (keys defined once, here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ClientRecord:
    client_id: int
    task: str
    stage: int
    loss: float
    score: float  #: validation score (task's main metric)
    num_examples: int
    bytes_down_base: int  #: one-time base weights sent this round (new experts / dense)
    bytes_down: int  #: trainable tensors sent this round
    bytes_up: int
    peak_memory_bytes: int
    predicted_memory_bytes: int
    budget_bytes: int
    num_experts: int
    steps: int
    error: str = ""
    #: the turn used more than its budget: measured peak > budget_bytes (predicted, when memory
    #: is not measured: ``engine.measure_memory = false`` or a failed turn)
    over_budget: bool = False
    #: the turn trained with gradient checkpointing (``train.gradient_checkpointing``; "auto": the search chose it)
    gradient_checkpointing: bool = False

    def judge_budget(self) -> None:
        used = self.peak_memory_bytes or self.predicted_memory_bytes
        self.over_budget = bool(self.budget_bytes) and used > self.budget_bytes


@dataclass
class RoundRecord:
    round: int
    stage: int
    sampled: list[int]
    clients: list[ClientRecord]
    wall_time_s: float
    bytes_down_base: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    actions: list[dict[str, Any]] = field(default_factory=list)
    theta: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
