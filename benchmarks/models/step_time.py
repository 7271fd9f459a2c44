"""Time one full fine-tuning step (forward + backward + AdamW) of a pretrained preset on CPU.

Usage (the numbers in docs/models.md were made with these commands)::

    python benchmarks/models/step_time.py --preset minilm-moe-8e --batch 16 --seq 96 --steps 5 --threads 1
    python benchmarks/models/step_time.py --preset smollm2-moe-8e --batch 2 --seq 64 --steps 3 --threads 1
    python benchmarks/models/step_time.py --preset minilm-moe-8e ... --dense   # dense baseline

Inputs are random token ids (full attention mask, seeded); ``minilm-*`` trains the ``tc``
head with cross-entropy, ``smollm2-*`` the causal-LM loss. The first step (which also
allocates the AdamW state) is reported separately; ``step_s`` is the median of the next
``--steps`` steps (``step_s_min``: their minimum; the 1-minute load average before and
after is printed, since other jobs on a shared machine inflate times; ``step_cpu_s`` is
the median process CPU time of those steps, summed over threads). Peak memory is
the process's peak RSS (``VmHWM``) during the steps, after resetting it once the model
is built (``/proc/self/clear_refs``), so loading and upcycling peaks are not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fedmoe.moe import presets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DenseTC, random_batch  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build(preset: str, dense: bool) -> nn.Module:
    base = preset.split("-")[0]
    if dense:
        model, _ = presets.minilm_dense() if base == "minilm" else presets.smollm2_dense()
        return DenseTC(model) if base == "minilm" else model
    built = presets.build_pretrained_preset(preset)
    if built is None:
        raise SystemExit(f"unknown preset {preset}; try one of {presets.preset_names()}")
    return built[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="minilm-moe-8e")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dense", action="store_true", help="time the dense checkpoint instead")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = build(args.preset, args.dense)
    build_s = time.perf_counter() - t0
    model.train()
    params = sum(p.numel() for p in model.parameters())
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    is_lm = args.preset.startswith("smollm2")
    vocab = model.config.vocab_size if hasattr(model, "config") else model.bert.config.vocab_size
    data = random_batch(vocab, args.batch, args.seq)
    ids, mask, labels = data["input_ids"], data["attention_mask"], data["labels"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    cpu_times: list[float] = []

    def step() -> float:
        t, c = time.perf_counter(), time.process_time()
        if is_lm:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        else:
            out = model(input_ids=ids, attention_mask=mask)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu_times.append(time.process_time() - c)
        return time.perf_counter() - t

    gc.collect()
    load0 = os.getloadavg()[0]
    rss_before = _status_kb("VmRSS")
    peak_reset = _reset_peak()
    first = step()
    times = [step() for _ in range(args.steps)]
    peak = _status_kb("VmHWM")
    result = {
        "preset": args.preset + (" (dense)" if args.dense else ""),
        "params": params,
        "bytes_fp32": fp32_bytes,
        "batch": args.batch,
        "seq": args.seq,
        "first_step_s": round(first, 3),
        "step_s": round(statistics.median(times), 3),
        "step_s_min": round(min(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "step_cpu_s": round(statistics.median(cpu_times[1:]), 3),
        "rss_before_steps_gib": round(rss_before / 2**20, 2),
        "peak_rss_gib": round(peak / 2**20, 2),
        "peak_reset": peak_reset,
        "build_s": round(build_s, 1),
        "threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpu": _cpu(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
