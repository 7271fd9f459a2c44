"""The client's local training loop. Reads top to bottom.

Loss (docs/algorithms.md §1.2 step 3): label-smoothed cross-entropy on the task target
+ ``a`` · load-balance loss over the experts the client holds (Switch-style
``E · Σ_j f_j · P_j`` per MoE layer, averaged over layers; a sub-MoE's routers only score
kept experts, so this is "over its kept experts" by construction).
Optimiser: AdamW, linear warm-up then linear decay, gradient clipping. CUDA + bf16
autocast when a GPU is used, float32 on CPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fedmoe.config import DataConfig, TrainConfig
from fedmoe.moe.families import MoEFamily
from fedmoe.train.batching import IGNORE, collate, iterate_batches, model_inputs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def forward_context(device: torch.device) -> ExitStack:
    """Autocast on CUDA, and ``parametrize.cached()``: peft's LoRA on fused expert tensors
    is a parametrization, which would otherwise recompute the whole ``[E, out, in]`` delta
    each time an expert loop indexes the tensor (E times per layer per forward)."""
    stack = ExitStack()
    stack.enter_context(autocast(device))
    stack.enter_context(parametrize.cached())
    return stack


def smoothed_ce(logits: torch.Tensor, target: torch.Tensor, eps: float, ignore: int = IGNORE) -> torch.Tensor:
    """Label-smoothed CE that tolerates −inf logits (padded sentence slots)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = target != ignore
    logp, target = logp[keep], target[keep]
    if target.numel() == 0:
        return logits.sum() * 0.0
    nll = -logp.gather(-1, target[:, None]).squeeze(-1)
    finite = torch.isfinite(logp)
    smooth = -(logp.masked_fill(~finite, 0.0).sum(-1) / finite.sum(-1).clamp_min(1))
    return ((1 - eps) * nll + eps * smooth).mean()


def task_loss(kind: str, out: Any, batch: dict[str, Any], eps: float) -> torch.Tensor:
    logits = out.logits
    if kind == "causal":
        labels = batch["labels"].to(logits.device)
        return smoothed_ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), eps)
    if kind == "seq2seq":
        labels = batch["labels"].to(logits.device)
        return smoothed_ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), eps)
    task = batch["task"]
    if task == "rc":
        mask = batch["attention_mask"].to(logits.device) == 0
        start = logits[..., 0].masked_fill(mask, float("-inf"))
        end = logits[..., 1].masked_fill(mask, float("-inf"))
        return 0.5 * (smoothed_ce(start, batch["start"].to(logits.device), eps)
                      + smoothed_ce(end, batch["end"].to(logits.device), eps))
    return smoothed_ce(logits, batch["labels"].to(logits.device), eps)


class LoadBalance:
    """Collects router outputs during a forward and returns the balance loss."""

    def __init__(self, model: nn.Module, family: MoEFamily) -> None:
        self.family = family
        self.terms: list[torch.Tensor] = []
        self.handles = []
        for info in family.blocks(model):
            router = family.router(model.get_submodule(info.path))
            self.handles.append(router.register_forward_hook(self._hook(info.top_k)))

    def _hook(self, top_k: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            choices, probs = self.family.route_choices(out, top_k)
            n = probs.shape[-1]
            frac = torch.bincount(choices.reshape(-1), minlength=n)[:n].float() / max(choices.numel(), 1)
            term = n * (frac.detach() * probs.mean(0)).sum()  # computed alike when recomputed (checkpointing
            if torch._C._current_graph_task_id() == -1:  # checks the saved tensors), kept only in a forward
                self.terms.append(term)

        return hook

    def pop(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        loss = torch.stack(self.terms).mean()
        self.terms = []
        return loss

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class LocalResult:
    loss: float
    steps: int
    num_examples: int
    lr: float = 0.0  #: peak learning rate (SCAFFOLD's η)


@dataclass
class LocalHooks:
    """Algorithm-specific additions to the local loop (FedProx, SCAFFOLD, …).

    ``extra_loss(named_params)`` is added to the loss (e.g. FedProx's proximal term);
    ``before_step(named_params)`` may edit gradients in place (e.g. SCAFFOLD's ``− c_k + c``).
    ``named_params`` maps trainable-state keys to the live parameters.
    ``after_step(step)`` runs after each optimiser step (the engine's client deadline check).
    """

    extra_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    before_step: Callable[[dict[str, torch.Tensor]], None] | None = None
    after_step: Callable[[int], None] | None = None


def local_train(
    model: nn.Module, family: MoEFamily, kind: str, task: Any, examples: list, tokenizer: Any,
    train_cfg: TrainConfig, data_cfg: DataConfig, device: torch.device, seed: int,
    hooks: LocalHooks | None = None,
) -> LocalResult:
    """Train ``model`` (its ``requires_grad`` tensors) on ``examples`` for the configured epochs."""
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    hooks = hooks or LocalHooks()
    named = {_strip(n): p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    per_epoch = math.ceil(len(examples) / train_cfg.batch_size)
    total = per_epoch * train_cfg.local_epochs
    if train_cfg.max_local_steps:
        total = min(total, train_cfg.max_local_steps)
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    warm = max(1, int(train_cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    balance = LoadBalance(model, family)
    if train_cfg.gradient_checkpointing is True:  # "auto" is resolved per client turn (engine/client.py)
        from fedmoe.moe.memory.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    step, running = 0, 0.0
    try:
        while step < total:
            for idx in iterate_batches(len(examples), train_cfg.batch_size, rng):
                if step >= total:
                    break
                batch = collate(kind, task, [examples[i] for i in idx], tokenizer,
                                data_cfg.max_seq_len, data_cfg.max_target_len)
                with forward_context(device):
                    out = model(**model_inputs(batch, kind, device))
                    loss = task_loss(kind, out, batch, train_cfg.label_smoothing)
                    aux = balance.pop()
                    if aux is not None and train_cfg.load_balance_coef:
                        loss = loss + train_cfg.load_balance_coef * aux
                    if hooks.extra_loss is not None:
                        loss = loss + hooks.extra_loss(named)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hooks.before_step is not None:
                    hooks.before_step(named)
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                opt.step()
                sched.step()
                running += float(loss.detach())
                step += 1
                if hooks.after_step is not None:
                    hooks.after_step(step)
    finally:
        balance.close()
    model.eval()
    return LocalResult(loss=running / max(step, 1), steps=step, num_examples=len(examples), lr=train_cfg.lr)


def _strip(name: str) -> str:
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def sequence_logprob(model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Sum of target-token log-probs per row (causal LM; used for rank classification)."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    logp = torch.log_softmax(logits, -1)
    keep = labels != IGNORE
    tok = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (tok * keep).sum(-1)


__all__ = ["F", "LocalHooks", "LocalResult", "autocast", "forward_context", "local_train", "pick_device", "seed_everything", "sequence_logprob"]
