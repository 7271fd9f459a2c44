"""Expert LoRA computed unmerged: ``F.linear(x, W_e, b_e) + s·F.linear(F.linear(x, A_e), B_e)``.

peft's ``ParamWrapper`` adapts a fused ``[E, out, in]`` expert tensor by registering a
parametrization ``W + s·B·A`` around every forward. The experts then run on the merged
weight, so the backward computes the full weight gradient of every expert that was hit and
projects it onto ``A`` and ``B`` (and the wrapper re-registers its parametrizations and
evaluates the merged weight once more per forward). Here the outermost wrapper of a fused
experts module keeps peft's parameters (``lora_A [r·E, in]``, ``lora_B [out, r·E]``,
names and layout unchanged, so payloads, aggregation and checkpoints do not change) and
runs the experts itself with the adapters applied to the activations: per token and layer
that is ``r·(in+out)`` extra multiply-adds per adapted matrix instead of a full
``out·in`` weight gradient. The base weights stay frozen and are never copied.

Handled expert layouts (anything else falls back to peft's merged path):

* gated (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3): ``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``; ``act(gate)·up`` with ``gate, up = chunk(2)``;
* BERT-MoE: ``up_proj``/``up_bias``, ``down_proj``/``down_bias``; ``act(x·Uᵀ+u)·Dᵀ+d``.

The fallback is also taken when adapters are merged or disabled, or when more than one
adapter is active, so peft's merge/unload keep working unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from fedmoe.moe.bert_moe import PermuteRows

GATED = ("gate_up_proj", "down_proj")
BERT = ("up_proj", "up_bias", "down_proj", "down_bias")


def expert_kind(experts: nn.Module) -> str | None:
    """``"gated"``, ``"bert"`` or None (a layout this module does not run)."""
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        return None
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    if names == set(GATED):
        return "gated"
    if names == set(BERT):
        return "bert"
    return None


class UnmergedExpertLoRA(ParamWrapper):
    """The outermost peft ``ParamWrapper`` over a fused experts module, computing LoRA unmerged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._unmerged_adapters(kwargs)
        if adapters is None:
            return super().forward(x, *args, **kwargs)
        experts = self.get_base_layer()
        return experts_forward(experts, adapters, x, *args, **kwargs)

    def _unmerged_adapters(self, kwargs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
        """``{parameter name: (A [E, r, in], B [E, out, r], scaling)}``, or None to use peft's path."""
        if kwargs.get("adapter_names") is not None:
            return None
        out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        layer: nn.Module = self
        while isinstance(layer, ParamWrapper):
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if layer.disable_adapters or layer.merged or len(active) > 1:
                return None
            if active:
                out[layer.parameter_name] = _factors(layer, active[0])
            layer = layer.base_layer
        return out


def _factors(layer: ParamWrapper, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-expert views of a fused adapter (peft's layout: A rows ``e·r…``, B columns ``e, e+E, …``)."""
    e = layer.num_experts
    a = layer.lora_A[adapter].weight  # [r·E, in]
    b = layer.lora_B[adapter].weight  # [out, r·E]
    a3 = a.view(e, -1, a.shape[-1])  # [E, r, in]
    b3 = b.view(b.shape[0], -1, e).permute(2, 0, 1).contiguous()  # [E, out, r]
    return a3, b3, float(layer.scaling[adapter])


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lora: tuple | None, e: int) -> torch.Tensor:
    y = F.linear(x, w, b)
    if lora is None:
        return y
    a3, b3, s = lora
    return y + s * F.linear(F.linear(x, a3[e].to(x.dtype)), b3[e].to(x.dtype))


def experts_forward(
    experts: nn.Module, adapters: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``Σ_slots w · expert(x)`` over ``[N, k]`` routing choices, with unmerged expert LoRA.

    Same contract as the native fused experts' forward (an index equal to ``num_experts``
    marks a dropped slot). The ``N·k`` (token, slot) pairs are sorted by expert once and
    each expert that was hit runs on its contiguous chunk; the gathers' gradients are
    permutations, not scatter-adds.
    """
    kind = expert_kind(experts)
    num = experts.down_proj.shape[0]
    n, k = top_k_index.shape
    with torch.no_grad():
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.argsort(order)
        counts = torch.bincount(flat, minlength=num + 1).tolist()
    h = hidden_states.shape[-1]
    slots = hidden_states.unsqueeze(1).expand(n, k, h).reshape(n * k, h)
    chunks = PermuteRows.apply(slots, order, inverse).split(counts)
    if kind == "gated":
        gate_up, down = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
        up_b = down_b = [None] * num
        gu_lora, dn_lora = adapters.get("gate_up_proj"), adapters.get("down_proj")
    else:
        gate_up, down = experts.up_proj.unbind(0), experts.down_proj.unbind(0)
        up_b, down_b = experts.up_bias.unbind(0), experts.down_bias.unbind(0)
        gu_lora, dn_lora = adapters.get("up_proj"), adapters.get("down_proj")
    outs = []
    for e in range(num):
        if not counts[e]:
            continue
        z = _linear(chunks[e], gate_up[e], up_b[e], gu_lora, e)
        if kind == "gated":
            gate, up = z.chunk(2, dim=-1)
            z = experts.act_fn(gate) * up
        else:
            z = experts.act_fn(z)
        outs.append(_linear(z, down[e], down_b[e], dn_lora, e))
    if counts[num]:  # dropped slots contribute nothing
        outs.append(hidden_states.new_zeros(counts[num], h))
    weights = top_k_weights.reshape(-1)[order, None]
    y = (torch.cat(outs) * weights).to(hidden_states.dtype)
    return PermuteRows.apply(y, inverse, order).view(n, k, h).sum(dim=1)


def use_unmerged_expert_lora(model: nn.Module) -> int:
    """Switch every outermost ``ParamWrapper`` over a handled fused experts module to the
    unmerged path (in place; parameters, names and state dict unchanged). Returns how many."""
    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, ParamWrapper)}
    count = 0
    for m in model.modules():
        if isinstance(m, ParamWrapper) and id(m) not in inner and expert_kind(m.get_base_layer()) is not None:
            if type(m) is ParamWrapper:
                m.__class__ = UnmergedExpertLoRA
            count += 1
    return count
