"""LoRA on (sub-)MoEs with ``peft``, and the trainable-tensor layout that travels.

What is trained (docs/algorithms.md §1.3, what is trained and what travels): LoRA adapters on
every kept expert and on attention, plus the router rows of the kept experts and any task
heads; the pretrained base weights stay frozen.

* fused experts (``[E, out, in]`` 3-D parameters): ``peft``'s ``target_parameters``
  (``ParamWrapper``). Its factors hold all experts: ``lora_A`` is ``[r·E, in]`` with expert
  e in rows ``e·r … e·r+r−1``; ``lora_B`` is ``[out, r·E]`` with expert e in columns
  ``e, e+E, …, e+(r−1)·E`` (peft reshapes B as ``(out, r, E)``). Expert slices of the
  adapters are described with those indices, so sub-MoE adapters extract/merge exactly.
  The experts' forward applies these adapters unmerged (:mod:`fedmoe.moe.expert_lora`).
* per-module experts (SwitchTransformers): ordinary LoRA on each expert's ``wi``/``wo``.

Keys of the trainable state drop peft's ``base_model.model.`` prefix, so the server's
global adapters (a peft model over the full MoE) and a client's (over its sub-MoE) name
the same tensors alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedmoe.core.layout import TensorSlice, UnitLayout
from fedmoe.moe.expert_lora import use_unmerged_expert_lora
from fedmoe.moe.families import MoEFamily, family_of
from fedmoe.moe.slicing import ExpertMap

PEFT_PREFIX = "base_model.model."
#: dense trainable modules that are not LoRA'd but trained in full (task heads)
HEAD_PATTERNS = ("tc_head", "rc_head", "ts_head", "classifier", "qa_outputs")


@dataclass(frozen=True)
class LoraSpec:
    """A run's LoRA hyper-parameters, as one value (``train.lora_r``, ``train.lora_alpha``,
    ``train.lora_dropout``). Which modules get adapters is the wrapper's business
    (:func:`apply_lora`: experts + attention; FLEx: attention only)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0

    @classmethod
    def of(cls, train: Any) -> LoraSpec:
        """The spec of a :class:`fedmoe.config.TrainConfig`."""
        return cls(train.lora_r, train.lora_alpha, train.lora_dropout)


def lora_config(family: MoEFamily, model: nn.Module, r: int, alpha: int, dropout: float = 0.0) -> LoraConfig:
    attn = "|".join(re.escape(n) for n in family.attention_modules)
    if family.fused:
        target_modules = rf".*\.({attn})$"
        target_parameters = [f"experts.{n}" for n in family.fused_expert_tensors if _is_matrix(model, family, n)]
    else:
        expert_linears = "wi|wo"
        target_modules = rf"(.*\.({attn})$)|(.*\.experts\.expert_\d+\.({expert_linears})$)"
        target_parameters = None
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        target_parameters=target_parameters, bias="none",
    )


def _is_matrix(model: nn.Module, family: MoEFamily, name: str) -> bool:
    block = model.get_submodule(family.blocks(model)[0].path)
    return getattr(block.experts, name).dim() == 3


def apply_lora(
    model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, family: MoEFamily | None = None,
    unmerged_experts: bool = True,
):
    """Wrap ``model`` with LoRA; make router weights (rows of kept experts) and task heads trainable.

    ``unmerged_experts``: compute fused-expert LoRA on the activations
    (:mod:`fedmoe.moe.expert_lora`) instead of through peft's merged weight; same tensors.
    """
    family = family or family_of(model)
    pm = get_peft_model(model, lora_config(family, model, r, alpha, dropout))
    if unmerged_experts and family.fused:
        use_unmerged_expert_lora(pm)
    base = pm.base_model.model
    for info in family.blocks(base):
        router = family.router(base.get_submodule(info.path))
        for name in family.router_tensors:
            t = getattr(router, name, None)
            if isinstance(t, nn.Parameter):
                t.requires_grad_(True)
    for name, p in base.named_parameters():
        if any(f"{h}." in name or name.startswith(h) for h in HEAD_PATTERNS):
            p.requires_grad_(True)
    return pm


def trainable_state(pm: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a peft model, keys without peft's prefix (detached views)."""
    return {_strip(n): p.detach() for n, p in pm.named_parameters() if p.requires_grad}


def load_trainable_state(pm: nn.Module, state: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into the trainable tensors; keys containing any of ``allow_missing`` may be absent."""
    params = {_strip(n): p for n, p in pm.named_parameters() if p.requires_grad}
    missing = {k for k in set(params) - set(state) if not any(a in k for a in allow_missing)}
    if missing:
        raise KeyError(f"trainable tensors missing from the state: {sorted(missing)[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if k in state:
                p.copy_(state[k])


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def lora_layout(pm: nn.Module, family: MoEFamily | None = None, expert_map: ExpertMap | None = None) -> UnitLayout:
    """Unit layout of the *trainable* state of a peft-wrapped (sub-)MoE.

    Expert units: that expert's LoRA factors (rank blocks of fused factors, or the
    adapters of its own modules). Router units: its router rows. Dense: the rest
    (attention adapters, heads).
    """
    base = pm.base_model.model
    family = family or family_of(base)
    state = trainable_state(pm)
    layout = UnitLayout()
    covered: set[str] = set()
    for info in family.blocks(base):
        block = base.get_submodule(info.path)
        n = info.num_experts
        for j in range(n):
            g = expert_map.local_to_global(info.index, j) if expert_map else j
            slices: list[TensorSlice] = []
            if family.fused:
                prefix = f"{info.path}.experts."
                for key, t in state.items():
                    if not key.startswith(prefix) or "lora_" not in key:
                        continue
                    if "lora_A" in key:
                        r = t.shape[0] // n
                        slices.append(TensorSlice(key, 0, tuple(range(j * r, (j + 1) * r))))
                    elif "lora_B" in key:
                        r = t.shape[1] // n
                        slices.append(TensorSlice(key, 1, tuple(j + n * k for k in range(r))))
            else:
                pre = f"{info.path}.experts.{family.per_expert_module.format(j=j)}."
                slices = [TensorSlice(k) for k in state if k.startswith(pre)]
            routers = [s for s in family.router_slices(info.path, block, j) if s.key in state]
            layout.experts[(info.index, g)] = slices
            layout.routers[(info.index, g)] = routers
            covered.update(s.key for s in slices + routers)
    layout.dense_keys = [k for k in state if k not in covered]
    return layout


def adapter_tensors_of(pm: nn.Module, experts: list[tuple[int, int]], expert_map: ExpertMap | None = None) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Only the adapter tensors of the given (layer, global expert) units."""
    layout = lora_layout(pm, expert_map=expert_map)
    state = trainable_state(pm)
    return {u: [s.read(state) for s in layout.experts[u]] for u in experts}
