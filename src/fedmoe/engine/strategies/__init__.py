"""Engine strategies: how each algorithm plans rounds, prepares clients and aggregates.

A strategy (Flower's configure/aggregate verbs) glues a pure algorithm module
(:mod:`fedmoe.algorithms`) to the engine. Register new ones in :data:`STRATEGIES`.
"""

from __future__ import annotations

import difflib

from fedmoe.engine.strategies.base import Strategy
from fedmoe.engine.strategies.baselines import FedAvgStrategy, FedProxStrategy, ScaffoldStrategy
from fedmoe.engine.strategies.fedmoe import FedMoEStrategy
from fedmoe.engine.strategies.flex import FlexStrategy
from fedmoe.engine.strategies.hfedmoe import HFedMoEStrategy
from fedmoe.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    "fedmoe": FedMoEStrategy,
    "random_moe": FedMoEStrategy,  # random initial sets, no recommendation (docs/algorithms.md §2.4)
    "fedavg": FedAvgStrategy,  # dense-sharing baselines (docs/algorithms.md §2)
    "fedprox": FedProxStrategy,
    "scaffold": ScaffoldStrategy,
    "hfedmoe": HFedMoEStrategy,  # budget-aware selection + sparsity-aware aggregation (docs/algorithms.md §3)
    "flex": FlexStrategy,  # personalised grafted side experts (docs/algorithms.md §4)
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"use one of: {', '.join(sorted(STRATEGIES))}."
        raise ConfigError(f"Unknown algorithm `{name}`.", hint)
    return STRATEGIES[name](name)
