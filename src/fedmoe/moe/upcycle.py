"""Sparse upcycling: turn a dense checkpoint into an MoE whose experts start as copies of its FFN.

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints" (ICLR 2023). Every non-FFN tensor (embeddings, attention, norms, LM head) is
copied; each FFN becomes ``E`` identical experts plus a freshly initialised router.

Because the router renormalises its top-k weights to sum to one and all experts are equal,
the upcycled model computes *exactly* the dense function at init, for any router weights
(up to float rounding). The router init still matters for training:

* ``router_init_std=0`` (zero router): every token ties, ``topk`` picks the same experts
  (0 … k-1) everywhere, those experts receive identical gradients and never diverge, and the
  router gets no gradient — the model stays dense. Useful only as a reference.
* ``router_init_std>0`` (e.g. 0.02): tokens spread over all experts, which then drift apart
  on different data; the output at init is still the dense output. Presets use this.
* ``noise_std>0``: additionally perturb each expert copy (weights only, seeded) by Gaussian
  noise with std ``noise_std × std(dense tensor)``; breaks exact equality, off by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

import fedmoe.moe.families.bert_moe  # noqa: F401  (registers the bert_moe family)
from fedmoe.errors import ModelError
from fedmoe.moe.bert_moe import BertMoeConfig, BertMoeForFedTasks

#: LlamaConfig fields carried over verbatim to MixtralConfig
_LLAMA_TO_MIXTRAL = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "attention_dropout",
)
#: BertConfig fields carried over to BertMoeConfig
_BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout",
)


def _check_args(num_experts: int, top_k: int, router_init_std: float, noise_std: float) -> None:
    if num_experts < 1:
        raise ModelError(f"num_experts must be ≥ 1 (got {num_experts}).", "pass num_experts=8, for example.")
    if not 1 <= top_k <= num_experts:
        raise ModelError(f"top_k={top_k} must lie in 1..num_experts={num_experts}.", "lower top_k.")
    if router_init_std < 0 or noise_std < 0:
        raise ModelError("router_init_std and noise_std must be ≥ 0.", "pass non-negative values.")


def _experts(dense: torch.Tensor, n: int, noise_std: float, gen: torch.Generator | None) -> torch.Tensor:
    """``n`` stacked copies of ``dense`` (``[n, *dense.shape]``), optionally perturbed."""
    out = dense.detach().unsqueeze(0).expand(n, *dense.shape)
    if noise_std > 0 and gen is not None:
        scale = noise_std * float(dense.detach().float().std())
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32) * scale
        out = out + noise.to(out.dtype)
    return out


def _router(n: int, hidden: int, std: float, gen: torch.Generator) -> torch.Tensor:
    if std == 0:
        return torch.zeros(n, hidden)
    return torch.randn(n, hidden, generator=gen) * std


@torch.no_grad()
def _fill(model: nn.Module, source: Callable[[str], torch.Tensor | None]) -> None:
    """Copy ``source(key)`` into every parameter and persistent buffer of ``model``."""
    missing = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        value = source(key)
        if value is None:
            missing.append(key)
            continue
        if tuple(value.shape) != tuple(tensor.shape):
            raise ModelError(f"Upcycling: shape mismatch for {key}: {tuple(value.shape)} vs {tuple(tensor.shape)}.")
        tensor.data.copy_(value.to(tensor.dtype))
    if missing:
        raise ModelError(f"Upcycling: no source tensor for {missing[:5]} ({len(missing)} in all).")


def upcycle_llama_to_mixtral(
    dense_model: PreTrainedModel,
    num_experts: int,
    top_k: int = 2,
    router_init_std: float = 0.0,
    noise_std: float = 0.0,
    seed: int = 0,
) -> MixtralForCausalLM:
    """Upcycle a Llama-architecture causal LM (e.g. SmolLM2) into a native ``MixtralForCausalLM``.

    Expert ``e`` of layer ``i``: ``gate_up_proj[e] = cat(gate_proj.W, up_proj.W)``,
    ``down_proj[e] = down_proj.W``. Attention, norms, embeddings, LM head and RoPE settings
    are copied; the router is zero (``router_init_std=0``) or ``N(0, router_init_std²)``.
    """
    _check_args(num_experts, top_k, router_init_std, noise_std)
    dc = dense_model.config
    if getattr(dc, "model_type", None) not in ("llama", "mistral"):
        raise ModelError(
            f"upcycle_llama_to_mixtral needs a Llama-architecture model, got `{getattr(dc, 'model_type', None)}`.",
            "pass a LlamaForCausalLM (e.g. SmolLM2).",
        )
    if getattr(dc, "attention_bias", False) or getattr(dc, "mlp_bias", False):
        raise ModelError("Mixtral has no attention/MLP biases; this Llama model uses them.", "use a bias-free model.")
    fields = {k: getattr(dc, k) for k in _LLAMA_TO_MIXTRAL if hasattr(dc, k)}
    rope = getattr(dc, "rope_parameters", None)
    config = MixtralConfig(
        **fields,
        rope_parameters=dict(rope) if rope is not None else None,
        sliding_window=getattr(dc, "sliding_window", None),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    gen = torch.Generator().manual_seed(seed)
    src = dense_model.state_dict()
    dtype = dense_model.dtype
    with no_init_weights():
        moe = MixtralForCausalLM(config).to(dtype)

    def source(key: str) -> torch.Tensor | None:
        if ".mlp." not in key:
            return src.get(key)
        prefix = key.split(".mlp.")[0] + ".mlp."
        if key.endswith("mlp.gate.weight"):
            return _router(num_experts, config.hidden_size, router_init_std, gen)
        if key.endswith("experts.gate_up_proj"):
            w = torch.cat([src[prefix + "gate_proj.weight"], src[prefix + "up_proj.weight"]], dim=0)
            return _experts(w, num_experts, noise_std, gen)
        if key.endswith("experts.down_proj"):
            return _experts(src[prefix + "down_proj.weight"], num_experts, noise_std, gen)
        return None

    _fill(moe, source)
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.config.architectures = ["MixtralForCausalLM"]
    moe.generation_config = getattr(dense_model, "generation_config", moe.generation_config)
    moe.train(dense_model.training)
    return moe


def upcycle_bert(
    dense_bert: PreTrainedModel,
    num_experts: int,
    top_k: int = 2,
    router_init_std: float = 0.0,
    noise_std: float = 0.0,
    seed: int = 0,
    num_labels: int = 4,
) -> BertMoeForFedTasks:
    """Upcycle a BERT encoder (``BertModel`` or any ``BertFor*``) into :class:`BertMoeForFedTasks`.

    Expert ``e``: ``up_proj[e] = intermediate.dense.W``, ``up_bias[e] = intermediate.dense.b``,
    ``down_proj[e] = output.dense.W``, ``down_bias[e] = output.dense.b``; every other encoder
    tensor is copied under the same name. The pooler is dropped (heads read the ``[CLS]``
    hidden state); the three task heads are freshly initialised (seeded by ``seed``).
    """
    _check_args(num_experts, top_k, router_init_std, noise_std)
    base = dense_bert.base_model
    dc = base.config
    if getattr(dc, "model_type", None) != "bert":
        raise ModelError(f"upcycle_bert needs a BERT model, got `{getattr(dc, 'model_type', None)}`.", "pass a BertModel.")
    if getattr(dc, "is_decoder", False):
        raise ModelError("upcycle_bert supports encoder-only BERT.", "pass a BERT encoder (is_decoder=False).")
    fields = {k: getattr(dc, k) for k in _BERT_FIELDS if hasattr(dc, k)}
    config = BertMoeConfig(
        **fields,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        router_init_std=router_init_std,
        num_labels=num_labels,
    )
    config.architectures = ["BertMoeForFedTasks"]
    torch.manual_seed(seed)
    moe = BertMoeForFedTasks(config).to(base.dtype)  # heads get a fresh (seeded) init
    heads = {k: v.detach().clone() for k, v in moe.state_dict().items() if not k.startswith("bert.")}
    gen = torch.Generator().manual_seed(seed)
    src = base.state_dict()

    def source(key: str) -> torch.Tensor | None:
        if key in heads:
            return heads[key]
        key = key.removeprefix("bert.")
        if ".mlp." not in key:
            return src.get(key)
        layer = key.split(".mlp.")[0]
        if key.endswith("mlp.gate.weight"):
            return _router(num_experts, config.hidden_size, router_init_std, gen)
        name = key.rsplit(".", 1)[1]
        dense_key, is_weight = {
            "up_proj": ("intermediate.dense.weight", True),
            "up_bias": ("intermediate.dense.bias", False),
            "down_proj": ("output.dense.weight", True),
            "down_bias": ("output.dense.bias", False),
        }[name]
        return _experts(src[f"{layer}.{dense_key}"], num_experts, noise_std if is_weight else 0.0, gen)

    _fill(moe, source)
    moe.train(dense_bert.training)
    return moe


__all__ = ["upcycle_bert", "upcycle_llama_to_mixtral"]
