"""Units of training memory: bytes per element, the additive :class:`MemoryTable`, parameter bytes per unit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn

from fedmoe.errors import ModelError
from fedmoe.moe.families import MoEFamily, family_of

T = TypeVar("T")
Finetune = Literal["full", "lora"]
AdamImpl = Literal["fused", "foreach", "for-loop"]

#: optimiser-step temporaries per trained byte, by AdamW implementation (module docstring)
OPTIMIZER_TRANSIENT: dict[str, float] = {"fused": 0.0, "for-loop": 0.0, "foreach": 1.0}
#: bytes per routed (token, expert) pair of index bookkeeping in the grouped experts: sort
#: permutation, gather index and inverse permutation (int64) and the routing weight (fp32)
ROUTING_INDEX_BYTES = 3 * 8 + 4
#: bytes per token and top-k slot the router keeps: expert id (int64) + weight (fp32)
ROUTER_TOPK_BYTES = 8 + 4


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# weights per unit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryTable:
    """An additive memory table: ``dense_bytes`` plus ``expert_bytes[i, j]`` per (layer, expert).

    ``expert_bytes`` is ``[L, max E]`` (int64); entries past a layer's ``num_experts[i]`` are 0.
    """

    dense_bytes: int
    expert_bytes: np.ndarray
    num_experts: tuple[int, ...]

    def total(self) -> int:
        """Bytes of the whole model: dense + every expert."""
        return self.dense_bytes + int(self.expert_bytes.sum())

    def submodel_bytes(self, kept: Iterable[Iterable[int]]) -> int:
        """``dense_bytes + Σ_{(i, j) kept} expert_bytes[i, j]``; ``kept[i]`` = expert ids of layer i."""
        sets = [[int(j) for j in k] for k in kept]
        if len(sets) != len(self.num_experts):
            raise ValueError(f"kept covers {len(sets)} MoE layers, the table has {len(self.num_experts)}.")
        parts = []
        for i, ids in enumerate(sets):
            for j in ids:
                if not 0 <= j < self.num_experts[i]:
                    raise ValueError(f"expert {j} is out of range for layer {i} ({self.num_experts[i]} experts).")
                parts.append(int(self.expert_bytes[i, j]))
        return submodel_training_bytes(self.dense_bytes, parts)


def submodel_training_bytes(dense_bytes_part: float, expert_bytes_kept: Iterable[float]) -> int:
    """``mem = mem(dense part) + Σ mem(kept experts)`` (docs/algorithms.md §1.1 step 3).

    The parts come from :func:`training_table` (training cost) or :func:`param_bytes_by_unit`
    (weights only); nothing is shared between parts, so the sum is the whole cost.
    """
    return int(round(float(dense_bytes_part) + sum(float(b) for b in expert_bytes_kept)))


def _check_unwrapped(model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise ModelError(
            "Memory tables take the base model, not a peft-wrapped one.",
            "pass the model before apply_lora; LoRA adapters are priced from lora_r.",
        )


def _unit_elements(model: nn.Module, family: MoEFamily) -> tuple[dict[str, torch.Tensor], list[list[dict[str, int]]]]:
    """All tensors (parameters + buffers, each once) and, per layer and expert, how many
    elements of which tensor it owns (its expert slices and router rows)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            tensors[name] = t
    owned: list[list[dict[str, int]]] = []
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        layer = []
        for j in range(info.num_experts):
            counts: dict[str, int] = {}
            for s in family.expert_slices(info.path, block, j) + family.router_slices(info.path, block, j):
                t = tensors.get(s.key)
                if t is not None:
                    n = t.numel() if s.dim is None else t.numel() // t.shape[s.dim] * len(s.index)
                    counts[s.key] = counts.get(s.key, 0) + n
            layer.append(counts)
        owned.append(layer)
    return tensors, owned


def _table(dense: int, per_expert: list[list[int]]) -> MemoryTable:
    counts = tuple(len(layer) for layer in per_expert)
    arr = np.zeros((len(per_expert), max(counts, default=0)), dtype=np.int64)
    for i, layer in enumerate(per_expert):
        arr[i, : len(layer)] = layer
    return MemoryTable(int(dense), arr, counts)


def param_bytes_by_unit(model: nn.Module, family: MoEFamily | None = None) -> MemoryTable:
    """Weight bytes of a (sub-)MoE split into the dense part and each expert ``[L, E]``.

    An expert's bytes are its expert tensors (row ``j`` of fused ``[E, …]`` parameters, or every
    tensor of its own module) **and its router rows** (weight row, bias / score-correction
    entry): a submodel holds exactly the router rows of its kept experts. Everything else is
    dense: embeddings, attention, norms, LM head, shared experts, dense MLPs, task heads.
    Buffers count like parameters; tied tensors count once, so ``table.total()`` equals the
    model's parameter + buffer bytes exactly.
    """
    _check_unwrapped(model)
    family = family or family_of(model)
    tensors, owned = _unit_elements(model, family)
    per_expert = [[sum(tensors[k].element_size() * n for k, n in c.items()) for c in layer] for layer in owned]
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return _table(total - sum(map(sum, per_expert)), per_expert)


