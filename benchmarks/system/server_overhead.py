"""Server overhead per round as a share of the round's wall time, on a tiny real run.

Runs one in-process experiment (default ``configs/tiny.toml``, FedMoE, small overrides) with
timing wrappers installed on engine functions from the outside (monkeypatch style; no engine
file is edited):

* **extraction** — ``fedmoe.engine.run.extract`` (the server builds each sampled client's
  sub-MoE; the engine calls it twice per client turn: the base sub-MoE and the trainable
  template);
* **aggregation** — the strategy's ``aggregate`` plus ``Trainables.to_update`` (unpacking each
  upload into per-expert slices);
* **recommendation** — the strategy's ``after_round`` (record p / scores, expert
  recommendation, revert-and-freeze) and ``plan`` (sampling; stage-1 p prediction and θ search
  at the first stage-2 round). ``plan`` runs before a round's timer starts, so it is added to
  the round's wall time for the shares;
* **serialisation** — ``to_bytes`` / ``from_bytes`` called by the server (payloads and the
  one-time base-weight accounting);
* **client** — ``run_client`` (the simulated client's local training and validation).

"other" = round wall time − all of the above (PEFT wrapping, bookkeeping).

Usage: ``python benchmarks/system/server_overhead.py [--config configs/tiny.toml] [--set k=v ...]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, machine, md_table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SETS = [
    "data.max_examples_per_task=60", "setting.num_clients=6", "setting.clients_per_round=3",
    "fedmoe.stage1_rounds=1", "fedmoe.rounds=3", "train.max_local_steps=2",
    "engine.measure_memory=false", "engine.checkpoint_every=0",
]
PARTS = ("client", "extraction", "aggregation", "recommendation", "serialisation")


class Clock:
    """Accumulates wrapped functions' time into the current round's buckets (outermost call only)."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.pending_plan = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, fn: Any, bucket: str) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:  # nested inside another timed call: counted there
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                dt = time.perf_counter() - t0
                if bucket == "plan":
                    self.pending_plan += dt
                else:
                    self.current[bucket] += dt

        return timed


def install(clock: Clock) -> None:
    """Wrap the engine's functions (module attributes and classes) with the clock."""
    import fedmoe.engine.run as run_mod
    from fedmoe.engine.trainables import Trainables

    run_mod.extract = clock.wrap(run_mod.extract, "extraction")
    run_mod.run_client = clock.wrap(run_mod.run_client, "client")
    run_mod.to_bytes = clock.wrap(run_mod.to_bytes, "serialisation")
    run_mod.from_bytes = clock.wrap(run_mod.from_bytes, "serialisation")
    Trainables.to_update = clock.wrap(Trainables.to_update, "aggregation")

    original_get = run_mod.get_strategy

    def get_strategy(name: str) -> Any:
        strategy = original_get(name)
        strategy.aggregate = clock.wrap(strategy.aggregate, "aggregation")
        strategy.after_round = clock.wrap(strategy.after_round, "recommendation")
        strategy.plan = clock.wrap(strategy.plan, "plan")
        return strategy

    run_mod.get_strategy = get_strategy
    original_round = run_mod.Run.round

    def round_(self: Any, plan: Any) -> Any:
        clock.current = defaultdict(float)
        rr = original_round(self, plan)
        parts = dict(clock.current)
        parts["recommendation"] = parts.get("recommendation", 0.0) + clock.pending_plan
        clock.rounds.append({"round": rr.round, "stage": rr.stage, "clients": len(rr.clients),
                             "wall": rr.wall_time_s + clock.pending_plan, **parts})
        clock.pending_plan = 0.0
        return rr

    run_mod.Run.round = round_


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--set", dest="sets", action="append", default=None, help="override (default: small tiny run)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update results.md")
    args = ap.parse_args(argv)
    sets = DEFAULT_SETS if args.sets is None else args.sets
    from fedmoe.config import load_config

    cfg = load_config(REPO / args.config, sets)
    clock = Clock()
    install(clock)
    from fedmoe.engine.run import run_experiment

    load0 = load_avg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_experiment(cfg, out)
    total = time.perf_counter() - t0
    load1 = load_avg()

    rows, sums = [], defaultdict(float)
    for r in clock.rounds:
        other = r["wall"] - sum(r.get(k, 0.0) for k in PARTS)
        server = sum(r.get(k, 0.0) for k in ("extraction", "aggregation", "recommendation"))
        for k in (*PARTS, "wall"):
            sums[k] += r.get(k, 0.0)
        sums["other"] += other
        rows.append([str(r["round"]), str(r["stage"]), str(r["clients"]), f"{r['wall']:.2f}"]
                    + [f"{r.get(k, 0.0):.3f}" for k in PARTS] + [f"{other:.3f}", f"{100 * server / r['wall']:.1f} %"])
    wall = sums["wall"]
    server = sum(sums[k] for k in ("extraction", "aggregation", "recommendation"))
    rows.append(["all", "", "", f"{wall:.2f}"] + [f"{sums[k]:.3f} ({100 * sums[k] / wall:.1f} %)" for k in PARTS]
                + [f"{sums['other']:.3f} ({100 * sums['other'] / wall:.1f} %)", f"**{100 * server / wall:.1f} %**"])
    table = md_table(["round", "stage", "clients", "wall s", "client s", "extraction s", "aggregation s",
                      "recommendation s", "serialisation s", "other s", "server share"], rows)
    cmd = "python benchmarks/system/server_overhead.py" + ("" if args.sets is None else
                                                            "".join(f" --set {s}" for s in sets))
    body = (
        "## Server overhead per round\n\n"
        f"Command: `{cmd}` (config `{args.config}`, overrides `{' '.join(sets)}`; algorithm `{cfg.algorithm}`, "
        f"model `{cfg.model.name}`).\n\n"
        f"Machine: {machine()}; load average {load0:.1f} → {load1:.1f} (shared machine: other jobs were running). "
        f"Whole run {total:.1f} s (setup and final test included).\n\n"
        f"{table}\n\n"
        f"Server share = (extraction + aggregation + recommendation) / round wall time; over all rounds "
        f"**{100 * server / wall:.1f} %** (serialisation adds {100 * sums['serialisation'] / wall:.1f} %). "
        "The model here is tiny and clients take 1–2 local steps; with a larger model extraction grows with the "
        "sub-MoE's bytes (see the throughput section for its cost per byte) and aggregation with the trainable "
        "bytes uploaded, while client training grows with model size × local steps.\n"
    )
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('server_overhead', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
