"""Sub-MoE extraction and modular aggregation throughput (GB/s) against plain torch copies.

Model: ``build_tiny("tiny-mixtral", hidden_size=512, intermediate_size=1024,
num_local_experts=16, num_hidden_layers=4)`` — a real ``MixtralForCausalLM`` (fused expert
tensors, 416 MB fp32). Measured in one process with ``--threads`` torch threads (default 1), all
operations interleaved round-robin (``--reps`` rounds after one warm-up round; medians), so the
machine's load affects them alike:

* **extraction**: ``fedmoe.moe.slicing.extract(model, kept)`` with ``--keep`` random experts
  per layer; bytes = the sub-MoE's state (everything it materialises);
* **modular aggregation**: ``fedmoe.core.aggregation.modular_aggregate`` of ``--clients``
  updates (dense tensors + each client's kept experts and router rows, as
  ``layout_of(model)`` slices), bytes = all update tensors read;
* baselines on the same byte counts: ``clone()`` of one flat buffer (allocate + copy, what
  extraction must at least do), ``copy_`` into a preallocated buffer (memory bandwidth), and
  for aggregation the same float64 weighted sum done on flat buffers (the arithmetic alone).

Usage: ``python benchmarks/system/throughput.py [--reps 5] [--clients 3] [--keep 8] [--threads 1]``.
Calling :func:`fedmoe.apply_process_policy` first applies the project's process policy (transparent huge pages for
large CPU tensors, passive OpenMP waits), as the ``fedmoe`` CLI does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import fedmoe

fedmoe.apply_process_policy()  # the CLI's thread/allocator policy, before torch

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, machine, md_table, write_section  # noqa: E402

from fedmoe.core.aggregation import ClientUpdate, modular_aggregate  # noqa: E402
from fedmoe.moe.families import family_of  # noqa: E402
from fedmoe.moe.models import build_tiny  # noqa: E402
from fedmoe.moe.slicing import extract, layout_of  # noqa: E402

GB = 1e9
CONFIG = dict(hidden_size=512, intermediate_size=1024, num_local_experts=16, num_hidden_layers=4)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def make_updates(state, layout, kept_by_client, rng) -> list[ClientUpdate]:
    """Client updates shaped like the global slices (random values near the global ones)."""
    updates = []
    for cid, kept in enumerate(kept_by_client):
        upd = ClientUpdate(cid, int(rng.integers(10, 100)))
        upd.dense = {k: state[k] + 0.01 for k in layout.dense_keys}
        for i, ids in enumerate(kept):
            for g in ids:
                upd.experts[(i, g)] = [s.read(state) + 0.01 for s in layout.experts[(i, g)]]
                upd.routers[(i, g)] = [s.read(state) + 0.01 for s in layout.routers[(i, g)]]
        updates.append(upd)
    return updates


def update_bytes(updates: list[ClientUpdate]) -> int:
    n = 0
    for u in updates:
        n += state_bytes(u.dense)
        n += sum(t.numel() * t.element_size() for ts in (*u.experts.values(), *u.routers.values()) for t in ts)
    return n


def flat_mean(bufs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The float64 weighted mean of flat fp32 buffers (the previous aggregation arithmetic)."""
    ws = [w / sum(weights) for w in weights]
    acc = torch.zeros(bufs[0].numel(), dtype=torch.float64)
    for w, b in zip(ws, bufs, strict=True):
        acc.add_(b.to(torch.float64), alpha=w)
    return acc.to(torch.float32)


def interleaved(ops: dict[str, object], reps: int) -> dict[str, float]:
    """Median wall time of each op, ops run round-robin (one warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(reps + 1):
        for name, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--keep", type=int, default=8, help="experts kept per layer (of 16)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update results.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = load_avg()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_tiny("tiny-mixtral", **CONFIG)
    family = family_of(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layout = layout_of(model, family)
    n_layers = len(family.blocks(model))
    n_exp = CONFIG["num_local_experts"]

    def kept_sets() -> list[list[int]]:
        return [sorted(rng.choice(n_exp, size=args.keep, replace=False).tolist()) for _ in range(n_layers)]

    # extraction and aggregation, with their baselines, interleaved ----------------------
    kept = kept_sets()
    sub_bytes = state_bytes(extract(model, kept, family).model.state_dict())
    updates = make_updates(state, layout, [kept_sets() for _ in range(args.clients)], rng)
    in_bytes = update_bytes(updates)
    weights = [float(u.num_examples) for u in updates]
    flat_sub = torch.empty(sub_bytes, dtype=torch.uint8).fill_(1)
    dst_sub = torch.empty_like(flat_sub)
    flat_in = torch.empty(in_bytes, dtype=torch.uint8).fill_(1)
    dst_in = torch.empty_like(flat_in)
    bufs = [torch.rand(in_bytes // args.clients // 4) for _ in weights]
    t = interleaved({
        "extract": lambda: extract(model, kept, family),
        "clone_sub": lambda: flat_sub.clone(),
        "copy_sub": lambda: dst_sub.copy_(flat_sub),
        "aggregate": lambda: modular_aggregate(state, layout, updates),
        "clone_in": lambda: flat_in.clone(),
        "copy_in": lambda: dst_in.copy_(flat_in),
        "flat_mean": lambda: flat_mean(bufs, weights),
    }, args.reps)
    t_extract, t_clone, t_copy = t["extract"], t["clone_sub"], t["copy_sub"]
    t_agg, t_agg_clone, t_agg_copy, t_flat_mean = t["aggregate"], t["clone_in"], t["copy_in"], t["flat_mean"]
    load1 = load_avg()

    def gbps(nbytes: int, t: float) -> str:
        return f"{nbytes / t / GB:.2f}"

    rows = [
        ["sub-MoE extraction (`extract`)", f"{sub_bytes / 1e6:.1f}", f"{t_extract * 1e3:.1f}", gbps(sub_bytes, t_extract),
         f"{t_extract / t_clone:.2f}× clone, {t_extract / t_copy:.2f}× copy_"],
        ["  plain `clone()` of the same bytes", f"{sub_bytes / 1e6:.1f}", f"{t_clone * 1e3:.1f}", gbps(sub_bytes, t_clone), "1"],
        ["  plain `copy_` of the same bytes", f"{sub_bytes / 1e6:.1f}", f"{t_copy * 1e3:.1f}", gbps(sub_bytes, t_copy), "—"],
        [f"modular aggregation, {args.clients} clients (`modular_aggregate`)", f"{in_bytes / 1e6:.1f}",
         f"{t_agg * 1e3:.1f}", gbps(in_bytes, t_agg),
         f"{t_agg / t_agg_clone:.2f}× clone, {t_agg / t_flat_mean:.2f}× flat fp64 mean"],
        ["  plain `clone()` of the same bytes", f"{in_bytes / 1e6:.1f}", f"{t_agg_clone * 1e3:.1f}",
         gbps(in_bytes, t_agg_clone), "1"],
        ["  plain `copy_` of the same bytes", f"{in_bytes / 1e6:.1f}", f"{t_agg_copy * 1e3:.1f}",
         gbps(in_bytes, t_agg_copy), "—"],
        ["  flat fp64 weighted mean of the same bytes (the previous arithmetic)", f"{in_bytes / 1e6:.1f}", f"{t_flat_mean * 1e3:.1f}",
         gbps(in_bytes, t_flat_mean), "—"],
    ]
    table = md_table(["operation", "MB", "median ms", "GB/s", "time ratio vs baseline"], rows)
    total = state_bytes(state)
    body = (
        "## Extraction and modular aggregation throughput\n\n"
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/system/throughput.py "
        f"--reps {args.reps} --clients {args.clients} --keep {args.keep} --threads {args.threads}` "
        f"(THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; operations interleaved, medians)\n\n"
        f"Model: `build_tiny(\"tiny-mixtral\", hidden_size=512, intermediate_size=1024, num_local_experts=16, "
        f"num_hidden_layers=4)` (MixtralForCausalLM, fused experts, {total / 1e6:.0f} MB fp32); "
        f"{args.keep} of 16 experts kept per layer (random). Machine: {machine()}; load average "
        f"{load0:.1f} → {load1:.1f} (shared machine: other jobs were running).\n\n"
        f"{table}\n\n"
        f"Ratios: extraction takes **{t_extract / t_clone:.2f}×** the time of a plain clone of the bytes it "
        f"produces; modular aggregation takes **{t_agg / t_agg_clone:.2f}×** a plain clone of the bytes it "
        f"reads and **{t_agg / t_flat_mean:.2f}×** the same float64 weighted mean on flat buffers.\n"
    )
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('throughput', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
