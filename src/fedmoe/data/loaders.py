"""Readers for the three data sets in their official on-disk formats (docs/algorithms.md §5.1).

* AG News (TC): every ``*.csv`` in the folder (``"label(1-4)","title","description"``, no
  header) plus ``classes.txt``; ids are ``agnews-<file stem>-<0-based row>``.
* SQuAD v1.1 (RC): the official JSON (``data[].paragraphs[].qas[].answers[]``); the first
  ``*.json`` in sorted order is read (``dev-v1.1.json`` in the shared folder).
* XSum (TS): JSON lines with ``id``, ``document``, ``summary``.

A malformed file raises one :class:`~fedmoe.errors.DataError` naming the file, the line
(or the JSON record path) and what was expected. Hub data sets live in :mod:`.hub`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmoe.data.examples import AG_NEWS_CLASSES, Example, RCExample, TCExample, TSExample
from fedmoe.errors import DataError

#: sub-folder of ``data.data_dir`` holding each task's files
TASK_FOLDERS: dict[str, str] = {"tc": "ag_news", "rc": "squad", "ts": "xsum"}

_REPO_ROOT = Path(__file__).resolve().parents[3]
_HOW_TO_GET = (
    "point `--set data.data_dir=...` at a folder holding ag_news/, squad/ and xsum/ in their official "
    "formats (AG News CSV, SQuAD v1.1 JSON, XSum JSON lines; see ../shared/data/README.md), "
    "or use `--set data.source=hub` to read them with `datasets.load_dataset`."
)


def resolve_data_dir(data_dir: str | Path) -> Path:
    """Absolute data folder: as given, else relative to the working directory, else to the repo root."""
    p = Path(data_dir).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, _REPO_ROOT / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    looked = " or ".join(str(c) for c in candidates)
    raise DataError(f"Data folder `{data_dir}` not found (looked in {looked}).", _HOW_TO_GET)


def task_dir(data_dir: str | Path, task: str) -> Path:
    """The folder of one task (``ag_news``/``squad``/``xsum``) inside ``data_dir``."""
    if task not in TASK_FOLDERS:
        raise DataError(f"Unknown task `{task}`.", f"use one of {sorted(TASK_FOLDERS)} in data.tasks.")
    d = resolve_data_dir(data_dir) / TASK_FOLDERS[task]
    if not d.is_dir():
        raise DataError(f"Task folder {d} for task `{task}` does not exist.", _HOW_TO_GET)
    return d


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: byte {exc.start} is not UTF-8.", "re-save the file as UTF-8.") from None


def _check_unique(examples: Iterable[Example], where: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{where}: duplicate example id `{ex.id}`.", "remove the duplicate record.")
        seen.add(ex.id)


def read_ag_news_classes(directory: str | Path) -> tuple[str, ...]:
    """Label names from ``classes.txt`` (one a line); the official four when the file is absent."""
    path = Path(directory) / "classes.txt"
    if not path.is_file():
        return AG_NEWS_CLASSES
    names = tuple(line.strip() for line in _read_text(path).splitlines() if line.strip())
    if not names:
        raise DataError(f"{path}: no class names.", "write one label name a line (World, Sports, ...).")
    return names


def _read_ag_news_csv(path: Path, classes: tuple[str, ...]) -> list[TCExample]:
    out: list[TCExample] = []
    expected = f'"label(1-{len(classes)})","title","description"'
    text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(
                f"{path}:{start}: malformed CSV ({exc}); expected {expected}.", "fix the quoting."
            ) from None
        line, start = start, reader.line_num + 1
        if not row:
            continue
        if len(row) != 3:
            raise DataError(
                f"{path}:{line}: expected 3 fields {expected}, got {len(row)}.",
                "quote fields that contain commas; AG News rows have exactly label, title, description.",
            )
        try:
            label = int(row[0].strip())
        except ValueError:
            label = -1
        if not 1 <= label <= len(classes):
            raise DataError(
                f"{path}:{line}: label {row[0]!r} is not an integer in 1..{len(classes)} (expected {expected}).",
                f"labels are 1-based indices into classes.txt ({', '.join(classes)}).",
            )
        out.append(TCExample(f"agnews-{path.stem}-{len(out)}", row[1], row[2], label - 1, classes[label - 1]))
    return out


def load_ag_news(directory: str | Path) -> list[TCExample]:
    """All ``*.csv`` files of an AG News folder, in sorted file-name order (docs/algorithms.md §5.1, TC)."""
    d = Path(directory)
    files = sorted(d.glob("*.csv"))
    if not files:
        raise DataError(f"No AG News *.csv file in {d}.", _HOW_TO_GET)
    classes = read_ag_news_classes(d)
    examples = [ex for f in files for ex in _read_ag_news_csv(f, classes)]
    if not examples:
        raise DataError(f"The AG News files in {d} hold no rows.", _HOW_TO_GET)
    _check_unique(examples, str(d))
    return examples


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}).", "fix the syntax at that line."
        ) from None


def _field(obj: Any, key: str, typ: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        got = "no such key" if not isinstance(obj, dict) or key not in obj else type(obj[key]).__name__
        raise DataError(
            f"{path}: record {where}: expected key `{key}` of type {names} ({got}).",
            "the file must follow the official SQuAD v1.1 layout data[].paragraphs[].qas[].answers[].",
        )
    return obj[key]


def load_squad(directory: str | Path) -> list[RCExample]:
    """Questions of an official SQuAD v1.1 JSON file (docs/algorithms.md §5.1, RC), in file order."""
    d = Path(directory)
    files = sorted(d.glob("*.json")) if d.is_dir() else [d]
    if not files or not files[0].is_file():
        raise DataError(f"No SQuAD *.json file in {d}.", _HOW_TO_GET)
    path = files[0]
    root = _load_json(path)
    out: list[RCExample] = []
    for i, article in enumerate(_field(root, "data", list, "<root>", path)):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, para in enumerate(_field(article, "paragraphs", list, f"data[{i}]", path)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(para, "context", str, where, path)
            for k, qa in enumerate(_field(para, "qas", list, where, path)):
                w = f"{where}.qas[{k}]"
                qid = _field(qa, "id", (str, int), w, path)
                question = _field(qa, "question", str, w, path)
                answers = _field(qa, "answers", list, w, path)
                if not answers:
                    raise DataError(f"{path}: record {w}: expected at least one answer (SQuAD v1.1).")
                texts = tuple(
                    _field(a, "text", str, f"{w}.answers[{n}]", path) for n, a in enumerate(answers)
                )
                starts = tuple(
                    _field(a, "answer_start", int, f"{w}.answers[{n}]", path) for n, a in enumerate(answers)
                )
                out.append(RCExample(str(qid), str(title), context, question, texts, starts))
    if not out:
        raise DataError(f"{path}: no questions found.", _HOW_TO_GET)
    _check_unique(out, str(path))
    return out


def load_xsum(directory: str | Path) -> list[TSExample]:
    """XSum pairs from every ``*.jsonl`` file of the folder (docs/algorithms.md §5.1, TS), in file order."""
    d = Path(directory)
    files = sorted(d.glob("*.jsonl")) if d.is_dir() else [d]
    if not files or not files[0].is_file():
        raise DataError(f"No XSum *.jsonl file in {d}.", _HOW_TO_GET)
    out: list[TSExample] = []
    for path in files:
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno}); expected one object a line "
                    'with "id", "document", "summary".',
                    "fix or remove that line.",
                ) from None
            ok = isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("document", "summary"))
            if not ok or not isinstance(rec.get("id"), str | int):
                raise DataError(
                    f'{path}:{n}: expected an object with string "id", "document" and "summary".',
                    "fix or remove that line.",
                )
            out.append(TSExample(str(rec["id"]), rec["document"], rec["summary"]))
    if not out:
        raise DataError(f"The XSum files in {d} hold no records.", _HOW_TO_GET)
    _check_unique(out, str(d))
    return out


_LOCAL = {"tc": load_ag_news, "rc": load_squad, "ts": load_xsum}


def load_local(data_dir: str | Path, task: str) -> list[Example]:
    """Read one task's examples from ``<data_dir>/<ag_news|squad|xsum>``."""
    return list(_LOCAL[task](task_dir(data_dir, task)))


def screen(examples: list[Example], task: str, where: str) -> tuple[list[Example], int, str]:
    """Drop rows that would silently train on garbage; returns (kept, dropped, why).

    RC: a question whose first answer (the training target) is not the context's text at its
    ``answer_start``, or with an empty context/question, goes; TS: empty documents or summaries go. No row left is a :class:`DataError`.
    """
    kept: list[Example] = []
    why = {"rc": "first answer not at its answer_start in the context, or empty context/question",
           "ts": "empty document or summary"}.get(task, "")
    for ex in examples:
        if isinstance(ex, RCExample):
            t, st = ex.answers[0], ex.answer_starts[0]  # the training target (all answers are scored)
            if not (t.strip() and ex.context.strip() and ex.question.strip() and 0 <= st
                    and ex.context[st:st + len(t)] == t):
                continue
        elif isinstance(ex, TSExample) and not (ex.document.strip() and ex.summary.strip()):
            continue
        kept.append(ex)
    if examples and not kept:
        raise DataError(f"{where}: all {len(examples)} {task.upper()} records are unusable ({why}).",
                        "check that the files follow the official format (SQuAD answer_start is a character "
                        "offset into the context).")
    return kept, len(examples) - len(kept), why
