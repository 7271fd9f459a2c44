"""Which experts the stand-in grid's methods pick, from the engine's own plan (no training).

Builds :class:`fedmoe.engine.run.Run` for ``benchmarks/paper/standin.toml`` (enforced-hetero-t) at
each seed and records FedMoE's initial sets (θ search, α = ``fedmoe.alpha``, a fixed p per task),
randomMoE's (its seeded generator), FedProx's "largest smaller MoE" and the stage-1 memory-rich
clients. Run it once with each code version's ``src`` on ``PYTHONPATH`` and ``--compare`` the two
files: a change to the memory model must leave them identical (docs/memory.md, Calibration).

    PYTHONPATH=/work/main/src python benchmarks/memory/theta_invariance.py /tmp/before.json --p P.json
    PYTHONPATH=src            python benchmarks/memory/theta_invariance.py /tmp/after.json  --p P.json
    python benchmarks/memory/theta_invariance.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = ("fedmoe", "fedmoe_excluded", "random_moe", "fedprox", "sufficient")


def choices(seed: int, p_task: dict, data_dir: str) -> dict:
    import numpy as np

    from fedmoe.algorithms import fedmoe as algo
    from fedmoe.config import load_config
    from fedmoe.engine.run import Run
    from fedmoe.engine.strategies.baselines import resolve_num_experts

    cfg = load_config(REPO / "benchmarks" / "paper" / "standin.toml", [
        f"seed={seed}", 'setting.preset="enforced-hetero-t"', f'data.data_dir="{data_dir}"',
        f'data.exclude_ids="{REPO / "benchmarks/evidence/results/standin_heldout_ids.txt"}"'])
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp) / "run")
    table, cl = run.plan.table, sorted(run.clients)
    kw = dict(alpha=cfg.fedmoe.alpha, tol=cfg.fedmoe.theta_tol, exclude_unfit=cfg.federation.exclude_unfit)
    fm = algo.initial_expert_sets(algo.FedMoEServerState(), {c: np.asarray(p_task[run.clients[c].task]) for c in cl},
                                  table, reported=cl, **kw)
    rm = algo.initial_expert_sets(algo.FedMoEServerState(), {c: np.zeros_like(table.expert_bytes) for c in cl}, table,
                                  random_init=np.random.default_rng([seed, 7]), **kw)
    return dict(fedmoe={str(c): fm.expert_sets.get(c) for c in cl}, fedmoe_excluded=sorted(map(str, fm.excluded)),
                random_moe={str(c): rm.expert_sets.get(c) for c in cl}, fedprox=resolve_num_experts(run.plan, -1),
                sufficient=[c for c in cl if table.budgets[c] >= table.full_bytes(c)],
                budgets_mib={str(c): table.budgets[c] / 2**20 for c in cl})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="JSON file to write")
    ap.add_argument("--p", help="p_by_task.json of a stand-in run (its 'end' p per task)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        same = True
        for seed in a:
            diff = [k for k in KEYS if a[seed][k] != b.get(seed, {}).get(k)]
            same &= not diff
            print(f"seed {seed}: {'identical' if not diff else 'DIFFERENT: ' + ', '.join(diff)}")
        return 0 if same else 1
    if not args.out or not args.p or not Path(args.p).is_file():
        print("theta_invariance: give OUT.json and --p p_by_task.json (or --compare A B)", file=sys.stderr)
        return 2
    p_task = json.loads(Path(args.p).read_text())["end"]
    out = {str(s): choices(int(s), p_task, args.data_dir) for s in args.seeds.split(",")}
    Path(args.out).write_text(json.dumps(out, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
