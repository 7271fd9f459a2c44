"""Registry of supported MoE families (one small file each, one table here)."""

from __future__ import annotations

from torch import nn

from fedmoe.errors import ModelError
from fedmoe.moe.families import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe, switch_transformers
from fedmoe.moe.families.base import MoEBlockInfo, MoEFamily

FAMILIES: dict[str, MoEFamily] = {
    f.name: f
    for f in (
        switch_transformers.FAMILY,
        mixtral.FAMILY,
        qwen2_moe.FAMILY,
        qwen3_moe.FAMILY,
        olmoe.FAMILY,
        deepseek_v3.FAMILY,
    )
}


def register_family(family: MoEFamily) -> MoEFamily:
    """Add a family to the registry (used by our own BERT-MoE and by user plug-ins)."""
    FAMILIES[family.name] = family
    return family


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_for_model_type(model_type: str) -> MoEFamily:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise ModelError(
        f"Model type `{model_type}` is not a supported MoE family.",
        f"use a model of one of the supported families: {supported()}.",
    )


def family_of(model: nn.Module) -> MoEFamily:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ModelError(f"{type(model).__name__} has no `config.model_type`.", f"pass a Hugging Face model of: {supported()}.")
    return family_for_model_type(model_type)


def get_family(name: str) -> MoEFamily:
    if name not in FAMILIES:
        raise ModelError(f"Unknown MoE family `{name}`.", f"choose one of: {supported()}.")
    return FAMILIES[name]


__all__ = ["FAMILIES", "MoEBlockInfo", "MoEFamily", "family_for_model_type", "family_of", "get_family", "register_family", "supported"]

# Our own BERT-MoE family registers itself on import (it needs register_family above).
from fedmoe.moe.families import bert_moe as _bert_moe  # noqa: E402,F401
