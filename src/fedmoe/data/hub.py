"""Hub path: the same three tasks read with ``datasets`` (docs/algorithms.md §5).

``data.source = "hub"`` reads ``data.hub_tc`` / ``hub_rc`` / ``hub_ts`` (default ``ag_news``,
``squad``, ``EdinburghNLP/xsum``) with :func:`datasets.load_dataset`. A name may also be a
local folder: one written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is
opened with :func:`datasets.load_from_disk`, any other folder (CSV/JSON/Parquet files named
by split) with ``load_dataset``. Records are converted to the same frozen examples as the
local loaders, so everything downstream is identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmoe.data.examples import AG_NEWS_CLASSES, Example, RCExample, TCExample, TSExample
from fedmoe.errors import DataError

#: default hub split per task: the splits the shared folder holds (AG News test, SQuAD dev, XSum test)
DEFAULT_SPLITS: dict[str, str] = {"tc": "test", "rc": "validation", "ts": "test"}


def hub_split_for(hub_split: str | Mapping[str, str], task: str) -> str:
    """The split ``data.hub_split`` gives ``task``: one name for all tasks, or a per-task table
    (a task not in the table, or "", takes :data:`DEFAULT_SPLITS`)."""
    split = hub_split.get(task, "") if isinstance(hub_split, Mapping) else hub_split
    return split or DEFAULT_SPLITS[task]


def open_hub_dataset(name: str, split: str) -> Any:
    """Open one split of a hub data set or local dataset folder (no network needed for folders)."""
    import datasets

    p = Path(name).expanduser()
    try:
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"Dataset folder {p} has no split `{split}` (has {sorted(ds)}).",
                        "set data.hub_split to one of those.",
                    )
                ds = ds[split]
            return ds
        return datasets.load_dataset(str(p) if p.is_dir() else name, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (network, missing split, format)
        raise DataError(
            f"Could not load hub data set `{name}` split `{split}`: {type(exc).__name__}: {exc}",
            "check the name and split, that the hub is reachable (or the folder exists), or use "
            "data.source=local with data.data_dir pointing at the official files.",
        ) from None


def _need(rec: Mapping[str, Any], key: str, name: str, i: int) -> Any:
    if key not in rec or rec[key] is None:
        raise DataError(
            f"Hub data set `{name}` record {i}: missing field `{key}`.",
            f"the data set must have the columns of the official `{name}` data set.",
        )
    return rec[key]


def _label_names(ds: Any) -> tuple[str, ...]:
    feature = getattr(ds, "features", {}).get("label") if hasattr(ds, "features") else None
    names = getattr(feature, "names", None)
    return tuple(names) if names else AG_NEWS_CLASSES


def ag_news_from_records(
    records: Iterable[Mapping[str, Any]], name: str, split: str, classes: tuple[str, ...] = AG_NEWS_CLASSES
) -> list[TCExample]:
    """Hub ``ag_news`` rows (``text``, 0-based ``label``) to examples ``agnews-<split>-<row>``."""
    out = []
    for i, rec in enumerate(records):
        label = _need(rec, "label", name, i)
        if not isinstance(label, int) or not 0 <= label < len(classes):
            raise DataError(
                f"Hub data set `{name}` record {i}: label {label!r} not in 0..{len(classes) - 1}."
            )
        ex_id = str(rec["id"]) if rec.get("id") is not None else f"agnews-{split}-{i}"
        title = str(rec.get("title") or "")
        body = (
            str(rec["description"])
            if rec.get("description") is not None
            else str(_need(rec, "text", name, i))
        )
        out.append(TCExample(ex_id, title, body, label, classes[label]))
    return out


def squad_from_records(records: Iterable[Mapping[str, Any]], name: str) -> list[RCExample]:
    """Hub ``squad`` rows (``answers = {text: [...], answer_start: [...]}``) to examples."""
    out = []
    for i, rec in enumerate(records):
        answers = _need(rec, "answers", name, i)
        texts = tuple(str(t) for t in _need(answers, "text", name, i))
        starts = tuple(int(s) for s in _need(answers, "answer_start", name, i))
        if not texts or len(texts) != len(starts):
            raise DataError(f"Hub data set `{name}` record {i}: expected >= 1 answer with one start each.")
        out.append(
            RCExample(
                str(_need(rec, "id", name, i)),
                str(rec.get("title") or ""),
                str(_need(rec, "context", name, i)),
                str(_need(rec, "question", name, i)),
                texts,
                starts,
            )
        )
    return out


def xsum_from_records(records: Iterable[Mapping[str, Any]], name: str) -> list[TSExample]:
    """Hub ``EdinburghNLP/xsum`` rows (``id``, ``document``, ``summary``) to examples."""
    return [
        TSExample(
            str(_need(r, "id", name, i)),
            str(_need(r, "document", name, i)),
            str(_need(r, "summary", name, i)),
        )
        for i, r in enumerate(records)
    ]


def load_hub(task: str, name: str, split: str = "") -> list[Example]:
    """Read task ``tc``/``rc``/``ts`` from hub data set (or dataset folder) ``name``."""
    split = split or DEFAULT_SPLITS[task]
    ds = open_hub_dataset(name, split)
    if task == "tc":
        return list(ag_news_from_records(ds, name, split, _label_names(ds)))
    if task == "rc":
        return list(squad_from_records(ds, name))
    return list(xsum_from_records(ds, name))
