"""Federated algorithms: pure server state and verbs (one module each), and the registry of algorithms.

:data:`REGISTRY` is the one list of the algorithms ``fedmoe run`` knows. It is not written
here: each algorithm's module in this package declares its own ``SPEC = AlgorithmSpec(...)``
next to its server verbs, and :func:`discover` collects them (:mod:`pkgutil` over this package,
ordered by their sections of docs/algorithms.md). Everything else is derived from it: the values ``ExperimentConfig.algorithm`` accepts (:data:`fedmoe.config._CHOICES`),
the ``--set`` help of ``fedmoe run``, the engine's strategies
(:data:`fedmoe.engine.strategies.STRATEGIES`, built from each entry's ``strategy``), and the set
of client-side node plans a Flower node must know (each entry's ``node_plans``; a test checks
them against :data:`fedmoe.engine.node_plans.NODE_PLANS`). Adding an algorithm: docs/extending.md.

This package's ``__init__`` imports nothing heavy (no torch): it reads the ``SPEC`` lines from the
modules' source (literal values only) instead of importing them, so :mod:`fedmoe.config` and the
CLI can read the registry cheaply; ``tests/test_registry.py`` checks that each module's imported
``SPEC`` equals the one read.
"""

from __future__ import annotations

import ast
import difflib
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path

from fedmoe.errors import ConfigError


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: its config name and where its parts live."""

    name: str  #: value of ``algorithm`` in the config
    summary: str  #: one line for help texts
    strategy: str  #: ``"module:Class"`` of its engine strategy (resolved by :mod:`fedmoe.engine.strategies`)
    server: str  #: module of its pure server state and verbs (the module that declares this spec)
    section: str  #: its section of docs/algorithms.md (also the registry's order)
    node_plans: tuple[str, ...] = ()  #: names of its client-side code (:mod:`fedmoe.engine.node_plans`)


def _literal_spec(path: Path) -> AlgorithmSpec | None:
    """The ``SPEC = AlgorithmSpec(...)`` a module of this package declares, read from its source
    (literal arguments only; the module is not imported, so reading the registry costs no torch)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SPEC"]
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "AlgorithmSpec"):
            names = [f.name for f in fields(AlgorithmSpec)]
            kwargs = dict(zip(names, (ast.literal_eval(a) for a in node.value.args), strict=False))
            kwargs.update({k.arg: ast.literal_eval(k.value) for k in node.value.keywords if k.arg})
            return AlgorithmSpec(**kwargs)
    return None


def _section_key(spec: AlgorithmSpec) -> tuple[tuple[int, ...], str]:
    return tuple(int(x) for x in spec.section.lstrip("§").split(".")), spec.name


def discover(folder: Path | None = None) -> tuple[AlgorithmSpec, ...]:
    """Every module of this package (or of ``folder``) that declares a ``SPEC``, in the order of
    their sections of docs/algorithms.md (then by name): the registry."""
    here = folder or Path(__file__).resolve().parent
    specs = [s for m in pkgutil.iter_modules([str(here)]) if not m.ispkg
             if (s := _literal_spec(here / f"{m.name}.py")) is not None]
    return tuple(sorted(specs, key=_section_key))


#: the algorithms ``fedmoe run`` knows, discovered from this package (:func:`discover`)
REGISTRY: tuple[AlgorithmSpec, ...] = discover()

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
