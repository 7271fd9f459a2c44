"""What a client trains and what travels: LoRA (default) or full fine-tuning.

docs/algorithms.md §1.3, what is trained and what travels: by default clients train LoRA
adapters on kept experts and attention, plus the router rows of kept experts (and task
heads); base weights stay frozen and cross the wire once. ``finetune = "full"`` trains and
ships every kept weight.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.core.aggregation import ClientUpdate
from fedmoe.core.layout import UnitLayout
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.lora import LoraSpec, apply_lora, load_trainable_state, lora_layout, trainable_state
from fedmoe.moe.slicing import ExpertMap, SubMoE, layout_of

HEAD_TASKS = ("tc", "rc", "ts")
#: model → its client layouts by (finetune, family, expert sets); entries go with the model
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, UnitLayout]] = weakref.WeakKeyDictionary()


def _other_heads(key: str, task: str) -> bool:
    return any(f"{t}_head." in key for t in HEAD_TASKS if t != task)


@dataclass
class Trainables:
    """Global trainable state + its layout, and how clients wrap/read their models."""

    family: MoEFamily
    finetune: str
    lora: LoraSpec
    state: dict[str, torch.Tensor]
    layout: UnitLayout

    @classmethod
    def create(cls, base: nn.Module, family: MoEFamily, finetune: str, lora: LoraSpec, seed: int) -> Trainables:
        if finetune == "full":
            state = {k: v.detach().clone() for k, v in base.state_dict().items()}
            return cls(family, finetune, lora, state, layout_of(base, family))
        torch.manual_seed(seed)
        pm = apply_lora(copy.deepcopy(base), lora.r, lora.alpha, lora.dropout, family)
        state = {k: v.clone() for k, v in trainable_state(pm).items()}
        return cls(family, finetune, lora, state, lora_layout(pm, family))

    # -- client side -----------------------------------------------------------------
    def wrap(self, sub: SubMoE) -> nn.Module:
        if self.finetune == "full":
            for p in sub.model.parameters():
                p.requires_grad_(True)
            return sub.model
        return apply_lora(sub.model, self.lora.r, self.lora.alpha, self.lora.dropout, self.family)

    def client_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.finetune == "full":
            return {k: v.detach() for k, v in model.state_dict().items()}
        return trainable_state(model)

    def client_layout(self, model: nn.Module, expert_map: ExpertMap) -> UnitLayout:
        """Unit layout of ``model``'s client state (global ids via ``expert_map``); computed once
        per model and expert map (the server reuses its templates; treat the result as read-only)."""
        memo = _LAYOUTS.setdefault(model, {})
        key = (self.finetune, self.family.name, tuple(tuple(k) for k in expert_map.kept))
        if key not in memo:
            if self.finetune == "full":
                memo[key] = layout_of(model, self.family, expert_map)
            else:
                memo[key] = lora_layout(model, self.family, expert_map)
        return memo[key]

    def load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.finetune == "full":
            model.load_state_dict(state, strict=False)
        else:
            load_trainable_state(model, state, allow_missing=tuple(f"{t}_head." for t in HEAD_TASKS))

    def keep_personal(self, model: nn.Module) -> None:
        """After training: keep what stays on the client (nothing here; FLEx's side experts).

        Separate from :meth:`upload_state`, which only computes what is sent: the server
        calls that on its own templates to check replies, which must not write client state.
        """

    def upload_state(self, model: nn.Module, task: str) -> dict[str, torch.Tensor]:
        """What the client sends back: its trainable tensors, without other tasks' heads."""
        return {k: v for k, v in self.client_state(model).items() if not _other_heads(k, task)}

    # -- server side -----------------------------------------------------------------
    def for_client(self, model: nn.Module, expert_map: ExpertMap, task: str) -> dict[str, torch.Tensor]:
        """The global trainable tensors a client needs, shaped for its sub-MoE."""
        template = self.client_state(model)
        layout = self.client_layout(model, expert_map)
        out = {k: v.detach().clone() for k, v in template.items()}
        for units, glob in ((layout.experts, self.layout.experts), (layout.routers, self.layout.routers)):
            for unit, slices in units.items():
                for cs, gs in zip(slices, glob[unit], strict=True):
                    cs.write(out, gs.read(self.state))
        for key in layout.dense_keys:
            if key in self.state:
                out[key] = self.state[key].detach().clone()
        return {k: v for k, v in out.items() if not _other_heads(k, task)}

    def to_update(self, client_id: int, num_examples: int, model: nn.Module, expert_map: ExpertMap,
                  state: dict[str, torch.Tensor], task: str) -> ClientUpdate:
        layout = self.client_layout(model, expert_map)
        return ClientUpdate(
            client_id=client_id,
            num_examples=num_examples,
            dense={k: state[k] for k in layout.dense_keys if k in state and not _other_heads(k, task)},
            experts={u: [s.read(state) for s in sl] for u, sl in layout.experts.items()},
            routers={u: [s.read(state) for s in sl] for u, sl in layout.routers.items()},
        )

    def write_back(self, base: nn.Module) -> None:
        """Copy trained tensors that are base weights (routers, heads; all in full mode) into ``base``."""
        with torch.no_grad():
            bstate = base.state_dict()
            for k, v in self.state.items():
                if k in bstate and bstate[k].shape == v.shape:
                    bstate[k].copy_(v)
