"""Re-price stored client-turn measurements with the current memory model (no training).

A turn's measured peak does not depend on the memory model, so after a change to the formula
or to ``fedmoe.engine.budget``'s runtime constants the table of ``client_turns.py`` can be
re-priced offline: for each (model, size) of the stored table the engine's :class:`Run` is
built on the same configuration (``client_turns.turn_config``; no client turn runs) and each
row's *predicted* becomes ``run.plan.submodel_bytes(kept, client=cid)`` — exactly what the
turn's ``predicted_memory_bytes`` would now be. Measured columns are kept as stored.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/reprice_turns.py benchmarks/memory/client_turns.md
    ... --out benchmarks/memory/client_turns.md     # rewrite in place (default: print only)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MiB = 2**20


def parse_rows(text: str) -> list[dict]:
    """The table rows of a ``client_turns.md`` (model, task, B, S, experts/layer, …, measured MiB, …)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or not cells[2].isdigit():
            continue
        model, dtype = (cells[0].split(" (")[0], cells[0].split(" (")[1].rstrip(")")) if " (" in cells[0] else (cells[0], "float32")
        rows.append(dict(label=cells[0], model=model, dtype=dtype, task=cells[1], B=int(cells[2]), S=int(cells[3]),
                         kept=int(cells[4]), old=float(cells[5]), measured=float(cells[6]), cells=cells))
    return rows


def reprice(rows: list[dict], data_dir: str) -> None:
    """Set ``row["predicted"]`` (MiB) from the current memory model."""
    import torch
    from client_turns import turn_config

    from fedmoe.engine.run import Run

    torch.set_num_threads(1)
    for key in dict.fromkeys((r["model"], r["dtype"], r["B"], r["S"]) for r in rows):
        name, dtype, b, s = key
        with tempfile.TemporaryDirectory() as tmp:
            run = Run(turn_config(name, b, s, data_dir, 0, dtype), Path(tmp) / "run")
        by_task = {run.clients[c].task: c for c in sorted(run.clients)}
        for r in rows:
            if (r["model"], r["dtype"], r["B"], r["S"]) == key:
                kept = [list(range(min(r["kept"], e))) for e in run.plan.num_experts]
                r["predicted"] = run.plan.submodel_bytes(kept, client=by_task[r["task"]]) / MiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="a client_turns.md written by client_turns.py")
    ap.add_argument("--data-dir", default=str(HERE.parents[1].parent / "shared" / "data"))
    ap.add_argument("--out", default=None, help="write the re-priced table here (default: print only)")
    args = ap.parse_args(argv)
    path = Path(args.table)
    if not path.is_file():
        print(f"reprice_turns: no such table: {path}", file=sys.stderr)
        return 2
    text = path.read_text()
    rows = parse_rows(text)
    if not rows:
        print(f"reprice_turns: no client-turn rows in {path}", file=sys.stderr)
        return 2
    reprice(rows, args.data_dir)
    lines = text.splitlines()
    for r in rows:
        ratio = r["predicted"] / r["measured"]
        print(f"{r['label']:28s} {r['task']} B{r['B']:<3d} S{r['S']:<4d} kept {r['kept']:2d}  predicted "
              f"{r['predicted']:8.1f} (was {r['old']:8.1f})  measured {r['measured']:8.1f}  ratio {ratio:.3f}")
        old = "| " + " | ".join(r["cells"]) + " |"
        cells = list(r["cells"])
        cells[5], cells[7] = f"{r['predicted']:.1f}", f"{ratio:.3f}"
        lines = [("| " + " | ".join(cells) + " |") if ln.strip() == old else ln for ln in lines]
    summary = []
    for label in dict.fromkeys(r["label"] for r in rows):
        for size in dict.fromkeys((r["B"], r["S"]) for r in rows if r["label"] == label):
            rs = [r["predicted"] / r["measured"] for r in rows if r["label"] == label and (r["B"], r["S"]) == size]
            summary.append(f"* {label} at {size[0]} × {size[1]}: ratio {min(rs):.3f} – {max(rs):.3f} over {len(rs)} turns")
    print("\n".join(summary))
    if args.out:
        body = [ln for ln in lines if not ln.startswith("* ")]
        while body and not body[-1].strip():
            body.pop()
        Path(args.out).write_text("\n".join(body + ["", "Re-priced offline (`benchmarks/memory/reprice_turns.py`, "
                                                     "measured peaks as stored):", "", *summary]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
