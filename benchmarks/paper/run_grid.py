"""Run the paper's grid (Table 1 + Table 2 ablation) cell by cell, resumably and in parts.

Grid: {standard-hetero-t, standard-hetero-td, enforced-hetero-t, enforced-hetero-td} ×
{fedmoe, random_moe, fedprox, scaffold, fedavg, hfedmoe, flex}, plus the FedMoE ablation
variants ``fedmoe-no-stage1`` (``fedmoe.stage1=false``) and ``fedmoe-no-stage2``
(``fedmoe.stage2_adjust=false``) in every setting, for each seed. Each cell is one call of the
CLI::

    fedmoe run benchmarks/paper/<preset>.toml --set algorithm=<alg> --set setting.preset=<setting> \\
        --set seed=<k> [--set fedmoe.stage1=false | --set fedmoe.stage2_adjust=false] \\
        --out runs/paper/<preset>/<setting>/<method>/seed<k>

A cell whose ``summary.json`` exists is skipped, so the grid can be run in parts
(``--part K/N`` takes the K-th of N disjoint parts of about equal size, methods mixed), stopped and restarted. An unfinished cell is resumed from its last checkpoint when
it has one (``fedmoe run --resume``), else started again. Every finished or failed cell is
appended to ``runs/paper/<preset>/grid_log.jsonl``; a failed cell does not stop the others
(the exit code is 1 if any failed).

Usage::

    python benchmarks/paper/run_grid.py --preset cpu --part 1/4 --seeds 0
    python benchmarks/paper/run_grid.py --preset cpu --dry-run          # list the commands
    fedmoe report runs/paper/cpu --out runs/paper/cpu/report            # then build the report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PRESETS = ("cpu", "gpu", "standin")
SETTINGS = ("standard-hetero-t", "standard-hetero-td", "enforced-hetero-t", "enforced-hetero-td")
METHODS = ("fedmoe", "random_moe", "fedprox", "scaffold", "fedavg", "hfedmoe", "flex")
#: ablation variant → (algorithm, extra overrides) (paper Table 2)
ABLATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedmoe-no-stage1": ("fedmoe", ("fedmoe.stage1=false",)),
    "fedmoe-no-stage2": ("fedmoe", ("fedmoe.stage2_adjust=false",)),
}


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    preset: str
    setting: str
    method: str  #: directory name: an algorithm or an ablation variant
    seed: int

    @property
    def algorithm(self) -> str:
        return ABLATIONS[self.method][0] if self.method in ABLATIONS else self.method

    @property
    def overrides(self) -> list[str]:
        extra = list(ABLATIONS[self.method][1]) if self.method in ABLATIONS else []
        return [f"algorithm={self.algorithm}", f"setting.preset={self.setting}", f"seed={self.seed}", *extra]

    def out_dir(self, root: Path) -> Path:
        return root / self.preset / self.setting / self.method / f"seed{self.seed}"


def grid(preset: str, seeds: list[int], settings: list[str] | tuple[str, ...] = SETTINGS,
         methods: list[str] | tuple[str, ...] = METHODS, ablation: bool = True, order: str = "seed") -> list[Cell]:
    """All cells in a fixed order: seed, then setting, then method (ablation variants last);
    ``order="setting"``: setting (in the order given), then seed, then method, so a setting's
    seeds finish one whole seed (every method) at a time."""
    variants = list(methods) + ([m for m in ABLATIONS if m not in methods] if ablation else [])
    if order == "setting":
        return [Cell(preset, s, m, k) for s in settings for k in seeds for m in variants]
    return [Cell(preset, s, m, k) for k in seeds for s in settings for m in variants]


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 1 ≤ K ≤ N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must look like K/N (e.g. 2/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--part K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def _mix(cell: Cell) -> str:
    return hashlib.sha1(f"{cell.setting}/{cell.method}/{cell.seed}".encode()).hexdigest()


def select_part(cells: list[Cell], k: int, n: int, interleave: bool = False) -> list[Cell]:
    """Part k (1-based) of n: every n-th cell of the grid in a fixed pseudo-random order (a hash
    of setting/method/seed), so parts are disjoint, cover the grid and mix cheap and expensive
    methods; within a part the grid order is kept. Every part must be given the same grid
    arguments (seeds, settings, methods). ``interleave``: every n-th cell of the grid order
    itself, so parallel parts walk the grid side by side (whole seeds finish together)."""
    if interleave:
        return cells[k - 1::n]
    mixed = sorted(cells, key=_mix)
    chosen = set(mixed[k - 1::n])
    return [c for c in cells if c in chosen]


def command(cell: Cell, root: Path, extra: list[str], resume: bool = False) -> list[str]:
    """The CLI call of one cell (``--resume`` continues an unfinished run from its checkpoint)."""
    cli = [sys.executable, "-m", "fedmoe.cli", "run"]
    if resume:
        return [*cli, "--resume", _rel(cell.out_dir(root))]
    config = HERE / f"{cell.preset}.toml"
    sets = [a for o in [*cell.overrides, *extra] for a in ("--set", o)]
    return [*cli, str(config.relative_to(REPO)), *sets, "--out", _rel(cell.out_dir(root))]


def _rel(path: Path) -> str:
    """``path`` relative to the repository root when inside it (commands run there)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def state(cell: Cell, root: Path) -> str:
    """``done`` (summary.json), ``resumable`` (a checkpoint), ``partial`` (files, no checkpoint) or ``new``."""
    d = cell.out_dir(root)
    if (d / "summary.json").is_file():
        return "done"
    if (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir()):
        return "resumable"
    return "partial" if d.exists() else "new"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, required=True, help="benchmarks/paper/<preset>.toml")
    ap.add_argument("--part", type=parse_part, default=(1, 1), help="K/N: run the K-th of N disjoint parts")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated algorithms")
    ap.add_argument("--order", choices=("seed", "setting"), default="seed",
                    help="seed: seed-major, parts mixed by a hash (default); setting: setting-major (in --settings "
                         "order), then seed, then method, parts interleaved so whole seeds finish together")
    ap.add_argument("--no-ablation", action="store_true", help="leave out the FedMoE ablation variants")
    ap.add_argument("--root", type=Path, default=Path("runs/paper"), help="output root, relative to the repository "
                    "(default runs/paper)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every cell")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and cell states, run nothing")
    args = ap.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [s for s in settings if s not in SETTINGS] + [m for m in methods if m not in METHODS and m not in ABLATIONS]
    if bad:
        ap.error(f"unknown setting/method {bad}; settings: {', '.join(SETTINGS)}; methods: {', '.join(METHODS)}")
    cells = select_part(grid(args.preset, seeds, settings, methods, not args.no_ablation, args.order), *args.part,
                        interleave=args.order == "setting")
    root: Path = args.root if args.root.is_absolute() else REPO / args.root
    log = root / args.preset / "grid_log.jsonl"
    failed: list[Cell] = []
    commit = code_commit()
    todo = [c for c in cells if state(c, root) != "done"]
    print(f"part {args.part[0]}/{args.part[1]}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run",
          flush=True)
    for i, cell in enumerate(todo, start=1):
        st = state(cell, root)
        cmd = command(cell, root, args.extra, resume=st == "resumable")
        print(f"[{i}/{len(todo)}] {cell.setting}/{cell.method}/seed{cell.seed} ({st}): {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        if st == "partial":
            shutil.rmtree(cell.out_dir(root))  # an interrupted run without a checkpoint: start it again
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        entry = {"cell": f"{cell.setting}/{cell.method}/seed{cell.seed}", "rc": rc, "wall_s": round(time.time() - t0, 1),
                 "command": shlex.join(cmd), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit,
                 "load": _load()}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if rc != 0:
            failed.append(cell)
            print(f"    failed (exit {rc}); continuing", flush=True)
    if failed:
        print("failed cells: " + ", ".join(f"{c.setting}/{c.method}/seed{c.seed}" for c in failed), flush=True)
    print(f"report: fedmoe report {_rel(root / args.preset)} --out {_rel(root / args.preset / 'report')}", flush=True)
    return 1 if failed else 0


def code_commit() -> str:
    """The commit the cells run at (``git rev-parse --short HEAD`` of this checkout, ``+dirty`` when
    tracked files under src/ differ from it; ``unknown`` outside git), written into every log line."""
    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--", "src").returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
