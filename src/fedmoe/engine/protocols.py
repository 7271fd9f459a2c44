"""Types the engine's modules share, in a leaf: what a strategy, a node plan or a checkpoint sees.

Nothing here imports another ``fedmoe.engine`` module at run time, so :mod:`fedmoe.engine.run`,
the strategies, :mod:`fedmoe.engine.client`, :mod:`fedmoe.engine.node_plans` and
:mod:`fedmoe.engine.checkpoint` can all name these types without importing each other
(tests/test_architecture.py checks that the import graph has no cycle).

* :class:`ClientContext` — what every client turn needs besides its data (both engines).
* :class:`RunView` — the part of :class:`fedmoe.engine.run.Run` that strategies read in their
  per-round verbs (they never assign into it: setup and aggregation return new state, see
  :mod:`fedmoe.engine.strategies.base`) and checkpoints read and restore; ``Run`` satisfies it
  structurally. Strategies annotate ``run: Run`` with ``RunView`` imported under that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedmoe.config import ExperimentConfig
from fedmoe.moe.families import MoEFamily

if TYPE_CHECKING:
    import numpy as np

    from fedmoe.core.layout import UnitLayout
    from fedmoe.data.settings import ClientData, Federation
    from fedmoe.engine.budget import MemoryPlan
    from fedmoe.engine.records import RoundRecord
    from fedmoe.engine.trainables import Trainables


@dataclass
class ClientContext:
    cfg: ExperimentConfig
    family: MoEFamily
    kind: str
    tokenizer: Any
    device: torch.device
    tasks: dict[str, Any]


class RunView(Protocol):
    """What a strategy (and a checkpoint) may use of a run: config, federation, model, state."""

    cfg: ExperimentConfig
    out: Path
    fed: Federation
    clients: dict[int, ClientData]
    family: MoEFamily
    base: Any  #: the frozen global model (a Hugging Face MoE)
    base_layout: UnitLayout
    device: torch.device
    ctx: ClientContext
    plan: MemoryPlan
    trainables: Trainables
    strategy: Any  #: the run's :class:`fedmoe.engine.strategies.base.Strategy`
    cache: dict[int, set]
    rounds: list[RoundRecord]
    latest_p: dict[int, np.ndarray]
    p_snapshots: dict[str, dict[str, list]]

    def _base_bytes(self, cid: int, kept: list[list[int]]) -> int: ...
