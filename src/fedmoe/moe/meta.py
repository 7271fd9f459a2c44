"""Models without weights (``torch.device("meta")``): shapes, dtypes and bytes only.

``fedmoe inspect`` only needs tensor shapes; building a preset's real weights took 70 s and
2.6 GB for ``smollm2-moe-4e``. Here the same classes are built from their configs on the
meta device: tiny families from their config class, presets by upcycling a weight-free dense
model (same code path as the real preset, router at zero — shapes are identical), hub names
and local folders from their ``config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from torch import nn

from fedmoe.errors import ModelError
from fedmoe.moe.families import MoEFamily, family_for_model_type, supported
from fedmoe.moe.models import TINY_PREFIX, _family_from_tiny, auto_class, build_tiny, tiny_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_shapes(name: str, dtype: str = "float32") -> tuple[nn.Module, MoEFamily]:
    """``name`` (as :func:`~fedmoe.moe.models.load_model` takes it) as a meta-device model."""
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"Unknown dtype `{dtype}`.", "use float32, bfloat16 or float16.")
    if name.startswith(TINY_PREFIX):
        family = _family_from_tiny(name)
        with torch.device("meta"):
            return build_tiny(name).to(torch_dtype), family
    from fedmoe.moe.presets import PATTERN

    m = PATTERN.match(name)
    if m is not None:
        return _preset_shapes(m.group(1), int(m.group(2)), name).to(torch_dtype), family_for_model_type(
            "mixtral" if m.group(1) == "smollm2" else "bert_moe")
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith((".", "/", "~"))
    from fedmoe.moe.slicing import MAP_FILE

    if looks_local and (local / MAP_FILE).is_file():  # a saved sub-MoE: layers keep different expert counts,
        from fedmoe.moe.models import load_model  # which only its own loader knows (small: load it for real)

        sub, family, _ = load_model(str(local))
        return sub.to(torch_dtype).eval(), family
    if looks_local and not (local / "config.json").is_file():
        raise ModelError(f"Model path {local} has no config.json.",
                         f"pass a directory written by `save_pretrained`, a hub name, or a preset ({', '.join(tiny_names())}).")
    try:
        config = transformers.AutoConfig.from_pretrained(str(local) if looks_local else name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load the config of `{name}`: {str(exc).splitlines()[0]}",
                         f"pass a local save_pretrained folder, a model in the local HF cache or a preset; "
                         f"supported families: {supported()}.") from None
    family = family_for_model_type(config.model_type)
    with torch.device("meta"):
        model = auto_class(family).from_config(config, dtype=torch_dtype)
    return model.eval(), family


def _preset_shapes(base: str, num_experts: int, name: str) -> nn.Module:
    from fedmoe.moe.presets import SMOLLM2_GGUF, _package_dir
    from fedmoe.moe.upcycle import upcycle_bert, upcycle_llama_to_mixtral

    if num_experts < 2:
        raise ModelError(f"Preset `{name}` has {num_experts} experts, fewer than top_k=2.", f"use {base}-moe-8e, for example.")
    if base == "minilm":
        d = os.path.join(_package_dir("minilm", name), "model")
        config = transformers.AutoConfig.from_pretrained(d)
        with torch.device("meta"):
            return upcycle_bert(transformers.AutoModel.from_config(config), num_experts).eval()
    d = _package_dir("smollm2", name)
    config = transformers.AutoConfig.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    with torch.device("meta"):
        return upcycle_llama_to_mixtral(transformers.AutoModelForCausalLM.from_config(config), num_experts).eval()
