"""What a model family must tell us: where its MoE blocks, routers and experts live.

A family is a small declarative object (peft-style per-family table). Two expert
layouts exist in ``transformers`` 5.x:

* **fused**: ``block.experts.<name>`` are 3-D parameters ``[num_experts, …]``
  (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3); expert ``j`` is row ``j`` of each;
* **per-module**: ``block.experts.expert_<j>`` is a module of its own
  (SwitchTransformers); expert ``j`` is every tensor under that prefix.

Routers score expert ``j`` with row ``j`` of their weight (and entry ``j`` of a bias or
score-correction bias). Shared experts (Qwen2-MoE, DeepSeek-V3) run on every token: they are
dense parameters and never sliced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedmoe.core.layout import TensorSlice


@dataclass(frozen=True)
class MoEBlockInfo:
    """One sparse MoE block of a concrete model."""

    index: int  #: MoE layer index i (0..L-1, in module order)
    path: str  #: module path of the sparse block, e.g. ``model.layers.0.mlp``
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class MoEFamily:
    """Declarative description of one model family."""

    name: str
    #: ``config.model_type`` values this family handles
    model_types: tuple[str, ...]
    #: class names of the sparse MoE blocks
    block_classes: tuple[str, ...]
    #: ``transformers`` auto class used to build/load the model
    auto_class: str
    #: router module path under the block
    router_attr: str
    #: router tensors indexed by expert along dim 0 (weight rows, bias entries, …)
    router_tensors: tuple[str, ...] = ("weight",)
    #: fused expert parameter names under ``block.experts`` (empty for per-module experts)
    fused_expert_tensors: tuple[str, ...] = ()
    #: per-module experts: module name pattern under ``block.experts``
    per_expert_module: str = ""
    #: shared (dense, never sliced) expert modules under the block, for documentation/inspect
    shared_experts: tuple[str, ...] = ()
    #: router normalisation, for documentation/inspect
    normalisation: str = "softmax"
    #: attributes holding an expert count on the router / experts / block modules
    num_experts_attrs: tuple[str, ...] = ("gate.num_experts", "experts.num_experts")
    #: attributes holding top-k (clipped to the experts kept)
    top_k_attrs: tuple[str, ...] = ("gate.top_k",)
    #: attention projection names to put LoRA on
    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: tiny config kwargs for ``tiny-<name>`` (built from the real config class)
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)
    config_class: str = ""
    #: config keys holding the expert count and top-k
    config_num_experts_key: str = "num_experts"
    config_top_k_key: str | None = "num_experts_per_tok"

    # -- discovery -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[MoEBlockInfo]:
        out: list[MoEBlockInfo] = []
        for path, mod in model.named_modules():
            if type(mod).__name__ in self.block_classes:
                out.append(MoEBlockInfo(len(out), path, self.num_experts(mod), self.top_k(mod)))
        return out

    def router(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.router_attr)

    def num_experts(self, block: nn.Module) -> int:
        return int(self.router(block).weight.shape[0])

    def top_k(self, block: nn.Module) -> int:
        return int(_getattr_path(block, self.top_k_attrs[0])) if self.top_k_attrs else 1

    @property
    def fused(self) -> bool:
        return bool(self.fused_expert_tensors)

    def route_choices(self, router_out: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From a router's forward output: (chosen expert ids [N, k], probabilities [N, E]).

        Routers of the Mixtral kind return ``(logits, top_k_weights, top_k_index)``.
        """
        logits, _, indices = router_out
        logits = logits.reshape(-1, logits.shape[-1]).float()
        return indices.reshape(logits.shape[0], -1), self.router_probs(logits)

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    # -- per-expert slices (state-dict keys relative to the model) -------------------
    def expert_slices(self, block_path: str, block: nn.Module, j: int) -> list[TensorSlice]:
        if self.fused:
            return [TensorSlice(f"{block_path}.experts.{n}", 0, (j,)) for n in self.fused_expert_tensors]
        prefix = f"experts.{self.per_expert_module.format(j=j)}"
        sub = block.get_submodule(prefix)
        return [TensorSlice(f"{block_path}.{prefix}.{n}") for n, _ in sub.named_parameters()]

    def router_slices(self, block_path: str, block: nn.Module, j: int) -> list[TensorSlice]:
        router = self.router(block)
        out = []
        for n in self.router_tensors:
            if getattr(router, n, None) is not None:
                out.append(TensorSlice(f"{block_path}.{self.router_attr}.{n}", 0, (j,)))
        return out

    def expert_module_prefixes(self, block_path: str, j: int) -> list[str]:
        """Module/parameter name prefixes that belong to expert j only (per-module layout)."""
        if self.fused:
            return []
        return [f"{block_path}.experts.{self.per_expert_module.format(j=j)}."]

    # -- surgery -----------------------------------------------------------------------
    def set_num_experts(self, block: nn.Module, n: int, top_k: int) -> None:
        """Update the bookkeeping attributes after a block was restricted to ``n`` experts."""
        for attr in self.num_experts_attrs:
            _setattr_path(block, attr, n)
        for attr in self.top_k_attrs:
            _setattr_path(block, attr, top_k)
        self.fix_block(block, n)

    def fix_block(self, block: nn.Module, n: int) -> None:  # noqa: B027 - optional hook
        """Family-specific fix-ups after restriction (e.g. DeepSeek-V3 expert groups)."""

    def restrict_config(self, config: Any, max_kept: int, top_k: int) -> None:
        """Write the expert count of a sub-MoE into its config (the largest layer's count).

        The per-layer counts, which may differ, live in the sub-MoE's index map.
        """
        setattr(config, self.config_num_experts_key, max_kept)
        if self.config_top_k_key:
            setattr(config, self.config_top_k_key, min(top_k, max_kept))

    def build_config(self, **overrides: Any) -> Any:
        import transformers

        cls = getattr(transformers, self.config_class)
        return cls(**{**self.tiny_kwargs, **overrides})


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _setattr_path(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return
    if hasattr(obj, parts[-1]):
        setattr(obj, parts[-1], value)
