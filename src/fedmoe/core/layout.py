"""Where each aggregation unit lives inside a flat ``state_dict``.

A model's tensors fall into three kinds of *units* (docs/algorithms.md §1.2 step 4):

* dense tensors (attention, norms, embeddings, shared experts): FedAvg'd as a whole;
* expert ``(layer i, expert j)``: one or more slices of tensors (a whole per-expert
  ``nn.Linear`` weight, or row ``j`` of a fused ``[num_experts, …]`` tensor, or the
  strided rank block of a fused LoRA factor);
* router row ``(layer i, expert j)``: row ``j`` of the router weight (and bias entries).

A :class:`TensorSlice` names a tensor by its state-dict key and, optionally, the
indices it covers along one dimension. Everything downstream (extraction, merge,
aggregation, byte accounting) works on these slices, so model families only have to say
where their experts and routers are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

UnitId = tuple[int, int]  # (MoE layer index i, global expert index j)


@dataclass(frozen=True)
class TensorSlice:
    """``key``'s tensor, restricted to ``index`` along ``dim`` (``dim is None``: whole tensor)."""

    key: str
    dim: int | None = None
    index: tuple[int, ...] = ()

    def read(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        t = state[self.key]
        if self.dim is None:
            return t
        return t.index_select(self.dim, torch.tensor(self.index, dtype=torch.long, device=t.device))

    def write(self, state: dict[str, torch.Tensor], value: torch.Tensor) -> None:
        """Write ``value`` into ``state[key]`` in place (at ``index`` along ``dim``)."""
        t = state[self.key]
        if self.dim is None:
            t.copy_(value)
        else:
            idx = torch.tensor(self.index, dtype=torch.long, device=t.device)
            t.index_copy_(self.dim, idx, value.to(t.dtype))


@dataclass
class UnitLayout:
    """Aggregation layout of one model: dense keys and per-(layer, expert) slices."""

    dense_keys: list[str] = field(default_factory=list)
    experts: dict[UnitId, list[TensorSlice]] = field(default_factory=dict)
    routers: dict[UnitId, list[TensorSlice]] = field(default_factory=dict)

    def units(self) -> list[UnitId]:
        return sorted(self.experts)
