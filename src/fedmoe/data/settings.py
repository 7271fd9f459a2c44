"""The paper's four FL settings and the federation they build (docs/algorithms.md §5).

=====================  ==========  ===========
preset                 sampler     partition
=====================  ==========  ===========
standard-hetero-t      uniform     iid
standard-hetero-td     uniform     dirichlet
enforced-hetero-t      enforced    iid
enforced-hetero-td     enforced    dirichlet
=====================  ==========  ===========

T = heterogeneous tasks (one task type per client, IID within a task); TD = tasks plus
Dirichlet skew within a task (labels for TC, k-means clusters for RC/TS). ``setting.sampler``
and ``setting.partition`` override the preset when non-empty. Memory budgets depend on the
model and are filled in by the engine (see :func:`fedmoe.data.partition.draw_budgets`).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmoe.config import ExperimentConfig, SettingConfig
from fedmoe.data.examples import Example, RCExample, TCExample, TSExample
from fedmoe.data.partition import (
    assign_tasks,
    cluster_texts,
    dirichlet_partition,
    draw_budgets,
    iid_partition,
    min_share,
    rng_for,
    split_share,
)
from fedmoe.data.samplers import Sampler, make_sampler
from fedmoe.data.source import cap_examples, exclude_examples, load_examples, read_excluded_ids
from fedmoe.data.tasks import TASK_TYPES, Task, get_task, label_names_of
from fedmoe.errors import ConfigError, DataError

#: preset name -> (sampler, partition)
PRESETS: dict[str, tuple[str, str]] = {
    "standard-hetero-t": ("uniform", "iid"),
    "standard-hetero-td": ("uniform", "dirichlet"),
    "enforced-hetero-t": ("enforced", "iid"),
    "enforced-hetero-td": ("enforced", "dirichlet"),
}
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")


@dataclass
class ClientData:
    """One client's task and its train/val/test examples.

    ``histogram`` counts the client's whole share per group (``histogram_kind``: ``label`` for
    TC, ``cluster`` for RC/TS under a Dirichlet partition, ``""`` when not computed).
    """

    client_id: int
    task: str
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    budget_bytes: int | None = None
    histogram: tuple[int, ...] = ()
    histogram_kind: str = ""

    @property
    def num_examples(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)

    def fingerprint(self) -> str:
        """SHA-256 over the example ids of the three splits (stable across builds)."""
        text = "|".join(",".join(ex.id for ex in split) for split in (self.train, self.val, self.test))
        return hashlib.sha256(f"{self.task}:{text}".encode()).hexdigest()


@dataclass
class Federation:
    """Clients, task objects and the round sampler of one setting."""

    preset: str
    sampler_kind: str
    partition_kind: str
    seed: int
    clients: list[ClientData]
    tasks: dict[str, Task]
    sampler: Sampler
    group_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def clients_of(self, task: str) -> list[ClientData]:
        return [c for c in self.clients if c.task == task]

    def sample_clients(self, round_idx: int, rng: np.random.Generator | None = None) -> list[int]:
        """Client ids taking part in round ``round_idx`` (delegates to :attr:`sampler`)."""
        return self.sampler.sample_clients(round_idx, rng)

    def fingerprints(self) -> dict[int, str]:
        return {c.client_id: c.fingerprint() for c in self.clients}

    def assign_budgets(self, full_bytes: int, low_fraction: float, high_fraction: float) -> list[int]:
        """Fill ``budget_bytes`` uniformly from ``[low, high] x full_bytes`` (seeded; docs/algorithms.md §5.3).

        ``full_bytes`` is the training footprint of the whole MoE, known only once the model
        is built; ``setting.budget_low`` / ``budget_high`` are the usual fractions.
        """
        budgets = draw_budgets(
            len(self.clients), low_fraction * full_bytes, high_fraction * full_bytes, self.seed
        )
        for client, budget in zip(self.clients, budgets, strict=True):
            client.budget_bytes = budget
        return budgets


def resolve_setting(setting: SettingConfig) -> tuple[str, str]:
    """``(sampler, partition)`` of the preset, with non-empty config fields overriding it."""
    if setting.preset not in PRESETS:
        close = difflib.get_close_matches(setting.preset, list(PRESETS), n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"use one of {', '.join(PRESETS)}."
        raise ConfigError(f"Unknown setting.preset `{setting.preset}`.", hint)
    sampler, partition = PRESETS[setting.preset]
    sampler = setting.sampler or sampler
    partition = setting.partition or partition
    if partition not in PARTITIONS:
        raise ConfigError(
            f"setting.partition={partition!r} is not a partition.", 'use "iid", "dirichlet" or "".'
        )
    return sampler, partition


def _embedding_text(ex: Example) -> str:
    if isinstance(ex, RCExample):
        return f"{ex.title} {ex.context}"
    if isinstance(ex, TSExample):
        return ex.document
    return ex.text


def _groups(
    task: str, examples: Sequence[Example], partition: str, num_clusters: int
) -> tuple[np.ndarray | None, str]:
    if task == "tc":
        return np.array([ex.label for ex in examples if isinstance(ex, TCExample)], dtype=np.int64), "label"
    if partition == "dirichlet":
        return cluster_texts([_embedding_text(ex) for ex in examples], num_clusters), "cluster"
    return None, ""


def _check_tasks(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if t not in TASK_TYPES]
    if bad or len(set(tasks)) != len(tasks):
        raise ConfigError(
            f"data.tasks={list(tasks)} must be distinct task types.", f"use a subset of {list(TASK_TYPES)}."
        )


def build_federation(cfg: ExperimentConfig) -> Federation:
    """Load the data, partition it over ``setting.num_clients`` clients and make the sampler.

    Deterministic in ``cfg.seed``: the same config gives the same clients, splits and rounds.
    """
    sampler_kind, partition = resolve_setting(cfg.setting)
    data, st = cfg.data, cfg.setting
    _check_tasks(data.tasks)
    client_tasks = assign_tasks(st.num_clients, data.tasks)
    need = min_share(data.val_fraction, data.test_fraction)
    clients: dict[int, ClientData] = {}
    tasks: dict[str, Task] = {}
    group_names: dict[str, tuple[str, ...]] = {}
    excluded = read_excluded_ids(data.exclude_ids) if data.exclude_ids else frozenset()
    for task in data.tasks:
        pool = exclude_examples(load_examples(data, task), excluded)
        examples = cap_examples(pool, data.max_examples_per_task, cfg.seed, task)
        ids = [c for c, t in enumerate(client_tasks) if t == task]
        if len(examples) < need * len(ids):
            raise DataError(
                f"Task `{task}` has {len(examples)} examples, fewer than {need} for each of its {len(ids)} clients.",
                "raise data.max_examples_per_task (0 = all) or lower setting.num_clients.",
            )
        tasks[task] = get_task(task, label_names_of(examples) if task == "tc" else None)
        groups, kind = _groups(task, examples, partition, st.num_clusters)
        if groups is not None:
            n_groups = int(groups.max()) + 1
            group_names[task] = (
                tasks[task].label_names if task == "tc" else tuple(f"c{i}" for i in range(n_groups))
            )
        if partition == "dirichlet":
            assert groups is not None
            parts = dirichlet_partition(
                groups, len(ids), st.dirichlet_alpha, rng_for(cfg.seed, "dirichlet", task), need
            )
        else:
            parts = iid_partition(len(examples), len(ids), rng_for(cfg.seed, "iid", task))
        for cid, part in zip(ids, parts, strict=True):
            train, val, test = split_share(
                part, data.val_fraction, data.test_fraction, rng_for(cfg.seed, "split", cid)
            )
            hist = (
                ()
                if groups is None
                else tuple(np.bincount(groups[part], minlength=len(group_names[task])).tolist())
            )
            clients[cid] = ClientData(
                cid,
                task,
                tuple(examples[i] for i in train),
                tuple(examples[i] for i in val),
                tuple(examples[i] for i in test),
                histogram=hist,
                histogram_kind=kind,
            )
    ordered = [clients[c] for c in range(st.num_clients)]
    sampler = make_sampler(
        sampler_kind, [(c.client_id, c.task) for c in ordered], cfg.federation.clients_per_round, cfg.seed
    )
    return Federation(st.preset, sampler_kind, partition, cfg.seed, ordered, tasks, sampler, group_names)
