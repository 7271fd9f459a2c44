"""Per-round client samplers of the paper's settings (docs/algorithms.md §5.2).

* ``uniform`` (Standard-Hetero-*): ``clients_per_round`` distinct clients, uniformly at random.
* ``enforced`` (Enforced-Hetero-*): 3 clients of 3 different task types; when more than three
  task types exist, the three types are drawn uniformly first **(choice)**, then one client
  uniformly within each.

Both are deterministic: ``sample_clients(round_idx)`` draws from a Generator seeded by
``(seed, round_idx)``; pass ``rng`` to draw from your own Generator instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmoe.data.partition import rng_for
from fedmoe.errors import ConfigError

ENFORCED_PER_ROUND = 3


@dataclass(frozen=True)
class UniformSampler:
    """``per_round`` distinct clients out of ``client_ids``, uniformly; returned sorted."""

    client_ids: tuple[int, ...]
    per_round: int
    seed: int = 0
    kind: str = "uniform"

    def __post_init__(self) -> None:
        if not 1 <= self.per_round <= len(self.client_ids):
            raise ConfigError(
                f"federation.clients_per_round={self.per_round} must be in 1..{len(self.client_ids)} (num_clients).",
                "lower clients_per_round or raise setting.num_clients.",
            )

    def sample_clients(self, round_idx: int, rng: np.random.Generator | None = None) -> list[int]:
        rng = rng if rng is not None else rng_for(self.seed, "sampler", round_idx)
        picks = rng.choice(len(self.client_ids), size=self.per_round, replace=False)
        return sorted(self.client_ids[i] for i in picks)


@dataclass(frozen=True)
class EnforcedSampler:
    """3 clients of 3 different task types per round (one client per drawn type), in task order."""

    client_tasks: tuple[tuple[int, str], ...]
    seed: int = 0
    kind: str = "enforced"

    def __post_init__(self) -> None:
        if len(self.task_types) < ENFORCED_PER_ROUND:
            raise ConfigError(
                f"The enforced sampler needs clients of {ENFORCED_PER_ROUND} different task types; "
                f"the federation has {len(self.task_types)} ({', '.join(self.task_types) or 'none'}).",
                'use data.tasks=["tc", "rc", "ts"] or setting.sampler="uniform" (a standard-hetero preset).',
            )

    @property
    def task_types(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for _, task in self.client_tasks:
            seen.setdefault(task)
        return tuple(seen)

    @property
    def per_round(self) -> int:
        return ENFORCED_PER_ROUND

    def sample_clients(self, round_idx: int, rng: np.random.Generator | None = None) -> list[int]:
        rng = rng if rng is not None else rng_for(self.seed, "sampler", round_idx)
        types = self.task_types
        chosen = sorted(rng.choice(len(types), size=ENFORCED_PER_ROUND, replace=False).tolist())
        out = []
        for t in chosen:
            members = [c for c, task in self.client_tasks if task == types[t]]
            out.append(members[int(rng.integers(len(members)))])
        return out


Sampler = UniformSampler | EnforcedSampler


def make_sampler(
    kind: str, client_tasks: Sequence[tuple[int, str]], clients_per_round: int, seed: int
) -> Sampler:
    """The sampler named ``kind`` (``uniform`` / ``enforced``) over ``(client_id, task)`` pairs."""
    if kind == "uniform":
        return UniformSampler(tuple(c for c, _ in client_tasks), clients_per_round, seed)
    if kind == "enforced":
        return EnforcedSampler(tuple(client_tasks), seed)
    raise ConfigError(
        f"setting.sampler={kind!r} is not a sampler.", 'use "uniform", "enforced" or "" (preset).'
    )
