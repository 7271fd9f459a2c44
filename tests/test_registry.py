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


def test_each_module_declares_the_spec_it_is_registered_with():
    """The registry read from the sources equals the SPEC each module holds when imported; the
    modules of the package that declare none are not algorithms."""
    import pkgutil

    import fedmoe.algorithms as pkg

    declared = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fedmoe.algorithms.{m.name}")
        if hasattr(mod, "SPEC"):
            declared[mod.__name__] = mod.SPEC
    assert {spec.server: spec for spec in REGISTRY} == declared
    # the order: docs/algorithms.md's sections, written out here
    assert ALGORITHM_NAMES == ("fedmoe", "fedavg", "fedprox", "scaffold", "random_moe", "hfedmoe", "flex")


def test_discover_finds_a_new_module_in_section_order(tmp_path):
    from fedmoe.algorithms import AlgorithmSpec, discover

    (tmp_path / "zeta.py").write_text('from fedmoe.algorithms import AlgorithmSpec\n\n'
                                      'SPEC = AlgorithmSpec("zeta", "Z", "m:Z", "x.zeta", "§2.1")\n')
    (tmp_path / "alpha.py").write_text('SPEC = AlgorithmSpec(name="alpha", summary="A", strategy="m:A",\n'
                                       '                     server="x.alpha", section="§4", node_plans=("a",))\n')
    (tmp_path / "helpers.py").write_text("import torch\nVALUE = 1\n")  # no SPEC: not an algorithm
    (tmp_path / "early.py").write_text('SPEC = AlgorithmSpec("early", "E", "m:E", "x.early", "§1")\n')
    assert discover(tmp_path) == (AlgorithmSpec("early", "E", "m:E", "x.early", "§1"),
                                  AlgorithmSpec("zeta", "Z", "m:Z", "x.zeta", "§2.1"),
                                  AlgorithmSpec("alpha", "A", "m:A", "x.alpha", "§4", ("a",)))


def test_node_plans_are_the_registered_ones():
    import fedmoe.engine.strategies  # noqa: F401 — registers the strategies' client code
    from fedmoe.engine.node_plans import NODE_PLANS

    assert set(NODE_PLANS) == {p for spec in REGISTRY for p in spec.node_plans}


def test_run_help_lists_every_algorithm():
    from fedmoe.cli import app

    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"}).output
    assert " | ".join(ALGORITHM_NAMES) in out
