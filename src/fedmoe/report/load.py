"""Read run directories written by :func:`fedmoe.engine.run.run_experiment` and group them.

A run directory holds ``config.toml`` (resolved), ``rounds.jsonl``, ``summary.json`` and,
when the engine logged it, ``p_by_task.json`` (``{"after_stage1"|"end": {task: [[p]]}}``).
Runs are grouped by (model, setting, method variant); the seeds of a group are aggregated.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.config_keys import migrate
from fedmoe.errors import FedMoEError

#: display order and names of the methods (paper's Table 1 rows, then the newer methods)
METHOD_ORDER: tuple[str, ...] = ("fedmoe", "random_moe", "fedprox", "scaffold", "fedavg", "hfedmoe", "flex")
METHOD_TITLE: dict[str, str] = {
    "fedmoe": "FedMoE", "random_moe": "randomMoE", "fedprox": "FedProx", "scaffold": "SCAFFOLD",
    "fedavg": "FedAvg", "hfedmoe": "HFedMoE", "flex": "FLEx",
    "fedmoe/no-stage1": "w/o stage 1", "fedmoe/no-stage2": "w/o stage 2",
    "fedmoe/no-stage1-no-stage2": "w/o stage 1 & 2",
}
#: ablation variants of FedMoE (paper Table 2), in display order
ABLATIONS: tuple[str, ...] = ("fedmoe", "fedmoe/no-stage1", "fedmoe/no-stage2", "fedmoe/no-stage1-no-stage2")
SETTING_ORDER: tuple[str, ...] = ("standard-hetero-t", "standard-hetero-td", "enforced-hetero-t", "enforced-hetero-td")
SETTING_TITLE: dict[str, str] = {
    "standard-hetero-t": "Standard-Hetero-T", "standard-hetero-td": "Standard-Hetero-TD",
    "enforced-hetero-t": "Enforced-Hetero-T", "enforced-hetero-td": "Enforced-Hetero-TD",
}
SETTING_SHORT: dict[str, str] = {
    "standard-hetero-t": "S-T", "standard-hetero-td": "S-TD", "enforced-hetero-t": "E-T", "enforced-hetero-td": "E-TD",
}


class ReportError(FedMoEError):
    """A run directory that cannot be read, or nothing to report."""


@dataclass
class RunData:
    """One run directory's records, as plain JSON/TOML data."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    p_by_task: dict[str, dict[str, list[list[float]]]] | None = None

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm") or self.summary.get("algorithm", "?"))

    @property
    def setting(self) -> str:
        return str(self.summary.get("setting") or self.config.get("setting", {}).get("preset", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.summary.get("seed", 0)))

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name") or self.summary.get("model", "?"))

    @property
    def method(self) -> str:
        """Algorithm name, with the FedMoE ablation switches (``fedmoe.stage1`` /
        ``fedmoe.stage2_adjust`` = false) as suffixes: ``fedmoe/no-stage1`` …"""
        return method_key(self.algorithm, self.config.get("fedmoe", {}))


def method_key(algorithm: str, fedmoe_section: dict[str, Any]) -> str:
    """Group key of a method variant (only ``fedmoe`` has ablation variants)."""
    if algorithm != "fedmoe":
        return algorithm
    parts = []
    if fedmoe_section.get("stage1", True) is False:
        parts.append("no-stage1")
    if fedmoe_section.get("stage2_adjust", True) is False:
        parts.append("no-stage2")
    return algorithm + ("/" + "-".join(parts) if parts else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}.", "re-run that cell or remove the directory.") from None


def load_run(path: str | Path) -> RunData:
    """Read one run directory (``summary.json``, ``rounds.jsonl``, ``config.toml`` required)."""
    d = Path(path)
    for name in ("summary.json", "rounds.jsonl", "config.toml"):
        if not (d / name).is_file():
            raise ReportError(f"{d} has no {name}; it is not a finished run directory.",
                              "pass directories written by `fedmoe run` (finished runs have summary.json).")
    try:
        config = migrate(tomllib.loads((d / "config.toml").read_text()))  # a run written before a key moved
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{d / 'config.toml'} is not valid TOML: {exc}.") from None
    rounds = []
    for n, line in enumerate((d / "rounds.jsonl").read_text().splitlines(), start=1):
        if line.strip():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{d / 'rounds.jsonl'} line {n} is not valid JSON: {exc}.") from None
    p_file = d / "p_by_task.json"
    p = _read_json(p_file) if p_file.is_file() else None
    return RunData(d, config, _read_json(d / "summary.json"), rounds, p)


def find_run_dirs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Run directories at or below ``paths`` (a directory with ``rounds.jsonl`` is a run).

    Returns ``(finished, notes)``: unfinished runs (no ``summary.json``) are listed in the
    notes and left out. Raises :class:`ReportError` for a path that does not exist.
    """
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ReportError(f"{p} does not exist.", "pass run directories (or folders holding them).")
        if (p / "rounds.jsonl").is_file():
            found.append(p)
        else:
            found.extend(sorted(q.parent for q in p.rglob("rounds.jsonl")))
    seen: set[Path] = set()
    finished, notes = [], []
    for d in found:
        r = d.resolve()
        if r in seen:
            continue
        seen.add(r)
        if (d / "summary.json").is_file():
            finished.append(d)
        else:
            notes.append(f"skipped unfinished run {d} (no summary.json)")
    return finished, notes


@dataclass
class Group:
    """The seeds of one (model, setting, method) cell."""

    model: str
    setting: str
    method: str
    runs: list[RunData] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)


def _order(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), value) if value in order else (len(order), value)


def method_order(method: str) -> tuple[int, int, str]:
    """Sort key: Table-1 methods first, then ablation variants."""
    base = method.split("/")[0]
    return (_order(base, METHOD_ORDER)[0], ABLATIONS.index(method) if method in ABLATIONS else 99, method)


def setting_order(setting: str) -> tuple[int, str]:
    return _order(setting, SETTING_ORDER)


def group_runs(runs: list[RunData]) -> tuple[list[Group], list[str]]:
    """Group by (model, setting, method); notes name duplicate seeds within a group."""
    groups: dict[tuple[str, str, str], Group] = {}
    for r in runs:
        key = (r.model, r.setting, r.method)
        groups.setdefault(key, Group(*key)).runs.append(r)
    notes = []
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed, str(r.path)))
        if len(set(g.seeds)) != len(g.seeds):
            notes.append(f"{g.setting}/{g.method}: the same seed appears twice ({g.seeds}); each run counts once")
    ordered = sorted(groups.values(), key=lambda g: (g.model, setting_order(g.setting), method_order(g.method)))
    return ordered, notes


def method_title(method: str) -> str:
    return METHOD_TITLE.get(method, method)


def setting_title(setting: str) -> str:
    return SETTING_TITLE.get(setting, setting)
