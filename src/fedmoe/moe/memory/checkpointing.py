"""Gradient checkpointing in the memory model (``train.gradient_checkpointing``).

With ``transformers``' gradient checkpointing (non-reentrant ``torch.utils.checkpoint`` around
every decoder/encoder layer) a layer keeps only its input for backward — ``a·H`` bytes per
token — and recomputes its activations during backward, one layer at a time. The activations
of the dense part (:meth:`~fedmoe.moe.memory.formula.TrainingMemoryModel.activation_terms`)
then become::

    A_ckpt = Σ_layers N·a·H + max(A_outside + W_loss,  logits + max_layer (A_layer + W_layer))

the peak being either at the loss (no layer recomputed yet) or inside one layer's recomputed
backward. ``A_outside``: what lives outside the layers (logits, loss, final norm, embedding
dropout); ``W_loss``: the backward working set of the whole model; ``A_layer`` / ``W_layer``:
one layer's kept terms and its own backward working set, as without checkpointing.
:func:`checkpointing_saving` gives ``A - A_ckpt`` (the bytes to take off the dense part of
the additive table) and, under LoRA on fused experts, each expert's merged weight, which
leaves the expert units (it only exists while its layer is recomputed). With
``zero_grad(set_to_none=True)`` (the client loop) the gradients ``G`` do not exist at the loss,
so the checkpointed peak is ``max(at the loss, G + inside one layer)`` rather than ``G +`` either
(:func:`checkpointing_saving`). Measured against real steps in
``benchmarks/memory/gradient_checkpointing.py`` (``gradient_checkpointing.md`` there).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from fedmoe.moe.families import MoEFamily, family_of


def checkpointed_activation_terms(mm: Any, lora_attn_linears: float = 0.0, lora_expert_linears: float = 0.0,
                                  layer_extra: list[float] | None = None) -> dict[str, float]:
    """``{"without": A, "with": A_ckpt}`` of the dense part for memory model ``mm``;
    ``layer_extra[i]``: bytes of layer i that exist only while it is recomputed (merged LoRA
    expert weights), added to that layer's term."""
    def terms(layers: list, vocab: int | None = None) -> dict[str, float]:
        shape = replace(mm.shape, layers=layers) if vocab is None else replace(mm.shape, layers=layers, vocab=vocab)
        return replace(mm, shape=shape).activation_terms(lora_attn_linears, lora_expert_linears)

    layers = list(mm.shape.layers)
    full = terms(layers)
    ws = full.pop("working_set")
    outside = terms([])
    outside.pop("working_set")
    bare = terms([], 0)
    bare.pop("working_set")
    per_layer = []  # one layer's kept terms + its own backward working set (no loss gradients)
    moe_index = 0
    for spec in layers:
        one = terms([spec], 0)
        one_ws = one.pop("working_set")
        extra = 0.0
        if spec.moe and layer_extra:
            extra = layer_extra[min(moe_index, len(layer_extra) - 1)]
            moe_index += 1
        per_layer.append(sum(one.values()) - sum(bare.values()) + one_ws + extra)
    inputs = sum(mm.tokens(s.stack) * mm.act_bytes * mm.shape.hidden for s in layers)
    # peak: at the loss (no layer recomputed yet), or inside one layer's recomputed backward
    # (the loss's tensors are gone; the returned logits are still held by the loop)
    at_loss = sum(outside.values()) + ws
    in_layer = outside["logits"] + max(per_layer, default=0.0)
    return {"without": sum(full.values()) + ws, "with": inputs + max(at_loss, in_layer), "inputs": inputs,
            "at_loss": at_loss, "in_layer": in_layer}


def _gradient_bytes(model: nn.Module, family: MoEFamily, mm: Any) -> tuple[float, np.ndarray]:
    """``(dense, experts [L, E])``: bytes of the gradients each unit's trained tensors get (trained
    weights and LoRA adapters), as the additive table counts them."""
    from fedmoe.moe.memory.table import _unit_costs

    bare = replace(mm, optimizer_states=0, adam_impl="fused")  # trained_cost = G; adapter_cost = 2·G
    dense, experts, _, _ = _unit_costs(model, family, bare)
    e = np.zeros((len(experts), max((len(r) for r in experts), default=0)))
    for i, row in enumerate(experts):
        for j, u in enumerate(row):
            e[i, j] = u.trained + u.adapters / 2
    return dense.trained + dense.adapters / 2, e


def checkpointing_saving(model: nn.Module, batch_size: int, seq_len: int, finetune: str = "lora", lora_r: int = 8,
                         family: MoEFamily | None = None, set_to_none: bool = True,
                         **kwargs: Any) -> tuple[float, np.ndarray]:
    """``(dense saving, expert savings [L, E])``: training bytes gradient checkpointing takes off
    ``model``'s additive table. Experts: under LoRA on fused experts, the merged weight each
    kept expert holds for backward now lives only while its layer is recomputed — it leaves
    the expert units and the largest layer's (all experts: an upper bound for any submodel)
    joins the dense part's recomputed-layer term.

    ``set_to_none`` (``zero_grad(set_to_none=True)``, the client loop): no gradient exists yet
    when the loss is computed, so the peak is ``max(at_loss, G + in_layer)`` instead of the
    table's ``G + max(at_loss, in_layer)``. The dense part is priced as a submodel without
    experts; each expert's gradient ``G_j`` comes off its unit, scaled by one factor so that the
    kept experts' gradients never exceed the room ``at_loss − G_dense − in_layer``: exact while
    all of them fit there, an upper bound on the peak otherwise. Under full fine-tuning this is
    most of the saving (≈ W: the loss's tensors and the gradients never coexist)."""
    from fedmoe.moe.memory.formula import memory_model_for
    from fedmoe.moe.memory.table import _lora_targets

    family = family or family_of(model)
    mm = memory_model_for(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    blocks = family.blocks(model)
    experts = np.zeros((len(blocks), max(b.num_experts for b in blocks)))
    lora = finetune == "lora"
    attn_count, expert_lora = (_lora_targets(model, family)[1:] if lora else (0, {}))
    for (i, j), (_, merged) in expert_lora.items():
        experts[i, j] = mm.factors.lora_merge * merged
    per_layer_attn = attn_count / max(1, len(mm.shape.layers)) if lora else 0.0
    per_module_lora = 0.0 if family.fused else 2.0
    terms = checkpointed_activation_terms(mm, per_layer_attn, per_module_lora, list(experts.sum(axis=1)))
    if not set_to_none:
        return max(0.0, terms["without"] - terms["with"]), experts
    g_dense, g_experts = _gradient_bytes(model, family, mm)
    at_loss, in_layer = terms["at_loss"], terms["in_layer"]
    dense = terms["without"] + g_dense - terms["inputs"] - max(at_loss, g_dense + in_layer)
    room = max(0.0, at_loss - g_dense - in_layer)
    total = float(g_experts.sum())
    scale = min(1.0, room / total) if total > 0 else 0.0
    return max(0.0, dense), experts + scale * g_experts[:, :experts.shape[1]]


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on ``transformers``' gradient checkpointing (non-reentrant) on ``model`` or the
    model under its peft wrapper; raises :class:`~fedmoe.errors.ConfigError` for classes
    without it."""
    from fedmoe.errors import ConfigError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing.",
                          "set train.gradient_checkpointing = false for this model.")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False  # no KV cache while training (transformers would warn and drop it)
    return model


def build_checkpointed(name: str, **overrides: Any) -> nn.Module:
    """``build_tiny(name, **overrides)`` with gradient checkpointing on (a picklable factory
    for :func:`~fedmoe.moe.memory.measure_in_subprocess`)."""
    from fedmoe.moe.models import build_tiny

    return enable_gradient_checkpointing(build_tiny(name, **overrides))
