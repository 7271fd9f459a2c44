"""Federated algorithms: server-side state and verbs, looked up by name.

``ALGORITHMS`` maps the ``algorithm`` config value to the module implementing it. Names of
``ExperimentConfig.algorithm`` listed in ``PLANNED`` get an entry here once their module
exists (random_moe = :mod:`fedmoe.algorithms.fedmoe` with ``initial_expert_sets(random_init=rng)``
and ``stage2_adjust=False``, documented in :mod:`fedmoe.algorithms.random_moe`).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from fedmoe.errors import ConfigError

ALGORITHMS: dict[str, str] = {
    "fedmoe": "fedmoe.algorithms.fedmoe",
    "fedavg": "fedmoe.algorithms.fedavg",
    "fedprox": "fedmoe.algorithms.fedprox",
    "scaffold": "fedmoe.algorithms.scaffold",
    "random_moe": "fedmoe.algorithms.random_moe",
    "hfedmoe": "fedmoe.algorithms.hfedmoe",
    "flex": "fedmoe.algorithms.flex",
}

PLANNED: tuple[str, ...] = ()


def get_algorithm(name: str) -> ModuleType:
    """Import and return the module implementing algorithm ``name``."""
    if name not in ALGORITHMS:
        if name in PLANNED:
            raise ConfigError(f"Algorithm `{name}` is not implemented yet.", f"use one of {sorted(ALGORITHMS)}.")
        close = difflib.get_close_matches(name, [*ALGORITHMS, *PLANNED], n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"use one of {sorted(ALGORITHMS)}."
        raise ConfigError(f"Unknown algorithm `{name}`.", hint)
    return importlib.import_module(ALGORITHMS[name])
