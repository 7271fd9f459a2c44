"""randomMoE — docs/algorithms.md §2.4: FedMoE with random expert sets and no recommendation.

Each client's expert set is drawn at random under the same memory rule as FedMoE's
stage-1 search (``α·M_k``; :func:`fedmoe.core.search.random_expert_sets`: one random expert
per layer first, then every other unit in one shuffled order while it fits). Training and
modular aggregation are FedMoE's (Mei et al. 2024, Algorithm 1 line 9); there is no stage 1
and no expert recommendation (stage 2 step 5 is skipped). The same sets serve the paper's
ablation "w/o stage 1" when recommendation stays on.

On the engine, randomMoE is :class:`fedmoe.engine.strategies.fedmoe.FedMoEStrategy` under
the name ``random_moe``; this module is the algorithm-level entry point.
"""

from __future__ import annotations

import numpy as np

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.algorithms.fedmoe import FedMoEServerState, MemoryTable, after_round, initial_expert_sets
from fedmoe.core.search import random_expert_sets

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("random_moe", "randomMoE: random expert sets under the same budget, no recommendation",
                     "fedmoe.engine.strategies.fedmoe:FedMoEStrategy", "fedmoe.algorithms.random_moe", "§2.4")

__all__ = ["FedMoEServerState", "MemoryTable", "after_round", "initial_sets", "random_expert_sets"]


def initial_sets(
    memory: MemoryTable, rng: np.random.Generator, *, alpha: float = 0.9, exclude_unfit: bool = False,
    state: FedMoEServerState | None = None,
) -> FedMoEServerState:
    """Random initial client-expert map for every client of ``memory.budgets`` (ascending id).

    A client whose dense part plus one expert per layer exceeds ``α·M_k`` raises
    :class:`~fedmoe.errors.BudgetError`, or is recorded in ``state.excluded`` when
    ``exclude_unfit``. Deterministic given ``rng``. Run stage 2 with
    ``after_round(..., stage2_adjust=False)`` (no recommendation).
    """
    p = {cid: np.zeros_like(memory.expert_bytes, dtype=np.float64) for cid in memory.budgets}
    return initial_expert_sets(state or FedMoEServerState(), p, memory, alpha=alpha, exclude_unfit=exclude_unfit,
                               random_init=rng)
