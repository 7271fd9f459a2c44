"""Run config and node config of the Flower apps (light: no torch import, so a SuperNode
answers identity queries quickly).

Node state: clients' own state between turns (SCAFFOLD's ``c_k``, FLEx's side experts) goes
under :meth:`NodeIdentity.run_state_dir` (node config ``state-dir``).

Node identity: a SuperNode started with ``--node-config "partition-id=P num-partitions=N"``
serves the experiment's clients ``c`` with ``c % N == P`` (the Flower simulation engine sets
both keys itself). With ``N`` equal to ``setting.num_clients`` each node is one client.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedmoe.config import ExperimentConfig, load_config
from fedmoe.engine.faults import parse_faults as _parse_faults
from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K

DEFAULT_EXPERIMENT = "configs/tiny.toml"
DEFAULT_OUT_DIR = "runs/flower"
DEFAULT_ROUND_TIMEOUT = 1800.0
DEFAULT_DISCOVERY_TIMEOUT = 300.0


def parse_overrides(text: str) -> list[str]:
    """``"a.b=1; c.d=x"`` → ``["a.b=1", "c.d=x"]`` (``;`` or newlines separate items)."""
    items = text.replace("\n", ";").split(";")
    return [item.strip() for item in items if item.strip()]


def parse_faults(text: str) -> dict[tuple[int, int], str]:
    """``"2:1,3:4:nan"`` → ``{(2, 1): "raise", (3, 4): "nan"}``: (round, client id) → fault kind
    (:data:`fedmoe.engine.faults.FAULT_KINDS`) of turns that misbehave (tests and drills only)."""
    return _parse_faults(text, key=K.RUN_INJECT_FAULT)


#: the app's own run-config keys; every other key names an experiment config key (flat, like FlowerTune's)
APP_KEYS = frozenset({K.RUN_EXPERIMENT, K.RUN_OVERRIDES, K.RUN_OUT_DIR, K.RUN_ROUND_TIMEOUT, K.RUN_DISCOVERY_TIMEOUT,
                      K.RUN_INJECT_FAULT, K.RUN_OUT_PATH, K.RUN_NODE_STATE_DIR})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def flat_overrides(rc: Mapping[str, Any]) -> list[str]:
    """Experiment settings given as flat run-config keys (``model.name``, ``train.lr``,
    ``setting.num-clients``; ``-`` or ``_``) → ``--set`` overrides, in key order. A value ``""``
    leaves the experiment file's value (the pyproject defaults are ``""``). Keys are checked when
    the config loads: an unknown one is one ConfigError naming it and the nearest valid key."""
    out = []
    for key in sorted(k for k in rc if k not in APP_KEYS):
        value = rc[key]
        if value == "":
            continue
        out.append(f"{key.replace('-', '_')}={_toml_value(value)}")
    return out


def resolve_path(path: str) -> Path:
    """An existing file: ``path`` itself, else relative to the working directory, else to a
    ``sys.path`` entry (Flower puts the installed app's directory there)."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + [Path(e) / p for e in sys.path if e]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"Experiment config `{path}` not found (looked in the working directory and the app).",
                      f'pass an absolute path: --run-config "{K.RUN_EXPERIMENT}=\'/path/to/exp.toml\'".')


@dataclass(frozen=True)
class AppSettings:
    """The app's run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides).

    The experiment config is: the ``experiment`` file, then the flat experiment keys
    (:func:`flat_overrides`), then the ``overrides`` string (``"a.b=1; c.d=x"``), later ones winning.
    """

    experiment: str = DEFAULT_EXPERIMENT
    overrides: tuple[str, ...] = ()
    out_dir: str = DEFAULT_OUT_DIR
    round_timeout: float = DEFAULT_ROUND_TIMEOUT
    discovery_timeout: float = DEFAULT_DISCOVERY_TIMEOUT
    faults: dict[tuple[int, int], str] = field(default_factory=dict)
    out_path: str = ""
    node_state_dir: str = ""

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> AppSettings:
        return cls(
            experiment=str(rc.get(K.RUN_EXPERIMENT, DEFAULT_EXPERIMENT)),
            overrides=(*flat_overrides(rc), *parse_overrides(str(rc.get(K.RUN_OVERRIDES, "")))),
            out_dir=str(rc.get(K.RUN_OUT_DIR, DEFAULT_OUT_DIR)),
            round_timeout=float(rc.get(K.RUN_ROUND_TIMEOUT, DEFAULT_ROUND_TIMEOUT)),
            discovery_timeout=float(rc.get(K.RUN_DISCOVERY_TIMEOUT, DEFAULT_DISCOVERY_TIMEOUT)),
            faults=parse_faults(str(rc.get(K.RUN_INJECT_FAULT, ""))),
            out_path=str(rc.get(K.RUN_OUT_PATH, "")),
            node_state_dir=str(rc.get(K.RUN_NODE_STATE_DIR, "")),
        )

    def output_dir(self, run_id: int) -> Path:
        """Where the ServerApp writes: ``out-path`` when set, else ``<out-dir>/<run-id>/``."""
        if self.out_path:
            return Path(self.out_path).expanduser().resolve()
        return Path(self.out_dir).expanduser().resolve() / str(run_id)

    def experiment_config(self, data_dir: str = "") -> ExperimentConfig:
        """The resolved experiment config; ``data_dir`` (node-local) overrides ``data.data_dir``."""
        overrides = list(self.overrides)
        if data_dir:
            overrides.append(f'data.data_dir="{data_dir}"')
        return load_config(resolve_path(self.experiment), overrides)


@dataclass(frozen=True)
class NodeIdentity:
    """Which clients a SuperNode serves, from its ``--node-config``."""

    partition_id: int
    num_partitions: int
    data_dir: str = ""
    state_dir: str = ""
    allowed_roots: tuple[str, ...] = ()

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> NodeIdentity:
        if K.NODE_PARTITION_ID not in nc or K.NODE_NUM_PARTITIONS not in nc:
            raise ConfigError(
                f"SuperNode has no `{K.NODE_PARTITION_ID}` / `{K.NODE_NUM_PARTITIONS}` in its node config.",
                'start it with --node-config "partition-id=0 num-partitions=2".',
            )
        roots = tuple(r.strip() for r in str(nc.get(K.NODE_ALLOWED_ROOTS, "")).split(";") if r.strip())
        ident = cls(int(nc[K.NODE_PARTITION_ID]), int(nc[K.NODE_NUM_PARTITIONS]), str(nc.get(K.NODE_DATA_DIR, "")),
                    str(nc.get(K.NODE_STATE_DIR, "")), roots)
        if not 0 <= ident.partition_id < ident.num_partitions:
            raise ConfigError(f"partition-id={ident.partition_id} is outside 0..num-partitions-1.",
                              f"use 0 … {ident.num_partitions - 1}.")
        return ident

    def check_paths(self, settings: AppSettings, cfg: ExperimentConfig | None = None) -> None:
        """Refuse server-sent paths outside this node's ``allowed-roots`` (no-op when unset).

        Checked: the experiment file when given as an absolute path or with ``..`` (a plain
        relative name resolves inside the installed app), ``data.data_dir`` unless the node pins
        ``data-dir``, ``node-state-dir`` unless it pins ``state-dir``, and ``model.name`` /
        ``data.hub_*`` when they name existing or absolute local paths. Without ``cfg``: the
        experiment file only (checked before it is read).
        """
        if not self.allowed_roots:
            return
        roots = [Path(r).expanduser().resolve() for r in self.allowed_roots]
        exp = Path(settings.experiment).expanduser()
        named: list[tuple[str, str]] = []
        if exp.is_absolute() or ".." in exp.parts:
            named.append((K.RUN_EXPERIMENT, settings.experiment))
        if not self.state_dir and settings.node_state_dir:
            named.append((K.RUN_NODE_STATE_DIR, settings.node_state_dir))
        if cfg is not None:
            if not self.data_dir and cfg.data.source == "local":
                named.append(("data.data_dir", cfg.data.data_dir))
            for key, value in (("model.name", cfg.model.name), ("data.hub_tc", cfg.data.hub_tc),
                               ("data.hub_rc", cfg.data.hub_rc), ("data.hub_ts", cfg.data.hub_ts)):
                if value.startswith(("/", ".", "~")) or Path(value).expanduser().exists():
                    named.append((key, value))
        for key, value in named:
            path = Path(value).expanduser().resolve()
            if not any(path == r or r in path.parents for r in roots):
                raise ConfigError(f"The run config sets `{key}` = {value} — outside this node's allowed roots "
                                  f"({'; '.join(map(str, roots))}); the node refuses the run.",
                                  f"point `{key}` inside the allowed roots, or pin it in the node's --node-config "
                                  f"({K.NODE_DATA_DIR}, {K.NODE_STATE_DIR}) or widen {K.NODE_ALLOWED_ROOTS}.")

    def serves(self, client_id: int) -> bool:
        return partition_of(client_id, self.num_partitions) == self.partition_id

    def run_state_dir(self, settings: AppSettings, run_id: int) -> Path:
        """This node's state directory for run ``run_id``: ``<state-dir>/run-<run id>/``, with
        ``state-dir`` from the node config, else the run config's ``node-state-dir``, else
        ``<temp dir>/fedmoe-node-state``. Per run, so a new run never picks up an old run's
        client state; the same run id after a node restart finds it again."""
        root = self.state_dir or settings.node_state_dir or str(Path(tempfile.gettempdir()) / "fedmoe-node-state")
        return Path(root).expanduser().resolve() / f"run-{run_id}"


def partition_of(client_id: int, num_partitions: int) -> int:
    """The partition (SuperNode) that serves client ``client_id``."""
    return client_id % num_partitions


def identity_content(ident: NodeIdentity) -> RecordDict:
    """A node's answer to the server's identity query."""
    return RecordDict({K.REC_CONFIG: ConfigRecord({K.CFG_PARTITION_ID: ident.partition_id,
                                                   K.CFG_NUM_PARTITIONS: ident.num_partitions})})


def parse_identity(content: RecordDict) -> tuple[int, int]:
    """``(partition_id, num_partitions)`` from :func:`identity_content`."""
    cfg = content[K.REC_CONFIG]
    return int(cfg[K.CFG_PARTITION_ID]), int(cfg[K.CFG_NUM_PARTITIONS])
