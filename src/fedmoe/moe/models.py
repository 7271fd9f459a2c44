"""Load a model by name: ``tiny-<family>`` presets, pretrained presets, hub names or local paths.

``tiny-<family>`` builds a small random model from the family's *real* ``transformers``
config class (for tests and smoke runs). Hub names and local directories go through the
normal ``from_pretrained`` code path; there is no network here, so hub names only work
when they are in the local Hugging Face cache.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from fedmoe.errors import DataNotice, ModelError
from fedmoe.moe.families import FAMILIES, MoEFamily, family_for_model_type, supported

TINY_PREFIX = "tiny-"


def tiny_names() -> list[str]:
    return [TINY_PREFIX + n.replace("_", "-") for n in FAMILIES]


def _family_from_tiny(name: str) -> MoEFamily:
    key = name[len(TINY_PREFIX):].replace("-", "_")
    if key not in FAMILIES:
        raise ModelError(
            f"Unknown tiny model `{name}`.", f"use one of: {', '.join(tiny_names())}."
        )
    return FAMILIES[key]


def auto_class(family: MoEFamily) -> Any:
    return getattr(transformers, family.auto_class)


def build_tiny(name: str, seed: int = 0, **config_overrides: Any) -> nn.Module:
    """A small random model of the family's real config class, deterministic in ``seed``."""
    family = _family_from_tiny(name)
    config = family.build_config(**config_overrides)
    torch.manual_seed(seed)
    model = auto_class(family).from_config(config)
    model.eval()
    return model


def load_model(name: str, seed: int = 0, dtype: str = "float32") -> tuple[nn.Module, MoEFamily, Any]:
    """Resolve ``name`` to a model and its family.

    Order: ``tiny-<family>``; a pretrained preset (``minilm-moe-<E>e``, ``smollm2-moe-<E>e``);
    a sub-MoE folder (``save_sub_moe``: per-layer expert counts); a local directory; a hub
    name (offline: from the local cache only). Returns
    ``(model, family, tokenizer)``; tiny models get a byte-level tokenizer.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"Unknown dtype `{dtype}`.", "use float32, bfloat16 or float16.")
    if name.startswith(TINY_PREFIX):
        model = build_tiny(name, seed=seed)
        return model.to(torch_dtype), _family_from_tiny(name), _byte_tokenizer(model)
    preset = _pretrained_preset(name)
    if preset is not None:
        model, tok = preset if isinstance(preset, tuple) else (preset, None)
        return model.to(torch_dtype), family_for_model_type(model.config.model_type), tok or _byte_tokenizer(model)
    sub = _saved_sub_moe(name, torch_dtype)
    if sub is not None:
        return sub.model, family_for_model_type(sub.model.config.model_type), _saved_tokenizer(name, sub.model)
    model, family = _from_pretrained(name, torch_dtype)
    return model, family, _saved_tokenizer(name, model)


def _saved_tokenizer(name: str, model: nn.Module) -> Any:
    """The tokenizer saved with a local folder (read from the expanded path, as its weights are:
    ``~/…``) or a cached hub model; when there is none, the byte-level test tokenizer, announced
    by one ``note:`` line (:class:`~fedmoe.errors.DataNotice`), never silently: a pretrained model
    fed the wrong tokenizer trains at chance level (docs/results.md, the stand-in's TC collapse)."""
    local = Path(name).expanduser()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        warnings.warn(DataNotice(
            f"{name}: no tokenizer could be read ({why}); using the byte-level test tokenizer (vocabulary "
            f"{model.config.vocab_size}). For real text save the model's tokenizer beside its weights "
            "(tokenizer.save_pretrained(folder))."), stacklevel=3)
        return _byte_tokenizer(model)


def _byte_tokenizer(model: nn.Module) -> Any:
    from fedmoe.moe.tokenizer import ByteTokenizer, char_wordpiece_tokenizer

    if model.config.model_type == "bert_moe":  # task heads need a real (fast) tokenizer
        return char_wordpiece_tokenizer(model.config.vocab_size)
    return ByteTokenizer(model.config.vocab_size)


def _pretrained_preset(name: str) -> Any:
    try:
        from fedmoe.moe import presets
    except ImportError:  # presets module not available
        return None
    return presets.build_pretrained_preset(name)


def _saved_sub_moe(name: str, torch_dtype: torch.dtype) -> Any:
    """A folder written by :func:`~fedmoe.moe.slicing.save_sub_moe` (layers keep different expert
    counts, so ``from_pretrained`` cannot read it) → its :class:`SubMoE`; None for other names."""
    from fedmoe.moe.slicing import MAP_FILE, load_sub_moe

    d = Path(name).expanduser()
    if not (d / MAP_FILE).is_file():
        return None
    try:
        sub = load_sub_moe(d)
    except (ModelError, ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        why = exc.what if isinstance(exc, ModelError) else (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"{d} holds {MAP_FILE} but is not a readable sub-MoE: {type(exc).__name__}: {why}",
                         "write it again with fedmoe.moe.slicing.save_sub_moe (config.json, model.safetensors "
                         f"and {MAP_FILE} from the same sub-MoE).") from None
    sub.model.to(torch_dtype)
    return sub


def _from_pretrained(name: str, torch_dtype: torch.dtype) -> tuple[nn.Module, MoEFamily]:
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith((".", "/", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise ModelError(
            f"Model path {local} has no config.json.",
            "pass a directory written by `save_pretrained`, a hub name, or a preset "
            f"({', '.join(tiny_names())}).",
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(local) if looks_local else name)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Could not load model `{name}`: {str(exc).splitlines()[0]}",
            "pass a local directory written by `save_pretrained`, a model in the local HF cache, "
            f"or a preset ({', '.join(tiny_names())}); supported families: {supported()}.",
        ) from None
    family = family_for_model_type(config.model_type)
    try:
        model = auto_class(family).from_pretrained(str(local) if looks_local else name, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 — truncated/garbage weight files raise many types
        raise ModelError(f"Could not read the weights of model `{name}` ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}).",
                         "re-save the model with `save_pretrained` (complete model.safetensors + config.json).") from None
    model.eval()
    return model, family
