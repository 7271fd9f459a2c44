"""The algorithm registry is the one list: config choices, CLI help, strategies and node plans follow it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmoe.algorithms import ALGORITHM_NAMES, REGISTRY, algorithm_spec
from fedmoe.config import _CHOICES, load_config
from fedmoe.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_docs_citations import defined_sections  # noqa: E402


def test_names_are_unique_and_config_accepts_exactly_them():
    assert len(set(ALGORITHM_NAMES)) == len(REGISTRY) == 7
    assert _CHOICES["algorithm"] == ALGORITHM_NAMES
    for name in ALGORITHM_NAMES:
        assert load_config(None, [f"algorithm={name}"]).algorithm == name
    with pytest.raises(ConfigError, match="did you mean `flex`"):
        algorithm_spec("flx")


def test_every_entry_resolves():
    from fedmoe.engine.strategies import STRATEGIES, get_strategy
    from fedmoe.engine.strategies.base import Strategy

    assert list(STRATEGIES) == list(ALGORITHM_NAMES)
    for spec in REGISTRY:
        module, _, cls = spec.strategy.partition(":")
        assert STRATEGIES[spec.name] is getattr(importlib.import_module(module), cls)
        assert issubclass(STRATEGIES[spec.name], Strategy) and get_strategy(spec.name).name == spec.name
        importlib.import_module(spec.server)
        assert spec.section.lstrip("§") in defined_sections()


def test_node_plans_are_the_registered_ones():
    import fedmoe.engine.strategies  # noqa: F401 — registers the strategies' client code
    from fedmoe.engine.node_plans import NODE_PLANS

    assert set(NODE_PLANS) == {p for spec in REGISTRY for p in spec.node_plans}


def test_run_help_lists_every_algorithm():
    from fedmoe.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"}).output
    assert " | ".join(ALGORITHM_NAMES) in out
