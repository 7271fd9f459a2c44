"""Predicted (``fedmoe.moe.memory`` formula) vs measured peak memory of training steps.

For each case: build a tiny-family model from its real ``transformers`` config class at a
larger size, predict its training memory, and measure the peak of materialising it and
training it in a fresh process — CPU: VmHWM above the RSS before the model existed; CUDA
(when ``torch.cuda.is_available()``): ``max_memory_allocated`` above what was allocated before.

Two settings:

* **formula** — what :func:`estimate_for_model` describes: 2 steps (the second is the
  steady-state one), gradients kept between steps, fused AdamW, ``transformers``' own loss;
  on CPU measured twice, the second time with MKL's GEMM buffer cache off;
* **client loop** — what ``fedmoe.train.loop`` does: its label-smoothed cross-entropy,
  ``zero_grad(set_to_none=True)``, torch's default AdamW (for-loop on CPU, foreach on CUDA),
  against :func:`unit_training_bytes`, the table the engine's budgets use (an upper bound
  there: gradients are not live during the forward pass).

Prints a table and writes ``benchmarks/memory/results.md``::

    python benchmarks/memory/check_memory_model.py            # all cases, CPU (+ CUDA if present)
    python benchmarks/memory/check_memory_model.py --quick    # the two sizes of the acceptance test
    python benchmarks/memory/check_memory_model.py --device cuda --out /tmp/results.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.moe.memory import (
    SMOOTHED_CE_LOSS,
    estimate_for_model,
    make_batch,
    measure_in_subprocess,
    training_table,
)
from fedmoe.moe.models import build_tiny

HERE = Path(__file__).resolve().parent
MiB = 2**20
#: MKL keeps GEMM packing buffers cached after use (resident memory no tensor accounts for);
#: the second CPU measurement turns that cache off to show what the tensors themselves take
MKL_OFF = {"MKL_DISABLE_FAST_MM": "1"}

MIX_S = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=8192,
             num_attention_heads=8, num_key_value_heads=4, num_local_experts=8)
MIX_M = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, vocab_size=8192,
             num_attention_heads=8, num_key_value_heads=4, num_local_experts=8)
SWITCH = dict(d_model=256, d_kv=32, d_ff=512, num_heads=8, vocab_size=8192, num_experts=8)
BERT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=8192,
            num_attention_heads=8, num_experts=8, max_position_embeddings=256)


# -- losses (module level, so that the measuring process can unpickle them) ----------------------
def tc_loss(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Classification loss on BERT-MoE's ``tc`` head (it has no LM head and no ``out.loss``)."""
    logits = model(input_ids=data["input_ids"], task="tc").logits
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def loop_causal_loss(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """``fedmoe.train.loop.task_loss`` for causal LMs: smoothed CE on shifted logits. As in the
    loop, the labels go to the model too (``transformers`` computes its own loss alongside) and
    the output stays alive through backward."""
    from fedmoe.train.loop import smoothed_ce

    out = model(**data)
    logits, labels = out.logits, data["labels"]
    return smoothed_ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), 0.1), out


def loop_seq2seq_loss(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """``fedmoe.train.loop.task_loss`` for encoder-decoder LMs (output held through backward)."""
    from fedmoe.train.loop import smoothed_ce

    out = model(**data)
    return smoothed_ce(out.logits.reshape(-1, out.logits.shape[-1]), data["labels"].reshape(-1), 0.1), out


@dataclass
class Case:
    label: str
    name: str  #: tiny-<family>
    overrides: dict[str, Any]
    batch: int
    seq: int
    loop: bool = False  #: also measure the client-loop setting


def default_cases(quick: bool) -> list[Case]:
    cases = [
        Case("mixtral H256", "tiny-mixtral", MIX_S, 4, 128, loop=True),
        Case("mixtral H512", "tiny-mixtral", MIX_M, 4, 128, loop=True),
    ]
    if quick:
        return cases
    return cases + [
        Case("mixtral H256 L4, B8 S256", "tiny-mixtral", dict(MIX_S, num_hidden_layers=4), 8, 256),
        Case("mixtral H512 V32k", "tiny-mixtral", dict(MIX_M, vocab_size=32000), 2, 128, loop=True),
        Case("mixtral E16 top-4", "tiny-mixtral", dict(MIX_S, num_local_experts=16, num_experts_per_tok=4), 4, 128),
        Case("mixtral eager attention", "tiny-mixtral", dict(MIX_S, attn_implementation="eager"), 4, 128),
        Case("qwen2-moe (shared expert)", "tiny-qwen2-moe",
             dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, shared_expert_intermediate_size=512,
                  num_hidden_layers=2, vocab_size=8192, num_attention_heads=8, num_key_value_heads=4, num_experts=8),
             4, 128),
        Case("qwen3-moe (q/k norms)", "tiny-qwen3-moe",
             dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
                  vocab_size=8192, num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=8), 4, 128),
        Case("olmoe", "tiny-olmoe", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, vocab_size=8192,
                                         num_attention_heads=8, num_key_value_heads=8, num_experts=8), 4, 128),
        Case("deepseek-v3 (MLA, dense layer 0)", "tiny-deepseek-v3",
             dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3,
                  vocab_size=8192, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8, q_lora_rank=64,
                  kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32), 4, 128),
        Case("switch (enc-dec, eager), no dropout", "tiny-switch-transformers", dict(SWITCH, dropout_rate=0.0), 4, 128),
        Case("switch, dropout 0.1", "tiny-switch-transformers", dict(SWITCH, dropout_rate=0.1), 4, 128, loop=True),
        Case("bert-moe (tc head), dropout 0.1", "tiny-bert-moe", BERT, 8, 128),
    ]


def _loss_for(case: Case, loop: bool) -> Any:
    if case.name == "tiny-bert-moe":
        return tc_loss
    if not loop:
        return None
    return loop_seq2seq_loss if case.name == "tiny-switch-transformers" else loop_causal_loss


def run_case(case: Case, device: str, num_threads: int | None, mkl_off: bool, loop: bool) -> list[dict[str, Any]]:
    factory = partial(build_tiny, case.name, **case.overrides)
    model = factory()
    batch = make_batch(model, case.batch, case.seq)
    common = dict(model_factory=factory, batch=batch, lora_r=8, device=device, warmup=partial(build_tiny, case.name))
    fts = ("full", "lora")
    rows = []
    jobs = [dict(common, finetune=ft, loss_fn=_loss_for(case, False)) for ft in fts]
    t0 = time.time()
    measured = measure_in_subprocess(jobs, num_threads=num_threads)
    plain = measure_in_subprocess(jobs, num_threads=num_threads, env=MKL_OFF) if mkl_off else [None] * len(jobs)
    for ft, m, p in zip(fts, measured, plain, strict=True):
        predicted = estimate_for_model(model, case.batch, case.seq, ft, 8)
        rows.append(dict(setting="formula", case=case.label, device=device, finetune=ft, batch=case.batch, seq=case.seq,
                         weights=m.weight_bytes, trainable=m.trainable_bytes, predicted=predicted, measured=m.peak_bytes,
                         measured_nomkl=p.peak_bytes if p else None))
    if loop and case.loop:
        impl = "foreach" if device == "cuda" else "for-loop"
        jobs = [dict(common, finetune=ft, loss_fn=_loss_for(case, True), set_to_none=True, adam_impl=impl) for ft in fts]
        for ft, m in zip(fts, measure_in_subprocess(jobs, num_threads=num_threads), strict=True):
            predicted = training_table(model, case.batch, case.seq, ft, 8, factors=SMOOTHED_CE_LOSS,
                                       adam_impl=impl).total()
            rows.append(dict(setting="client loop", case=case.label, device=device, finetune=ft, batch=case.batch,
                             seq=case.seq, weights=m.weight_bytes, trainable=m.trainable_bytes, predicted=predicted,
                             measured=m.peak_bytes, measured_nomkl=None))
    secs = time.time() - t0
    for r in rows:
        r["ratio"] = r["predicted"] / r["measured"] if r["measured"] else float("nan")
        r["ratio_nomkl"] = r["predicted"] / r["measured_nomkl"] if r["measured_nomkl"] else None
        extra = (f"  (MKL cache off: {r['measured_nomkl'] / MiB:7.1f} MiB, ratio {r['ratio_nomkl']:.3f})"
                 if r["measured_nomkl"] else "")
        print(f"{r['setting']:<11} {r['case']:<36} {device:<4} {r['finetune']:<4} B={r['batch']:<2} S={r['seq']:<4} "
              f"W={r['weights'] / MiB:6.1f} MiB  predicted={r['predicted'] / MiB:7.1f} MiB  "
              f"measured={r['measured'] / MiB:7.1f} MiB  ratio={r['ratio']:.3f}{extra}", flush=True)
    print(f"  ({secs:.0f} s)", flush=True)
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Training-memory model: predicted vs measured",
        "",
        "Generated by `benchmarks/memory/check_memory_model.py` "
        f"(torch {torch.__version__}, {platform.machine()}, Python {platform.python_version()}).",
        "Ratio = predicted / measured. LoRA: r = 8 on attention and experts, router trained.",
        "",
        "* **formula**: `estimate_for_model` vs the peak of building the model and running 2 training",
        "  steps (gradients kept between steps, fused AdamW, the model's own loss) in a fresh process,",
        "  above the memory in use before the model existed — CPU: VmHWM − VmRSS (resident memory, with",
        "  allocator overheads); CUDA: `max_memory_allocated` − `memory_allocated` before. On CPU it is",
        "  measured again with `MKL_DISABLE_FAST_MM=1`: MKL otherwise keeps its GEMM packing buffers",
        "  cached (resident memory no tensor accounts for), which the formula does not model.",
        "* **client loop**: `training_table(..., factors=SMOOTHED_CE_LOSS, adam_impl=<torch default>)` —",
        "  what `unit_training_bytes` gives the engine's budgets — vs the same measurement with",
        "  `fedmoe.train.loop`'s label-smoothed loss, `zero_grad(set_to_none=True)` and torch's default",
        "  AdamW. The formula counts gradients as live during the forward pass, so it is an upper bound",
        "  here, by up to the gradient bytes (large under full fine-tuning, tiny under LoRA).",
        "",
        "| setting | case | device | fine-tune | B | S | weights MiB | trained MiB | predicted MiB "
        "| measured MiB | ratio | measured, MKL cache off | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nomkl = f"{r['measured_nomkl'] / MiB:.1f} | {r['ratio_nomkl']:.3f}" if r.get("measured_nomkl") else "– | –"
        lines.append(
            f"| {r['setting']} | {r['case']} | {r['device']} | {r['finetune']} | {r['batch']} | {r['seq']} | "
            f"{r['weights'] / MiB:.1f} | {r['trainable'] / MiB:.1f} | {r['predicted'] / MiB:.1f} | "
            f"{r['measured'] / MiB:.1f} | {r['ratio']:.3f} | {nomkl} |"
        )
    lines.append("")
    for setting in ("formula", "client loop"):
        for dev in sorted({r["device"] for r in rows}):
            sel = [r for r in rows if r["setting"] == setting and r["device"] == dev]
            if not sel:
                continue
            ratios = [r["ratio"] for r in sel]
            line = f"* {setting}, {dev}: ratio {min(ratios):.3f} – {max(ratios):.3f} over {len(ratios)} measurements"
            plain = [r["ratio_nomkl"] for r in sel if r.get("ratio_nomkl")]
            if plain:
                line += f"; with MKL's cache off {min(plain):.3f} – {max(plain):.3f}"
            lines.append(line + ".")
    if not any(r["device"] == "cuda" for r in rows):
        lines += ["", "No CUDA device was available for this run; `--device cuda` measures the CUDA path."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the two Mixtral sizes of the acceptance test")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, and CUDA when available")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the measuring process")
    ap.add_argument("--only", default="", help="substring filter on case labels")
    ap.add_argument("--no-mkl-off", action="store_true", help="skip the CPU re-measurement with MKL's cache off")
    ap.add_argument("--no-loop", action="store_true", help="skip the client-loop setting")
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    args = ap.parse_args(argv)
    cases = [c for c in default_cases(args.quick) if args.only in c.label]
    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append("cuda")
    rows: list[dict[str, Any]] = []
    for dev in devices:
        for case in cases:
            rows += run_case(case, dev, args.threads, mkl_off=dev == "cpu" and not args.no_mkl_off,
                             loop=not args.no_loop)
    write_markdown(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
