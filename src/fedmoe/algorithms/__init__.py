"""Federated algorithms: pure server state and verbs (one module each), and the registry of algorithms.

:data:`REGISTRY` is the one list of the algorithms ``fedmoe run`` knows. Everything else is
derived from it: the values ``ExperimentConfig.algorithm`` accepts (:data:`fedmoe.config._CHOICES`),
the ``--set`` help of ``fedmoe run``, the engine's strategies
(:data:`fedmoe.engine.strategies.STRATEGIES`, built from each entry's ``strategy``), and the set
of client-side node plans a Flower node must know (each entry's ``node_plans``; a test checks
them against :data:`fedmoe.engine.node_plans.NODE_PLANS`). Adding an algorithm: docs/extending.md.

This package's ``__init__`` imports nothing heavy (no torch), so :mod:`fedmoe.config` can read it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from fedmoe.errors import ConfigError


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: its config name and where its parts live."""

    name: str  #: value of ``algorithm`` in the config
    summary: str  #: one line for help texts
    strategy: str  #: ``"module:Class"`` of its engine strategy (resolved by :mod:`fedmoe.engine.strategies`)
    server: str  #: module of its pure server state and verbs
    section: str  #: its section of docs/algorithms.md
    node_plans: tuple[str, ...] = ()  #: names of its client-side code (:mod:`fedmoe.engine.node_plans`)


_S = "fedmoe.engine.strategies."
REGISTRY: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec("fedmoe", "FedMoE: stage-1 submodel search, modular aggregation, expert recommendation",
                  _S + "fedmoe:FedMoEStrategy", "fedmoe.algorithms.fedmoe", "§1"),
    AlgorithmSpec("random_moe", "randomMoE: random expert sets under the same budget, no recommendation",
                  _S + "fedmoe:FedMoEStrategy", "fedmoe.algorithms.random_moe", "§2.4"),
    AlgorithmSpec("fedavg", "FedAvg on a global MoE every client can hold",
                  _S + "baselines:FedAvgStrategy", "fedmoe.algorithms.fedavg", "§2.1"),
    AlgorithmSpec("fedprox", "FedProx: FedAvg + proximal term in the local loss",
                  _S + "baselines:FedProxStrategy", "fedmoe.algorithms.fedprox", "§2.2", ("fedprox",)),
    AlgorithmSpec("scaffold", "SCAFFOLD: control variates correct the local gradients",
                  _S + "baselines:ScaffoldStrategy", "fedmoe.algorithms.scaffold", "§2.3", ("scaffold",)),
    AlgorithmSpec("hfedmoe", "HFedMoE: budget-aware expert selection, sparsity-aware aggregation",
                  _S + "hfedmoe:HFedMoEStrategy", "fedmoe.algorithms.hfedmoe", "§3"),
    AlgorithmSpec("flex", "FLEx: one personalised grafted side expert per client and layer",
                  _S + "flex:FlexStrategy", "fedmoe.algorithms.flex", "§4", ("flex-choice",)),
)

#: the algorithm names, in registry order
ALGORITHM_NAMES: tuple[str, ...] = tuple(s.name for s in REGISTRY)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registry entry ``name``; :class:`ConfigError` with the nearest name otherwise."""
    for spec in REGISTRY:
        if spec.name == name:
            return spec
    close = difflib.get_close_matches(name, ALGORITHM_NAMES, n=1)
    hint = f"did you mean `{close[0]}`?" if close else f"use one of: {', '.join(ALGORITHM_NAMES)}."
    raise ConfigError(f"Unknown algorithm `{name}`.", hint)
