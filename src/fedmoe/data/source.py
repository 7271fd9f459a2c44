"""Where a task's examples come from: local official files or the hub (``data.source``).

Loaded example lists are cached in-process (keyed by the files' names, sizes and mtimes, or by
the hub name and split), so building several federations in one process reads each file once.
``data.max_examples_per_task`` keeps a seeded random subset, in file order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from fedmoe.config import DataConfig
from fedmoe.data.examples import Example
from fedmoe.data.hub import hub_split_for, load_hub
from fedmoe.data.loaders import load_local, screen, task_dir
from fedmoe.data.partition import rng_for
from fedmoe.errors import ConfigError, DataError, DataNotice

_CACHE: dict[tuple[object, ...], tuple[Example, ...]] = {}
#: task → (rows dropped by :func:`~fedmoe.data.loaders.screen`, why) of the latest load
DROPPED: dict[str, tuple[int, str]] = {}
_DROPPED_BY_KEY: dict[tuple[object, ...], tuple[int, str]] = {}


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )


def load_examples(data: DataConfig, task: str) -> list[Example]:
    """All examples of ``task`` (``tc``/``rc``/``ts``) from the configured source."""
    if data.source == "local":
        folder = task_dir(data.data_dir, task)
        key: tuple[object, ...] = ("local", task, str(folder), _signature(folder))
    elif data.source == "hub":
        name = {"tc": data.hub_tc, "rc": data.hub_rc, "ts": data.hub_ts}[task]
        split = hub_split_for(data.hub_split, task)
        p = Path(name).expanduser()
        stamp = _signature(p) if p.is_dir() else ()
        key = ("hub", task, name, split, stamp)
    else:
        raise ConfigError(f"data.source={data.source!r} is not a data source.", 'use "local" or "hub".')
    if key not in _CACHE:
        loaded = (
            load_local(data.data_dir, task) if key[0] == "local" else load_hub(task, str(key[2]), str(key[3]))
        )
        kept, dropped, why = screen(list(loaded), task, str(key[2]))
        if dropped:
            warnings.warn(f"{task}: dropped {dropped} of {len(kept) + dropped} records ({why}).", DataNotice, stacklevel=2)
        _DROPPED_BY_KEY[key] = (dropped, why)
        _CACHE[key] = tuple(kept)
    DROPPED[task] = _DROPPED_BY_KEY.get(key, (0, ""))
    return list(_CACHE[key])


def cap_examples(examples: Sequence[Example], max_examples: int, seed: int, task: str) -> list[Example]:
    """A seeded subset of at most ``max_examples`` (0 = all), kept in the original order."""
    if max_examples < 0:
        raise ConfigError(
            f"data.max_examples_per_task={max_examples} must be >= 0.", "use 0 for all examples."
        )
    if max_examples == 0 or len(examples) <= max_examples:
        return list(examples)
    keep = sorted(rng_for(seed, "cap", task).choice(len(examples), size=max_examples, replace=False).tolist())
    return [examples[i] for i in keep]


def read_excluded_ids(path: str) -> frozenset[str]:
    """The ids listed in ``data.exclude_ids`` (plain text, one id per line; blank lines and lines
    starting with ``#`` are skipped). Read as text only, never executed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.exclude_ids file {path!r} does not exist.",
                        "give a text file of example ids, one per line, or remove data.exclude_ids.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.exclude_ids file {path!r} cannot be read as UTF-8 text ({exc}).",
                        "give a text file of example ids, one per line.") from None
    return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def exclude_examples(examples: Sequence[Example], excluded: frozenset[str]) -> list[Example]:
    """``examples`` without those whose id is in ``excluded`` (order kept)."""
    return [ex for ex in examples if ex.id not in excluded] if excluded else list(examples)
