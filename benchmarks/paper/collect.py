"""Copy the small outputs of finished grid cells into the repository (docs/results/<grid>/…).

A finished cell (one with ``summary.json``) keeps ``summary.json``, ``rounds.jsonl``,
``config.toml`` and ``p_by_task.json``; predictions, checkpoints and models stay behind.
``grid_log.jsonl`` (exit codes and wall times) is copied too. ``fedmoe report`` reads the
copies exactly as it reads the runs, so every number regenerates from the committed files::

    python benchmarks/paper/collect.py runs/paper/standin docs/results/standin
    fedmoe report docs/results/standin --out /tmp/standin-report

``--keep-existing`` adds only cells the destination does not have yet (a cell re-run elsewhere and
copied in by hand stays as it is) and appends the source log's new lines to the destination's
``grid_log.jsonl`` instead of replacing it. ``--replace`` copies every finished cell over the
destination's (a re-run of some cells at a newer commit: each replaced cell's old kept files are
removed first) and appends the log's new lines too; ``--commit SHA`` writes the commit the source grid
ran at into each appended line that lacks one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

KEEP = ("summary.json", "rounds.jsonl", "config.toml", "p_by_task.json")


def collect(src: Path, dst: Path, keep_existing: bool = False, replace: bool = False,
            commit: str | None = None) -> list[Path]:
    """Copy the kept files of every finished cell below ``src`` to the same place below ``dst``
    (with ``keep_existing``, only cells ``dst`` does not have; with ``replace``, every finished cell,
    the old cell's kept files removed first; with either, the log's new lines are appended, tagged
    with ``commit`` where given)."""
    import json

    copied = []
    for summary in sorted(src.rglob("summary.json")):
        cell = summary.parent
        target = dst / cell.relative_to(src)
        if keep_existing and (target / "summary.json").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        if replace:
            for name in KEEP:
                (target / name).unlink(missing_ok=True)
        for name in KEEP:
            if (cell / name).is_file():
                shutil.copy2(cell / name, target / name)
        copied.append(target)
    log, dst_log = src / "grid_log.jsonl", dst / "grid_log.jsonl"
    if log.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        if (keep_existing or replace) and dst_log.is_file():
            have = set(dst_log.read_text().splitlines())
            new = [line for line in log.read_text().splitlines() if line.strip() and line not in have]
            if commit:
                new = [json.dumps({**json.loads(line), "commit": json.loads(line).get("commit", commit)})
                       for line in new]
                new = [line for line in new if line not in have]
            with dst_log.open("a") as f:
                f.writelines(line + "\n" for line in new)
        else:
            shutil.copy2(log, dst_log)
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="grid output root, e.g. runs/paper/standin")
    ap.add_argument("dst", type=Path, help="where the small files go, e.g. docs/results/standin")
    ap.add_argument("--keep-existing", action="store_true",
                    help="add only cells dst does not have; append new grid_log lines")
    ap.add_argument("--replace", action="store_true",
                    help="copy every finished cell over dst's; append new grid_log lines")
    ap.add_argument("--commit", default=None, help="with --keep-existing/--replace: the commit the grid ran at, "
                    "written into appended log lines that lack one")
    args = ap.parse_args(argv)
    if args.keep_existing and args.replace:
        print("error: --keep-existing and --replace exclude each other; pick one.", file=sys.stderr)
        return 2
    cells = collect(args.src, args.dst, keep_existing=args.keep_existing, replace=args.replace, commit=args.commit)
    print(f"{len(cells)} finished cell(s) → {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
