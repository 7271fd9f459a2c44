"""Sub-MoE extraction and merge (docs/algorithms.md §1.2 steps 2 and 4).

``extract`` builds a standalone, trainable model of the *same Hugging Face class* that
holds every dense parameter, only the kept experts of each MoE layer, and the router
rows of those experts. Routing is therefore a softmax (or sigmoid) over the kept experts
only — exactly the full model with the dropped experts' router logits at −inf — and
top-k is clipped to the number of experts kept. Layers may keep different numbers of
experts; the sub-MoE's config records the largest count, and the per-layer truth lives
in its :class:`ExpertMap` (saved as ``expert_map.json`` beside the weights).

``merge`` writes a client's tensors back into the global state at the global indices.
Both go through :class:`~fedmoe.core.layout.UnitLayout`, so they are exact copies.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from fedmoe.core.layout import UnitLayout
from fedmoe.errors import ModelError
from fedmoe.moe.families import MoEFamily, family_of, get_family

MAP_FILE = "expert_map.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ExpertMap:
    """Which global experts a sub-MoE holds: ``kept[i]`` = sorted global ids of layer i."""

    family: str
    global_num_experts: list[int]
    kept: list[list[int]]

    def local_to_global(self, layer: int, local: int) -> int:
        return self.kept[layer][local]

    def num_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExpertMap:
        return cls(**json.loads(text))

    @classmethod
    def full(cls, model: nn.Module, family: MoEFamily) -> ExpertMap:
        counts = [b.num_experts for b in family.blocks(model)]
        return cls(family.name, counts, [list(range(n)) for n in counts])


@dataclass
class SubMoE:
    model: nn.Module
    expert_map: ExpertMap


def _check_sets(model: nn.Module, family: MoEFamily, kept: list[list[int]]) -> list[list[int]]:
    blocks = family.blocks(model)
    if len(kept) != len(blocks):
        raise ModelError(
            f"Expert sets cover {len(kept)} MoE layers but the model has {len(blocks)}.",
            "give one list of expert ids per MoE layer (see `fedmoe inspect`).",
        )
    out = []
    for info, ids in zip(blocks, kept, strict=True):
        ids = sorted(set(int(j) for j in ids))
        if not ids:
            raise ModelError(f"MoE layer {info.index} ({info.path}) keeps no expert.", "keep at least one expert per layer.")
        bad = [j for j in ids if not 0 <= j < info.num_experts]
        if bad:
            raise ModelError(
                f"MoE layer {info.index} has {info.num_experts} experts; ids {bad} are out of range.",
                f"use ids in 0..{info.num_experts - 1}.",
            )
        out.append(ids)
    return out


def expert_map_of(model: nn.Module, kept: list[list[int]], family: MoEFamily | None = None) -> ExpertMap:
    """The :class:`ExpertMap` of :func:`extract` ``(model, kept)`` (sets checked, sorted), without extracting."""
    family = family or family_of(model)
    return ExpertMap(family.name, [b.num_experts for b in family.blocks(model)], _check_sets(model, family, kept))


def extract(model: nn.Module, kept: list[list[int]], family: MoEFamily | None = None, *,
            share: bool = False) -> SubMoE:
    """Build the sub-MoE of ``model`` that keeps ``kept[i]`` experts in MoE layer ``i``.

    The result shares no storage with ``model``. Only the kept experts are copied
    (dropped per-module experts are never materialised).

    ``share``: every tensor that is not sliced (dense weights, buffers, kept per-module experts)
    is a new parameter *on the same storage* as ``model``'s (nothing copied); only fused expert
    rows and router rows are copied. For read-only use (the server's templates): writing into
    such a sub-MoE writes into ``model``.
    """
    family = family or family_of(model)
    kept = expert_map_of(model, kept, family).kept
    blocks = family.blocks(model)
    memo: dict[int, object] = {}
    placeholder = torch.empty(0)
    for info, ids in zip(blocks, kept, strict=True):
        block = model.get_submodule(info.path)
        idx = torch.tensor(ids, dtype=torch.long)
        router = family.router(block)
        for name in family.router_tensors:
            t = getattr(router, name, None)
            if t is not None:
                memo[id(t)] = _sliced(t, idx)
        if family.fused:
            for name in family.fused_expert_tensors:
                t = getattr(block.experts, name)
                memo[id(t)] = _sliced(t, idx)
        else:
            for j in range(info.num_experts):
                if j not in ids:
                    sub = block.experts.get_submodule(family.per_expert_module.format(j=j))
                    for t in list(sub.parameters()) + list(sub.buffers()):
                        memo[id(t)] = nn.Parameter(placeholder, requires_grad=False)
    if share:
        for t in model.parameters():
            memo.setdefault(id(t), nn.Parameter(t.detach(), requires_grad=t.requires_grad))
        for t in model.buffers():
            memo.setdefault(id(t), t)
    sub_model = copy.deepcopy(model, memo)
    for info, ids in zip(blocks, kept, strict=True):
        block = sub_model.get_submodule(info.path)
        if not family.fused:
            experts = block.experts
            keep_mods = [experts[family.per_expert_module.format(j=j)] for j in ids]
            for key in list(experts.keys()):
                del experts[key]
            for local, mod in enumerate(keep_mods):
                experts[family.per_expert_module.format(j=local)] = mod
        router = family.router(block)
        if hasattr(router, "out_features"):
            router.out_features = len(ids)
        family.set_num_experts(block, len(ids), min(info.top_k, len(ids)))
    sub_model.config = copy.deepcopy(model.config)
    family.restrict_config(sub_model.config, max(len(k) for k in kept), max(b.top_k for b in blocks))
    return SubMoE(sub_model, ExpertMap(family.name, [b.num_experts for b in blocks], kept))


def _sliced(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    data = t.detach().index_select(0, idx.to(t.device))  # a fresh tensor: no extra copy
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def layout_of(model: nn.Module, family: MoEFamily | None = None, expert_map: ExpertMap | None = None) -> UnitLayout:
    """Unit layout of ``model``; unit ids use *global* expert ids via ``expert_map``."""
    family = family or family_of(model)
    layout = UnitLayout()
    covered: set[str] = set()
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        for j in range(info.num_experts):
            g = expert_map.local_to_global(info.index, j) if expert_map else j
            ex = family.expert_slices(info.path, block, j)
            rt = family.router_slices(info.path, block, j)
            layout.experts[(info.index, g)] = ex
            layout.routers[(info.index, g)] = rt
            covered.update(s.key for s in ex + rt)
    layout.dense_keys = [k for k in model.state_dict() if k not in covered]
    return layout


def merge(
    global_state: dict[str, torch.Tensor],
    global_layout: UnitLayout,
    sub_state: dict[str, torch.Tensor],
    sub_layout: UnitLayout,
    include_dense: bool = True,
) -> None:
    """Write a sub-MoE's tensors into ``global_state`` in place, at the global indices.

    Both layouts must use global unit ids (``layout_of(sub, expert_map=...)``).
    """
    for unit, slices in sub_layout.experts.items():
        for g, s in zip(global_layout.experts[unit], slices, strict=True):
            g.write(global_state, s.read(sub_state))
    for unit, slices in sub_layout.routers.items():
        for g, s in zip(global_layout.routers[unit], slices, strict=True):
            g.write(global_state, s.read(sub_state))
    if include_dense:
        for key in sub_layout.dense_keys:
            if key in global_state:
                global_state[key].copy_(sub_state[key])


def save_sub_moe(sub: SubMoE, directory: str | Path) -> Path:
    """Save as ``config.json`` + ``model.safetensors`` + ``expert_map.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sub.model.config.save_pretrained(d)
    save_model(sub.model, str(d / WEIGHTS_FILE))
    (d / MAP_FILE).write_text(sub.expert_map.to_json())
    return d


def load_sub_moe(directory: str | Path) -> SubMoE:
    """Load a sub-MoE written by :func:`save_sub_moe` (per-layer expert counts restored)."""
    d = Path(directory)
    for name in ("config.json", WEIGHTS_FILE, MAP_FILE):
        if not (d / name).is_file():
            raise ModelError(f"{d} is not a saved sub-MoE: {name} is missing.", "save it with fedmoe.moe.slicing.save_sub_moe.")
    expert_map = ExpertMap.from_json((d / MAP_FILE).read_text())
    family = get_family(expert_map.family)
    config = transformers.AutoConfig.from_pretrained(d)
    shell = getattr(transformers, family.auto_class).from_config(config)
    local = [list(range(len(k))) for k in expert_map.kept]
    sub = extract(shell, local, family)
    load_model(sub.model, str(d / WEIGHTS_FILE))
    sub.model.eval()
    return SubMoE(sub.model, expert_map)
