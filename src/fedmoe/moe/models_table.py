"""``fedmoe models``: the names ``model.name`` accepts, from the registries (nothing is built)."""

from __future__ import annotations

import importlib.util
from typing import Any

from rich.table import Table


def models_tables() -> list[Any]:
    from fedmoe.moe.families import FAMILIES, supported
    from fedmoe.moe.models import TINY_PREFIX
    from fedmoe.moe.presets import _BASES, PRESETS

    presets = Table(title="pretrained presets (any <E> ≥ 2 works: minilm-moe-<E>e, smollm2-moe-<E>e)")
    for col in ("name", "experts", "parameters", "fp32 bytes", "weights package", "installed", "purpose"):
        presets.add_column(col, no_wrap=col == "name")  # names stay whole on a narrow (piped) console
    for info in PRESETS.values():
        installed = importlib.util.find_spec(_BASES[info.base].module) is not None
        presets.add_row(info.name, str(info.num_experts), f"{info.params:,}", f"{info.bytes_fp32 / 2**20:,.0f} MiB",
                        info.package, "yes" if installed else "no", info.purpose)
    from fedmoe.moe.meta import load_shapes

    tiny = Table(title="tiny random models (tests and smoke runs; real config classes)")
    for col in ("name", "config class", "experts", "top-k", "MoE layers", "parameters"):
        tiny.add_column(col, no_wrap=col == "name")
    for fam in FAMILIES.values():
        name = TINY_PREFIX + fam.name.replace("_", "-")
        model, _ = load_shapes(name)  # meta device: no weights
        blocks = fam.blocks(model)
        tiny.add_row(name, fam.config_class or "-", str(blocks[0].num_experts), str(blocks[0].top_k), str(len(blocks)),
                     f"{sum(p.numel() for p in model.parameters()):,}")
    note = (f"Hub names and local folders: a `save_pretrained` folder (config.json + weights) or a hub id in the "
            f"local Hugging Face cache (runs are offline: HF_HUB_OFFLINE=1), whose config.model_type is one of "
            f"the supported families: {supported()}. Check one with `fedmoe inspect NAME` (no weights are loaded).")
    return [presets, tiny, note]
