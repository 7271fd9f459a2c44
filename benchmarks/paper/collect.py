"""Copy the small outputs of finished grid cells into the repository (docs/results/<grid>/…).

A finished cell (one with ``summary.json``) keeps ``summary.json``, ``rounds.jsonl``,
``config.toml`` and ``p_by_task.json``; predictions, checkpoints and models stay behind.
``grid_log.jsonl`` (exit codes and wall times) is copied too. ``fedmoe report`` reads the
copies exactly as it reads the runs, so every number regenerates from the committed files::

    python benchmarks/paper/collect.py runs/paper/standin docs/results/standin
    fedmoe report docs/results/standin --out /tmp/standin-report
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

KEEP = ("summary.json", "rounds.jsonl", "config.toml", "p_by_task.json")


def collect(src: Path, dst: Path) -> list[Path]:
    """Copy the kept files of every finished cell below ``src`` to the same place below ``dst``."""
    copied = []
    for summary in sorted(src.rglob("summary.json")):
        cell = summary.parent
        target = dst / cell.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (cell / name).is_file():
                shutil.copy2(cell / name, target / name)
        copied.append(target)
    if (src / "grid_log.jsonl").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "grid_log.jsonl", dst / "grid_log.jsonl")
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="grid output root, e.g. runs/paper/standin")
    ap.add_argument("dst", type=Path, help="where the small files go, e.g. docs/results/standin")
    args = ap.parse_args(argv)
    cells = collect(args.src, args.dst)
    print(f"{len(cells)} finished cell(s) → {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
