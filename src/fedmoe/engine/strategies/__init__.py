"""Engine strategies: how each algorithm plans rounds, prepares clients and aggregates.

A strategy (Flower's configure/aggregate verbs) glues a pure algorithm module
(:mod:`fedmoe.algorithms`) to the engine. :data:`STRATEGIES` is derived from the algorithm
registry (:data:`fedmoe.algorithms.REGISTRY`, each entry's ``strategy``; an algorithm's module
declares its entry, docs/extending.md). Importing this package imports every strategy module, which
registers their client code (:mod:`fedmoe.engine.node_plans`).
"""

from __future__ import annotations

import importlib

from fedmoe.algorithms import REGISTRY, algorithm_spec
from fedmoe.engine.strategies.base import Strategy


def _strategy_class(path: str) -> type[Strategy]:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


STRATEGIES: dict[str, type[Strategy]] = {spec.name: _strategy_class(spec.strategy) for spec in REGISTRY}


def get_strategy(name: str) -> Strategy:
    algorithm_spec(name)  # unknown name: ConfigError with the nearest one
    return STRATEGIES[name](name)
