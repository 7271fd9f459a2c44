"""The training-memory formula on a concrete model: LoRA targets, the additive per-unit table
(dense part + one row per expert), whole-model estimates and breakdowns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.moe.families import MoEFamily, family_of
from fedmoe.moe.memory.formula import TrainingMemoryModel, memory_model_for
from fedmoe.moe.memory.shapes import SMOOTHED_CE_LOSS
from fedmoe.moe.memory.units import (
    Finetune,
    MemoryTable,
    _check_unwrapped,
    _table,
    _unit_elements,
)


def _attention_regex(family: MoEFamily) -> re.Pattern[str]:
    """The attention projections LoRA adapts (as :func:`fedmoe.moe.lora.lora_config`)."""
    attn = "|".join(re.escape(n) for n in family.attention_modules)
    return re.compile(rf".*\.({attn})$")


def _lora_targets(model: nn.Module, family: MoEFamily) -> tuple[int, int, dict[tuple[int, int], tuple[int, int]]]:
    """(attention adapter elements per unit rank, adapted attention linears,
    {(i, j): (expert adapter elements per unit rank, bytes of its merged weights)}).

    Mirrors :func:`fedmoe.moe.lora.lora_config`: LoRA on the family's attention projections and
    on every expert matrix (3-D fused tensors, merged per forward; or ``wi``/``wo`` of per-module
    experts, ordinary LoRA).
    """
    attn_re = _attention_regex(family)
    attn_elems = attn_count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and attn_re.fullmatch(name) and ".experts." not in name:
            attn_elems += mod.in_features + mod.out_features
            attn_count += 1
    expert: dict[tuple[int, int], tuple[int, int]] = {}
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        for j in range(info.num_experts):
            if family.fused:
                n = merged = 0
                for tname in family.fused_expert_tensors:
                    t = getattr(block.experts, tname)
                    if t.dim() == 3:  # unmerged expert LoRA (fedmoe.moe.expert_lora): no merged weight
                        n += t.shape[1] + t.shape[2]
            else:
                sub = block.experts.get_submodule(family.per_expert_module.format(j=j))
                n = sum(m.in_features + m.out_features for nm, m in sub.named_modules()
                        if isinstance(m, nn.Linear) and nm.rsplit(".", 1)[-1] in ("wi", "wo"))
                merged = 0
            expert[(info.index, j)] = (n, merged)
    return attn_elems, attn_count, expert


def _is_head(name: str) -> bool:
    from fedmoe.moe.lora import HEAD_PATTERNS

    return any(f"{h}." in name or name.startswith(h) for h in HEAD_PATTERNS)



@dataclass
class _UnitCosts:
    """Training bytes of one unit (the dense part or one expert) by component."""

    weights: float = 0.0  #: frozen + trained weights
    trained: float = 0.0  #: gradients + optimiser state of trained weights
    adapters: float = 0.0  #: LoRA adapter weights + gradients + optimiser state
    activations: float = 0.0

    def total(self) -> int:
        return int(round(self.weights + self.trained + self.adapters + self.activations))


def _unit_costs(
    model: nn.Module, family: MoEFamily, mm: TrainingMemoryModel
) -> tuple[_UnitCosts, list[list[_UnitCosts]], dict[str, float], int]:
    """(dense part, per-expert costs, dense activation terms, trained elements)."""
    tensors, owned = _unit_elements(model, family)
    params = {id(p) for p in model.parameters()}
    blocks = family.blocks(model)
    moe_tokens = mm.moe_layer_tokens()
    if len(moe_tokens) != len(blocks):  # layer specs could not be matched to the blocks
        moe_tokens = [mm.tokens()] * len(blocks)
    owned_by_key: dict[str, int] = {}
    for layer in owned:
        for c in layer:
            for k, n in c.items():
                owned_by_key[k] = owned_by_key.get(k, 0) + n
    router_keys = {s.key for info in blocks for s in family.router_slices(info.path, model.get_submodule(info.path), 0)}
    lora = mm.finetune == "lora"

    def trained(key: str, t: torch.Tensor) -> bool:
        return id(t) in params and (not lora or key in router_keys or _is_head(key))

    dense = _UnitCosts()
    d_bytes = d_elems = 0.0
    for key, t in tensors.items():
        n = t.numel() - owned_by_key.get(key, 0)
        dense.weights += n * t.element_size()
        if trained(key, t):
            d_bytes += n * t.element_size()
            d_elems += n
    dense.trained = mm.trained_cost(d_bytes, d_elems)
    trained_elems = d_elems

    attn_elems, attn_count, expert_lora = _lora_targets(model, family) if lora else (0, 0, {})
    if lora:
        dense.adapters = mm.adapter_cost(mm.lora_r * attn_elems)
        trained_elems += mm.lora_r * attn_elems
    per_layer_attn = attn_count / max(1, len(mm.shape.layers)) if lora else 0.0
    per_module_lora = 2.0  # LoRA on the two expert matrices (wi/wo, or fused, computed unmerged)
    terms = mm.activation_terms(per_layer_attn, per_module_lora)
    dense.activations = sum(terms.values())

    experts: list[list[_UnitCosts]] = []
    for info, layer in zip(blocks, owned, strict=True):
        row = []
        for j, c in enumerate(layer):
            u = _UnitCosts()
            e_bytes = e_elems = 0.0
            for key, n in c.items():
                t = tensors[key]
                u.weights += n * t.element_size()
                if trained(key, t):
                    e_bytes += n * t.element_size()
                    e_elems += n
            u.trained = mm.trained_cost(e_bytes, e_elems)
            trained_elems += e_elems
            n_adapter, merged = expert_lora.get((info.index, j), (0, 0))
            if lora:
                u.adapters = mm.adapter_cost(mm.lora_r * n_adapter)
                trained_elems += mm.lora_r * n_adapter
            u.activations = mm.expert_activation_bytes(moe_tokens[info.index], merged)
            row.append(u)
        experts.append(row)
    return dense, experts, terms, int(trained_elems)


def training_table(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    memory_model: TrainingMemoryModel | None = None,
    **kwargs: Any,
) -> MemoryTable:
    """Training bytes of a (sub-)MoE split additively: dense part + each expert ``[L, E]``.

    ``table.submodel_bytes(kept)`` is the training memory of the submodel keeping ``kept``
    (module docstring: what each part holds); ``table.total()`` is :func:`estimate_for_model`.
    ``kwargs`` go to :class:`TrainingMemoryModel` (``adam_impl``, ``state_bytes``,
    ``adapter_bytes``, ``target_len``, ``factors`` …).
    """
    _check_unwrapped(model)
    family = family or family_of(model)
    mm = memory_model or memory_model_for(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    dense, experts, _, _ = _unit_costs(model, family, mm)
    return _table(dense.total(), [[u.total() for u in row] for row in experts])


def estimate_for_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    **kwargs: Any,
) -> int:
    """Training bytes of one steady-state step of ``model`` (a full MoE or an extracted sub-MoE)."""
    return training_table(model, batch_size, seq_len, finetune, lora_r, family, **kwargs).total()


def unit_training_bytes(
    model: nn.Module,
    family: MoEFamily | None = None,
    *,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    **kwargs: Any,
) -> tuple[float, np.ndarray]:
    """``(dense bytes, expert bytes [L, E])`` of :func:`training_table`, for ``fedmoe.engine.budget``.

    Defaults follow the project's client loop (``fedmoe.train.loop``): its label-smoothed loss
    (:data:`SMOOTHED_CE_LOSS`) and torch's default AdamW — ``foreach`` (one temporary as large
    as the trained tensors) when CUDA is available, the for-loop one otherwise.
    """
    kwargs.setdefault("factors", SMOOTHED_CE_LOSS)
    kwargs.setdefault("adam_impl", "foreach" if torch.cuda.is_available() else "for-loop")
    table = training_table(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    return float(table.dense_bytes), table.expert_bytes.astype(np.float64)


def side_expert_training_bytes(model: nn.Module, family: MoEFamily | None = None, **kwargs: Any) -> np.ndarray:
    """Per MoE layer: the weights, gradient and optimiser state of one side expert trained in full
    beside the block, with its gate (FLEx, :mod:`fedmoe.moe.graft`: a copy of expert e* and an
    ``H → 1`` linear), priced as the layer's largest expert (e* is chosen on the client).

    Activations are left out on purpose: the side expert keeps activations for every token, while
    the frozen routed experts of a FLEx client (no adapters) keep fewer than the LoRA-adapted ones
    the dense part is priced with — the two nearly cancel (measured, docs/memory.md "FLEx").
    ``kwargs`` go to :class:`TrainingMemoryModel` (default AdamW as :func:`unit_training_bytes`)."""
    _check_unwrapped(model)
    family = family or family_of(model)
    kwargs.setdefault("adam_impl", "foreach" if torch.cuda.is_available() else "for-loop")
    mm = memory_model_for(model, 1, 1, "full", 8, family, **kwargs)
    state = model.state_dict()
    blocks = family.blocks(model)
    out = np.zeros(len(blocks))
    for i, info in enumerate(blocks):
        block = model.get_submodule(info.path)
        hidden = mm.shape.hidden
        for j in range(info.num_experts):
            parts = [sl.read(state) for sl in family.expert_slices(info.path, block, j)]
            elements = sum(t.numel() for t in parts) + hidden + 1
            size = sum(t.numel() * t.element_size() for t in parts) + (hidden + 1) * parts[0].element_size()
            out[i] = max(out[i], size + mm.trained_cost(size, elements))
    return out


def memory_breakdown(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """The estimate by component, whole model: ``weights``, ``trained`` (gradients + optimiser
    state of trained weights), ``adapters`` (LoRA weights + gradients + state), ``activations``
    (and each dense activation term as ``act_<term>``, plus ``act_router`` and ``act_lora_merge``
    summed over experts), ``trained_elements`` and ``total`` (= :func:`estimate_for_model`)."""
    _check_unwrapped(model)
    family = family or family_of(model)
    mm = memory_model_for(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    dense, experts, terms, trained_elements = _unit_costs(model, family, mm)
    units = [dense] + [u for row in experts for u in row]
    out = {k: int(round(sum(getattr(u, k) for u in units))) for k in ("weights", "trained", "adapters", "activations")}
    out.update({f"act_{k}": int(round(v)) for k, v in terms.items()})
    tokens = mm.moe_layer_tokens()
    if len(tokens) != len(experts):
        tokens = [mm.tokens()] * len(experts)
    out["act_router"] = int(round(sum(4 * mm.factors.router * tokens[i] * len(row) for i, row in enumerate(experts))))
    out["act_lora_merge"] = out["activations"] - int(round(dense.activations)) - out["act_router"]
    out["trained_elements"] = trained_elements
    out["total"] = sum(u.total() for u in units)
    return out
