"""Strategy protocol used by :class:`fedmoe.engine.run.Run`.

A strategy never assigns into the run. :meth:`Strategy.setup` receives a :class:`SetupInput`
(its own config section, the federation section, the LoRA spec, the seed, the memory plan, the
clients' ids / tasks / train sizes, and the loaded model for surgery) and returns a
:class:`NewGlobal` when it changes the global model or the trainable state, which the engine
installs (:meth:`fedmoe.engine.run.Run.install`); :meth:`Strategy.aggregate` receives the
current global trainables and returns the new trainable state. The other verbs (``plan``,
``client_plan``, ``client_trainables``, ``after_round``, ``final_sets``) read the run through
the read-only view :class:`fedmoe.engine.protocols.RunView` (the sampler, the clients' data,
the device) and change only the strategy's own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedmoe.config import FederationConfig
from fedmoe.core.aggregation import ClientUpdate, modular_aggregate
from fedmoe.engine.client import ClientPlan, ClientReply
from fedmoe.engine.trainables import Trainables
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.lora import LoraSpec

if TYPE_CHECKING:
    from fedmoe.engine.budget import MemoryPlan
    from fedmoe.engine.protocols import RunView as Run


@dataclass(frozen=True)
class ClientInfo:
    """What a strategy's setup knows of a client: its task and the size of its train split."""

    task: str
    num_train: int


@dataclass(frozen=True)
class SetupInput:
    """Everything :meth:`Strategy.setup` may read (built by the engine from the run)."""

    section: Any  #: the strategy's own config section (:attr:`Strategy.config_section`), or None
    federation: FederationConfig  #: rounds, clients per round, exclusion of unfit clients
    finetune: str  #: ``train.finetune``
    lora: LoraSpec  #: ``train.lora_*``
    seed: int
    plan: MemoryPlan  #: the run's memory table (budgets M_k, dense / expert bytes), experts per layer
    clients: dict[int, ClientInfo]  #: client id → task, train size (ascending ids)
    model: Any  #: the loaded global model (frozen; for surgery on a copy, never in place)
    family: MoEFamily
    trainables: Trainables  #: the engine's global trainables for ``model`` (read only)


@dataclass(frozen=True)
class NewGlobal:
    """What a strategy's setup hands back for the engine to install: the global trainables, and
    a new global model with its memory plan when the strategy replaced the model."""

    trainables: Trainables
    model: Any = None  #: None: the loaded model stays the global model
    plan: MemoryPlan | None = None


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
    #: name of the strategy's own section of :class:`fedmoe.config.ExperimentConfig` ("" = none)
    config_section: str = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, inp: SetupInput) -> NewGlobal | None:
        """Called once after the model, data and budgets are ready; returns the new global
        state to install (None: the engine's default model and trainables stay)."""
        return None

    def num_rounds(self) -> int:
        """Rounds of the run (after :meth:`setup`)."""
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

    def extra_training_bytes(self, cid: int) -> float:
        """Training bytes client ``cid``'s turn holds beyond its sub-MoE's price
        (``run.plan.submodel_bytes``), added to its ``predicted_memory_bytes``: none by default;
        FLEx's side experts."""
        return 0.0

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

    def aggregate(self, current: Trainables, plan: RoundPlan, updates: list[ClientUpdate],
                  replies: dict[int, ClientReply]) -> dict[str, torch.Tensor]:
        """The new global trainable state from ``current`` and the round's surviving updates."""
        return modular_aggregate(current.state, current.layout, updates)

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
