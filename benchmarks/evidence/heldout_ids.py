"""Write the ids of the stand-in's corpus rows, for ``data.exclude_ids`` in ``fedmoe run``.

The stand-in (``build_standin.py``) is trained on rows that no client may see (the rule is in
``common.py``). ``fedmoe run`` reads every row of ``data_dir``, so a federated run on the stand-in
sets ``data.exclude_ids`` to the file this script writes: one example id per line, ``#`` comments.
For SQuAD the ids are those of every *question* of the held-out articles (their contexts are in
the corpus), so no question on a held-out passage reaches a client.

    python benchmarks/evidence/heldout_ids.py            # → benchmarks/evidence/results/standin_heldout_ids.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, RESULTS, split_task  # noqa: E402

OUT = RESULTS / "standin_heldout_ids.txt"


def heldout_ids(data_dir: str) -> dict[str, list[str]]:
    """Task → ids of its rows in the stand-in corpus (file order)."""
    return {task: [ex.id for ex in split_task(data_dir, task)[0]] for task in ("tc", "rc", "ts")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    ids = heldout_ids(args.data_dir)
    lines = ["# ids of the stand-in corpus rows (benchmarks/evidence/common.py); use as data.exclude_ids",
             "# " + ", ".join(f"{t}: {len(v)}" for t, v in ids.items())]
    lines += [i for v in ids.values() for i in v]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{sum(len(v) for v in ids.values())} ids → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
