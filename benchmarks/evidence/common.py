"""Shared pieces of the evidence scripts: the held-out stand-in corpus, the client pool, paths.

The stand-in MoE (``build_standin.py``) is trained on text that no client of the evidence
scripts ever sees. The split is fixed and stated here once:

* **AG News** (source ``news``): every row of ``train_head581.csv`` and the rows of
  ``test.csv`` whose 0-based row index is divisible by 10 (600 rows). Client pool: the
  other 5,400 ``test.csv`` rows.
* **SQuAD** (source ``wiki``, split *by article*): the articles whose 0-based index in
  ``dev-v1.1.json`` is divisible by 4 (10 of 40 articles; their paragraph contexts).
  Client pool: the questions of the other 30 articles.
* **XSum** (source ``bbc``): the records whose 0-based line index is divisible by 5
  (482 documents and summaries). Client pool: the other records.

``client_pool(data_dir, task)`` returns the pool (file order); ``standin_texts`` the corpus.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from fedmoe.data.examples import RCExample, TCExample, TSExample  # noqa: E402
from fedmoe.data.loaders import load_local  # noqa: E402

SOURCES = ("news", "wiki", "bbc")  #: stand-in corpus sources, in expert-assignment order
TASK_SOURCE = {"tc": "news", "rc": "wiki", "ts": "bbc"}
DEFAULT_DATA = str(ROOT.parent / "shared" / "data")
RESULTS = ROOT / "benchmarks" / "evidence" / "results"


def _held_tc(ex: TCExample) -> bool:
    stem, row = ex.id.rsplit("-", 1)
    return stem.endswith("train_head581") or int(row) % 10 == 0


def _squad_article_index(data_dir: str) -> dict[str, int]:
    path = sorted((Path(data_dir) / "squad").glob("*.json"))[0]
    root = json.loads(path.read_text(encoding="utf-8"))
    return {str(qa["id"]): i for i, art in enumerate(root["data"]) for p in art["paragraphs"] for qa in p["qas"]}


def split_task(data_dir: str, task: str) -> tuple[list, list]:
    """``(held_out_for_standin, client_pool)`` of one task, both in file order."""
    examples = load_local(data_dir, task)
    if task == "tc":
        held = [_held_tc(ex) for ex in examples]
    elif task == "rc":
        art = _squad_article_index(data_dir)
        held = [art[ex.id] % 4 == 0 for ex in examples]
    else:
        held = [i % 5 == 0 for i in range(len(examples))]
    return ([e for e, h in zip(examples, held, strict=True) if h],
            [e for e, h in zip(examples, held, strict=True) if not h])


def client_pool(data_dir: str, task: str) -> list:
    """Examples the evidence scripts may train and evaluate on (never in the stand-in corpus)."""
    return split_task(data_dir, task)[1]


def standin_texts(data_dir: str) -> dict[str, list[str]]:
    """Raw texts of the stand-in corpus per source (unique SQuAD contexts, XSum document + summary)."""
    out: dict[str, list[str]] = {}
    for task, source in TASK_SOURCE.items():
        held, _ = split_task(data_dir, task)
        if task == "tc":
            texts = [ex.text for ex in held if isinstance(ex, TCExample)]
        elif task == "rc":
            texts = list(dict.fromkeys(ex.context for ex in held if isinstance(ex, RCExample)))
        else:
            texts = [f"{ex.document}\n{ex.summary}" for ex in held if isinstance(ex, TSExample)]
        out[source] = texts
    return out


def task_text(ex) -> str:
    """The text a task's model input is built from (for routing statistics)."""
    if isinstance(ex, TCExample):
        return ex.text
    if isinstance(ex, RCExample):
        return f"{ex.question} {ex.context}"
    return ex.document


def setup_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def load_note() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} on {os.cpu_count()} CPUs"


def now() -> float:
    return time.perf_counter()


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95 % t confidence interval (0 for one value)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
