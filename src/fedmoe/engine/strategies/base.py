"""Strategy protocol used by :class:`fedmoe.engine.run.Run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmoe.core.aggregation import ClientUpdate, modular_aggregate
from fedmoe.engine.client import ClientPlan, ClientReply
from fedmoe.engine.trainables import Trainables

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run


@dataclass
class RoundPlan:
    round: int
    stage: int
    sampled: list[int]
    sets: dict[int, list[list[int]]]
    skipped: dict[int, str] = field(default_factory=dict)


class Strategy:
    """Default behaviour: modular aggregation of the trainable state, no extras."""

    #: non-empty: clients wrap their model with their own trainables and keep personal state
    #: between rounds (:func:`fedmoe.engine.node_plans.register_client_kind`); a remote engine
    #: asks nodes to build that kind, checks replies with the global ``run.trainables`` and runs
    #: the final evaluation on the nodes, since only they hold the personal state
    client_kind: str = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, run: Run) -> None:
        """Called once after the model, data and budgets are ready."""

    def num_rounds(self, run: Run) -> int:
        raise NotImplementedError

    def plan(self, run: Run, rnd: int) -> RoundPlan:
        """The plan of round ``rnd`` — a function of the strategy state and ``rnd`` only
        (per-round seeded randomness), so a resumed run replays exactly."""
        raise NotImplementedError

    def round_rng(self, run: Run, rnd: int, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([run.cfg.seed, rnd, salt])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (pickled into the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def client_plan(self, run: Run, cid: int, kept: list[list[int]]) -> ClientPlan | None:
        return None

    def uses_checkpointing(self, run: Run, cid: int, stage: int) -> bool:
        """Whether client ``cid`` trains with gradient checkpointing this turn. Default: only when
        ``train.gradient_checkpointing`` is ``true`` (``"auto"`` buys experts only where a strategy
        searches expert sets under the memory plan: FedMoE/randomMoE, HFedMoE)."""
        return run.cfg.train.gradient_checkpointing is True

    def client_trainables(self, run: Run, cid: int, rnd: int | None) -> Trainables:
        """How client ``cid`` wraps its sub-MoE and what travels, in round ``rnd`` (None: final evaluation).

        Default: the run's :class:`~fedmoe.engine.trainables.Trainables`. A strategy returns its own
        (sub)class to change what trains, what is sent and what stays on the client (FLEx).
        """
        return run.trainables

    def aggregate(self, run: Run, plan: RoundPlan, updates: list[ClientUpdate], replies: dict[int, ClientReply]) -> None:
        run.trainables.state = modular_aggregate(run.trainables.state, run.trainables.layout, updates)

    def after_round(self, run: Run, plan: RoundPlan, replies: dict[int, ClientReply]) -> dict[str, Any]:
        """Structure updates after aggregation; returns extra fields for the round record."""
        return {}

    def final_sets(self, run: Run) -> dict[int, list[list[int]]]:
        """Each client's expert set for the final evaluation."""
        raise NotImplementedError

    def expert_counts(self, run: Run) -> dict[str, float]:
        counts = [sum(len(k) for k in s) for s in self.final_sets(run).values()]
        if not counts:
            return {"mean": 0.0, "min": 0.0, "max": 0.0}
        return {"mean": sum(counts) / len(counts), "min": float(min(counts)), "max": float(max(counts))}
