"""Gradient checkpointing: memory model vs measured peak, and the step-time cost.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/gradient_checkpointing.py [--quick]

For each case, training steps are measured in fresh processes (CPU VmHWM, or the CUDA
allocator peak) with checkpointing off and on, next to the formula's prediction
(``training_table(...).total()`` minus :func:`~fedmoe.moe.memory.checkpointing.checkpointing_saving`
with it on). Step time: the same model trained for a few steps with checkpointing off and on,
interleaved in one process. Results: ``gradient_checkpointing.md`` beside this file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from fedmoe.moe.memory import SMOOTHED_CE_LOSS, make_batch, measure_in_subprocess, training_table
from fedmoe.moe.memory.checkpointing import (
    build_checkpointed,
    checkpointing_saving,
    enable_gradient_checkpointing,
)
from fedmoe.moe.models import build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_memory_model import MIX_S, loop_causal_loss  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 2**20
CASES = [  # label, tiny family, config overrides, batch, seq
    ("mixtral H256 L4, B8 S256", "tiny-mixtral", dict(MIX_S, num_hidden_layers=4), 8, 256),
    ("mixtral H256 L8, B8 S256", "tiny-mixtral", dict(MIX_S, num_hidden_layers=8), 8, 256),
]


def memory_rows(quick: bool) -> list[dict]:
    rows = []
    for label, name, over, b, s in CASES[:1] if quick else CASES:
        model = build_tiny(name, **over)
        batch = make_batch(model, b, s)
        for ft in ("lora", "full"):
            common = dict(batch=batch, finetune=ft, lora_r=8, loss_fn=loop_causal_loss, set_to_none=True,
                          adam_impl="for-loop", warmup=partial(build_tiny, name))
            jobs = [dict(common, model_factory=partial(build_tiny, name, **over)),
                    dict(common, model_factory=partial(build_checkpointed, name, **over))]
            off, on = measure_in_subprocess(jobs, num_threads=1)
            base = training_table(model, b, s, ft, 8, factors=SMOOTHED_CE_LOSS, adam_impl="for-loop").total()
            d_saving, e_saving = checkpointing_saving(model, b, s, ft, 8, factors=SMOOTHED_CE_LOSS, adam_impl="for-loop")
            saving = d_saving + float(e_saving.sum())
            row = dict(case=label, finetune=ft, predicted_off=base, measured_off=off.peak_bytes,
                       predicted_on=base - saving, measured_on=on.peak_bytes)
            rows.append(row)
            print(f"{label:<26} {ft:<4} off: pred {base / MiB:7.1f} meas {off.peak_bytes / MiB:7.1f} "
                  f"({base / off.peak_bytes:.3f})  on: pred {(base - saving) / MiB:7.1f} meas {on.peak_bytes / MiB:7.1f} "
                  f"({(base - saving) / on.peak_bytes:.3f})", flush=True)
    return rows


def step_times(repeats: int) -> list[dict]:
    """Median step time (forward, loss, backward, AdamW step) with checkpointing off and on, both
    models in this process, the two steps interleaved in every repeat (the first is warm-up)."""
    from fedmoe.moe.lora import apply_lora

    torch.set_num_threads(1)
    label, name, over, b, s = CASES[0]
    out = []
    for ft in ("lora", "full"):
        models = {}
        for ck in (False, True):
            torch.manual_seed(0)
            m = build_tiny(name, **over)
            if ck:
                enable_gradient_checkpointing(m)
            m = apply_lora(m, 8, 16) if ft == "lora" else m
            m.train()
            models[ck] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4))
        data = make_batch(models[False][0], b, s)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats + 1):
            for ck in (False, True):
                m, opt = models[ck]
                t0 = time.perf_counter()
                loss, _ = loop_causal_loss(m, data)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times[ck].append(time.perf_counter() - t0)
        off, on = statistics.median(times[False][1:]), statistics.median(times[True][1:])
        pairs = statistics.median(b / a for a, b in zip(times[False][1:], times[True][1:], strict=True))
        mins = min(times[True][1:]) / min(times[False][1:])
        out.append(dict(case=label, finetune=ft, step_off=off, step_on=on, cost_pairs=pairs, cost_mins=mins))
        print(f"step time {label} {ft}: off {off * 1000:.0f} ms, on {on * 1000:.0f} ms, ×{pairs:.2f} (pairs), "
              f"×{mins:.2f} (minima)", flush=True)
        del models
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    load0 = Path("/proc/loadavg").read_text().split()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = memory_rows(args.quick)
    times = step_times(args.repeats)
    load1 = Path("/proc/loadavg").read_text().split()[0]
    lines = ["# Gradient checkpointing: predicted vs measured peak, step time", "",
             f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory/gradient_checkpointing.py"
             f"{' --quick' if args.quick else ''}` (1 thread, CPU VmHWM, client-loop loss, for-loop AdamW, "
             "set_to_none=True)", "",
             "| case | finetune | predicted off | measured off | ratio | predicted on | measured on | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['finetune']} | {r['predicted_off'] / MiB:.1f} MiB | {r['measured_off'] / MiB:.1f} MiB "
                     f"| {r['predicted_off'] / r['measured_off']:.3f} | {r['predicted_on'] / MiB:.1f} MiB "
                     f"| {r['measured_on'] / MiB:.1f} MiB | {r['predicted_on'] / r['measured_on']:.3f} |")
    lines += ["", "| case | finetune | step off (median) | step on (median) | cost: median of pairs | cost: minima |",
              "|---|---|---|---|---|---|"]
    for t in times:
        lines.append(f"| {t['case']} | {t['finetune']} | {t['step_off'] * 1000:.0f} ms | {t['step_on'] * 1000:.0f} ms "
                     f"| ×{t['cost_pairs']:.2f} | ×{t['cost_mins']:.2f} |")
    lines += ["", f"Started {started}; 1-minute load average {load0} at the start, {load1} at the end "
              f"(2 vCPUs, shared). Step times: {args.repeats} interleaved repeats (off, on) after one warm-up, "
              "torch 1 thread; cost = on/off of each repeat's adjacent pair (median), and of the fastest steps; "
              "peaks: VmHWM of a fresh process per measurement."]
    (HERE / "gradient_checkpointing.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
