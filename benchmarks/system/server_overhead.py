"""Server overhead per round as a share of the round's wall time, on a tiny real run.

Runs one in-process experiment (default ``configs/tiny.toml``, FedMoE, small overrides) with
timing wrappers installed on engine functions from the outside (monkeypatch style; no engine
file is edited):

* **client** — ``run_client`` (the simulated client's local training and validation);
* **client extraction** — ``fedmoe.engine.run.extract``: the sub-MoE the simulated client trains
  (in a deployment the node extracts it from its own base model, not the server);
* **templates** — ``TemplateCache.get``: the server's wrapped sub-MoE it shapes downloads and
  reads uploads with (extraction + peft wrapping; built once per expert-count shape, or — mode
  ``fresh``, the previous behaviour — once per client turn);
* **aggregation** — the strategy's ``aggregate`` plus ``Trainables.to_update`` (unpacking each
  upload into per-expert slices);
* **recommendation** — the strategy's ``after_round`` (record p / scores, expert
  recommendation, revert-and-freeze) and ``plan`` (sampling; stage-1 p prediction and θ search
  at the first stage-2 round). ``plan`` runs before a round's timer starts, so it is added to
  the round's wall time for the shares;
* **serialisation** — ``to_bytes`` / ``from_bytes`` called by the server (payloads);
* **other** = round wall time − all of the above: the rest of the server's turn (shaping the
  download, checking the upload, base-weight byte count, records).

Server share = (templates + aggregation + recommendation + other) / round wall time: everything
the server does in a deployment except serialisation. The previous definition (client
extraction + aggregation + recommendation, "other" left out) is reported beside it.

Modes, run interleaved in one process (``--modes fresh,cached --reps 2``): ``cached`` (the
engine's default) and ``fresh`` (``fedmoe.engine.templates.CAPACITY = 0``: a template extracted
and wrapped for every client turn, as before).

Usage: ``python benchmarks/system/server_overhead.py [--config configs/tiny.toml] [--set k=v ...]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
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
    "data.max_examples_per_task=60", "setting.num_clients=6", "federation.clients_per_round=3",
    "fedmoe.stage1_rounds=1", "federation.rounds=3", "train.max_local_steps=2",
    "engine.measure_memory=false", "engine.checkpoint_every=0",
]
PARTS = ("client", "extraction", "templates", "aggregation", "recommendation", "serialisation")
SERVER = ("templates", "aggregation", "recommendation", "other")
OLD_SERVER = ("extraction", "aggregation", "recommendation")


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
    from fedmoe.engine.templates import TemplateCache
    from fedmoe.engine.trainables import Trainables

    run_mod.extract = clock.wrap(run_mod.extract, "extraction")
    run_mod.run_client = clock.wrap(run_mod.run_client, "client")
    run_mod.to_bytes = clock.wrap(run_mod.to_bytes, "serialisation")
    run_mod.from_bytes = clock.wrap(run_mod.from_bytes, "serialisation")
    Trainables.to_update = clock.wrap(Trainables.to_update, "aggregation")
    TemplateCache.get = clock.wrap(TemplateCache.get, "templates")

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


def one_run(cfg: Any, clock: Clock, mode: str) -> tuple[list[dict[str, Any]], float]:
    """One experiment in ``mode``; its rounds' buckets and the whole run's seconds."""
    from fedmoe.engine import templates
    from fedmoe.engine.run import run_experiment

    templates.CAPACITY = 0 if mode == "fresh" else CACHED_CAPACITY
    clock.rounds = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_experiment(cfg, out)
    return clock.rounds, time.perf_counter() - t0


def totals(rounds: list[dict[str, Any]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for r in rounds:
        for k in (*PARTS, "wall"):
            sums[k] += r.get(k, 0.0)
        sums["other"] += r["wall"] - sum(r.get(k, 0.0) for k in PARTS)
    return sums


def share(sums: dict[str, float], parts: tuple[str, ...]) -> float:
    return 100 * sum(sums[k] for k in parts) / sums["wall"]


def main(argv: list[str] | None = None) -> int:
    global CACHED_CAPACITY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--set", dest="sets", action="append", default=None, help="override (default: small tiny run)")
    ap.add_argument("--modes", default="fresh,cached", help="comma-separated: fresh, cached (interleaved)")
    ap.add_argument("--reps", type=int, default=2, help="runs per mode (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="unreported runs first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--section", default="server_overhead", help="results.md section to replace")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update results.md")
    args = ap.parse_args(argv)
    sets = DEFAULT_SETS if args.sets is None else args.sets
    import torch

    torch.set_num_threads(args.threads)
    from fedmoe.config import load_config
    from fedmoe.engine import templates

    CACHED_CAPACITY = templates.CAPACITY
    cfg = load_config(REPO / args.config, sets)
    clock = Clock()
    install(clock)
    modes = args.modes.split(",")
    for _ in range(args.warmup):
        one_run(cfg, clock, modes[-1])  # imports and first-call costs, not reported
    load0 = load_avg()
    runs: dict[str, list[tuple[list[dict[str, Any]], float]]] = {m: [] for m in modes}
    for _ in range(args.reps):
        for m in modes:
            runs[m].append(one_run(cfg, clock, m))
    load1 = load_avg()

    summary_rows = []
    for m in modes:
        for i, (rounds, total) in enumerate(runs[m]):
            s = totals(rounds)
            summary_rows.append([m, str(i + 1), f"{s['wall']:.2f}", f"{total:.1f}"]
                                + [f"{s[k]:.3f} ({100 * s[k] / s['wall']:.1f} %)" for k in (*PARTS, "other")]
                                + [f"**{share(s, SERVER):.1f} %**", f"{share(s, OLD_SERVER):.1f} %"])
    head = ["mode", "run", "rounds wall s", "whole run s", "client s", "client extraction s", "templates s",
            "aggregation s", "recommendation s", "serialisation s", "other s", "server share", "old definition"]
    summary = md_table(head, summary_rows)
    last_mode = modes[-1]
    rows = []
    for r in runs[last_mode][-1][0]:
        other = r["wall"] - sum(r.get(k, 0.0) for k in PARTS)
        srv = sum(r.get(k, 0.0) for k in SERVER if k != "other") + other
        rows.append([str(r["round"]), str(r["stage"]), str(r["clients"]), f"{r['wall']:.2f}"]
                    + [f"{r.get(k, 0.0):.3f}" for k in PARTS] + [f"{other:.3f}", f"{100 * srv / r['wall']:.1f} %"])
    table = md_table(["round", "stage", "clients", "wall s", "client s", "client extraction s", "templates s",
                      "aggregation s", "recommendation s", "serialisation s", "other s", "server share"], rows)
    med = {m: statistics.median(share(totals(rr), SERVER) for rr, _ in runs[m]) for m in modes}
    cmd = (f"OMP_NUM_THREADS=1 python benchmarks/system/server_overhead.py --modes {args.modes} --reps {args.reps} "
           f"--threads {args.threads} --warmup {args.warmup}" + ("" if args.config == "configs/tiny.toml" else f" --config {args.config}")
           + ("" if args.sets is None else "".join(f" --set {s}" for s in sets)))
    body = (
        f"## Server overhead per round ({cfg.model.name})\n\n"
        f"Command: `{cmd}` (config `{args.config}`, overrides `{' '.join(sets)}`; algorithm `{cfg.algorithm}`, "
        f"model `{cfg.model.name}`).\n\n"
        f"Machine: {machine()}; load average {load0:.1f} → {load1:.1f} (shared machine: other jobs were running). "
        "Runs interleaved in one process; `fresh` = a template extracted and wrapped for every client turn (the "
        "engine before template caching), `cached` = the engine now.\n\n"
        f"{summary}\n\n"
        f"Per round, last `{last_mode}` run:\n\n{table}\n\n"
        "Server share = (templates + aggregation + recommendation + other) / round wall time — everything the "
        "server does in a deployment except serialisation; \"old definition\" = (client extraction + aggregation "
        "+ recommendation) / wall, the figure this section reported before (it left the server's template and "
        "checks in \"other\" out and counted the simulated client's extraction in). Median server share: "
        + ", ".join(f"`{m}` **{v:.1f} %**" for m, v in med.items()) + ".\n"
    )
    print(body)
    if not args.no_write:
        print(f"wrote {write_section(args.section, body)}")
    return 0


CACHED_CAPACITY = 8

if __name__ == "__main__":
    sys.exit(main())
