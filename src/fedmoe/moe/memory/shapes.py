"""Per-token activation factors and the model shapes they are counted on (see the package docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedmoe.moe.families import MoEFamily, family_of


# --------------------------------------------------------------------------------------------
# activation shape and factors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationFactors:
    """Element counts per token of the activation terms (module docstring's table).

    The *kept* counts are the tensors the native modules save for backward; the *working-set*
    counts (``loss_grads``, ``scores_grads``, ``expert_grads``) are transient gradients at the
    peak of the backward pass; the loss counts depend on the loss implementation (presets
    :data:`HF_LOSS`, :data:`SMOOTHED_CE_LOSS`).
    """

    #: RMSNorm: its fp32 input (a copy in bf16) …
    norm_fp32: float = 1.0
    #: … the normalised value and the output (kept by the next linear); under LoRA the norm
    #: weight is frozen and the normalised value is not kept
    norm_act: float = 2.0
    norm_act_lora: float = 1.0
    #: attention keeps the query and the output projection's input (``attn_q`` each) …
    attn_q: float = 1.0
    #: … and the key and value (``attn_kv`` for both; eager attention repeats GQA heads)
    attn_kv: float = 2.0
    #: materialised attention: the softmax (fp32) per (head, query, key)
    scores: float = 1.0
    #: router probabilities (fp32), per token and kept expert
    router: float = 1.0
    #: routed experts, per (token, expert) pair: gathered input + expert output (``exp_h``·H) …
    exp_h: float = 2.0
    #: … and gate/up output (2I), activation and product (SwiGLU, ``exp_i_gated``·I), or for
    #: non-gated experts the activation's output (ReLU, 1) or its input and output (GELU, 2)
    exp_i_gated: float = 4.0
    exp_i_relu: float = 1.0
    exp_i_gelu: float = 2.0
    #: a gated MLP that is not adapted (shared experts, dense MLPs under LoRA) does not keep the
    #: input of its frozen down projection
    mlp_gated_frozen: float = 3.0
    #: LM head: the log-softmax output (fp32), besides the logits the model returns
    logits: float = 1.0
    #: loss extras: further fp32 copies of the log-probabilities kept through backward
    #: (``transformers``' own loss when the loop passes ``labels``) …
    loss_extra: float = 0.0
    #: … a copy of the logits in the activation dtype (a shifted slice, causal LMs) that lives
    #: only during the loss's *forward*: freed before backward starts, so it is not on top of
    #: the backward working set but an alternative to it (the larger of the two counts)
    shift_copy: float = 0.0
    #: … fp32 copies of the log-probabilities of the *supervised* tokens only, kept through
    #: backward (a loss that masks ignored labels first keeps its gathered rows; causal LMs
    #: supervise the target tokens, at most ``target_len`` per row; every decoder token of
    #: encoder-decoders) …
    loss_supervised: float = 0.0
    #: … and the backward working set on those rows (gradients of the masked and gathered
    #: log-probabilities, before they are scattered back to every token)
    loss_supervised_grads: float = 0.0
    #: working set at the start of backward: gradients of the log-softmax and of the logits (fp32)
    loss_grads: float = 2.0
    #: working set in a materialised attention's backward: gradients of probabilities and scores
    scores_grads: float = 2.0
    #: working set in an MoE layer's backward: gradients of its routed experts' activations,
    #: relative to what they keep
    expert_grads: float = 1.0
    #: LoRA on fused experts: merged weight ``W + B·A`` kept for backward, per merged weight byte
    lora_merge: float = 1.0


#: ``transformers``' cross-entropy (``out.loss``): what :func:`measure_training_step` trains with
HF_LOSS = ActivationFactors()
#: the project's client loop (``fedmoe.train.loop``): ``transformers``' own loss runs alongside
#: (the loop passes ``labels``) and keeps its log-softmax over every token (``loss_extra = 1``);
#: ``smoothed_ce`` copies the shifted logits (causal LMs; freed once its log-softmax exists:
#: ``shift_copy`` is a forward transient), keeps its gathered supervised rows
#: (``loss_supervised = 1``) and, in backward, three supervised-row gradients (masked_fill's,
#: gather's scatter and its zeros: ``loss_supervised_grads = 3``) before the two full-size
#: ones (``loss_grads``). Exact at tensor level on ``tiny-mixtral`` at 16 × 128 (fp32 and
#: bf16, ≤ 16 target tokens per row and every token supervised) and ``tiny-switch-transformers``
#: (live tensor bytes of one client-loop step, docs/memory.md "Calibration").
SMOOTHED_CE_LOSS = ActivationFactors(shift_copy=1.0, loss_extra=1.0, loss_supervised=1.0, loss_supervised_grads=3.0)


@dataclass(frozen=True)
class LayerSpec:
    """One transformer layer as the activation model sees it."""

    stack: str  #: "decoder" (decoder-only and encoder-decoder decoders) or "encoder"
    moe: bool  #: sparse MoE block (else a dense MLP, or none)
    num_norms: int  #: norms (= residual branches) of the layer: 2, or 3 with cross-attention
    cross_attention: bool = False
    dense_intermediate: int = 0  #: dense MLP width (0: none)


@dataclass(frozen=True)
class ModelShape:
    """The configuration numbers the activation terms depend on (read by :meth:`from_model`)."""

    hidden: int
    vocab: int  #: logits width of the LM head (0: no LM head, e.g. classification heads)
    num_heads: int
    q_dim: int  #: query width (heads × query head dim)
    k_dim: int  #: key width
    v_dim: int  #: value width (as stored)
    o_dim: int  #: attention output width (heads × value head dim)
    top_k: int
    expert_intermediate: int
    layers: tuple[LayerSpec, ...]
    qk_norm: int = 0  #: width of norms on q and k (Qwen3: per head, OLMoE: full width)
    extra_attn_norm: int = 0  #: width of latent norms in attention (DeepSeek-V3 MLA)
    extra_attn_saved: int = 0  #: other widths attention keeps (MLA: output copy, rope key)
    gated_experts: bool = True  #: SwiGLU experts (else a plain activation)
    activation: str = "silu"  #: activation of non-gated experts / MLPs ("relu" keeps its output only)
    shared_intermediate: int = 0  #: shared expert width per MoE layer (0: none)
    shared_gate: bool = False  #: Qwen2-MoE's sigmoid gate on the shared expert
    eager_attention: bool = False  #: scores materialised (eager attention)
    encoder_decoder: bool = False
    norm_kind: str = "rms"  #: "rms" (RMSNorm / T5 LayerNorm) or "layer" (nn.LayerNorm)
    dropout: float = 0.0  #: residual-branch (and embedding/final) dropout
    attn_dropout: float = 0.0  #: attention-probability dropout (materialises scores on CPU SDPA)
    mlp_dropout: float = 0.0  #: dropout inside non-gated MLPs/experts
    router_jitter: bool = False  #: multiplicative router noise in training (noise kept, N × H)
    embed_norm: bool = False  #: a norm (+ dropout) on the embeddings (BERT)
    extra_dropouts: int = 0  #: further dropouts over N × H outside the layers (embeddings, heads)

    @property
    def moe_layers(self) -> int:
        return sum(1 for s in self.layers if s.moe)

    @property
    def materialised_scores(self) -> bool:
        return self.eager_attention or self.attn_dropout > 0

    @classmethod
    def from_model(cls, model: nn.Module, family: MoEFamily | None = None) -> ModelShape:
        """Read the shape from ``model.config`` (and the MoE block positions from the model)."""
        family = family or family_of(model)
        cfg = model.config
        if cfg.model_type == "switch_transformers":
            return _switch_shape(model, family, cfg)
        if cfg.model_type == "bert_moe":
            return _bert_shape(model, family, cfg)
        return _decoder_shape(model, family, cfg)


def _lm_vocab(model: nn.Module) -> int:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return int(head.weight.shape[0]) if head is not None else 0


def _eager(cfg: Any) -> bool:
    return getattr(cfg, "_attn_implementation", None) in (None, "eager")


def _moe_layer_flags(model: nn.Module, family: MoEFamily, n_layers: int) -> list[bool]:
    """Which of the ``n_layers`` transformer layers hold an MoE block (by module path)."""
    paths = [b.path for b in family.blocks(model)]
    flags = []
    for idx in range(n_layers):
        pat = re.compile(rf"(^|\.)(layers|layer|block)\.{idx}\.")
        flags.append(any(pat.search(p) for p in paths))
    if sum(flags) != len(paths):  # unknown layout: the first len(paths) layers
        flags = [i < len(paths) for i in range(n_layers)]
    return flags


def _decoder_shape(model: nn.Module, family: MoEFamily, cfg: Any) -> ModelShape:
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    q_dim = o_dim = heads * head_dim
    k_dim = v_dim = kv_heads * head_dim
    qk_norm = extra = extra_saved = 0
    mt = cfg.model_type
    if mt in ("qwen3_moe", "olmoe"):  # RMSNorm on q and k (Qwen3 per head, OLMoE full width)
        qk_norm = q_dim + k_dim
    elif mt == "deepseek_v3":  # multi-head latent attention
        qk = int(cfg.qk_nope_head_dim) + int(cfg.qk_rope_head_dim)
        q_dim = k_dim = heads * qk
        v_dim = heads * (int(cfg.qk_nope_head_dim) + int(cfg.v_head_dim))  # kv_b_proj output, v is a view
        o_dim = heads * int(cfg.v_head_dim)
        extra = int(getattr(cfg, "q_lora_rank", 0) or 0) + int(cfg.kv_lora_rank)
        extra_saved = o_dim + int(cfg.qk_rope_head_dim)  # contiguous output copy, rope key storage
    blocks = family.blocks(model)
    n_layers = int(cfg.num_hidden_layers)
    inter = int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
    shared = 0
    if getattr(cfg, "shared_expert_intermediate_size", None):
        shared = int(cfg.shared_expert_intermediate_size)
    elif getattr(cfg, "n_shared_experts", None):
        shared = int(cfg.n_shared_experts) * int(cfg.moe_intermediate_size)
    layers = tuple(
        LayerSpec("decoder", moe, 2, dense_intermediate=0 if moe else int(cfg.intermediate_size))
        for moe in _moe_layer_flags(model, family, n_layers)
    )
    return ModelShape(
        hidden=hidden, vocab=_lm_vocab(model), num_heads=heads, q_dim=q_dim, k_dim=k_dim, v_dim=v_dim,
        o_dim=o_dim, top_k=max((b.top_k for b in blocks), default=1), expert_intermediate=inter, layers=layers,
        qk_norm=qk_norm, extra_attn_norm=extra, extra_attn_saved=extra_saved,
        gated_experts=any("gate" in n for n in family.fused_expert_tensors) or not family.fused,
        activation=str(getattr(cfg, "hidden_act", "silu")), shared_intermediate=shared,
        shared_gate=mt == "qwen2_moe", eager_attention=_eager(cfg),
        attn_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
        router_jitter=float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0) > 0,
    )


def _switch_shape(model: nn.Module, family: MoEFamily, cfg: Any) -> ModelShape:
    inner = int(cfg.num_heads) * int(cfg.d_kv)
    paths = [b.path for b in family.blocks(model)]
    layers = []
    for stack, n, norms in (("encoder", int(cfg.num_layers), 2), ("decoder", int(cfg.num_decoder_layers), 3)):
        for idx in range(n):
            moe = any(p.startswith(f"{stack}.block.{idx}.") for p in paths)
            layers.append(LayerSpec(stack, moe, norms, cross_attention=stack == "decoder",
                                    dense_intermediate=0 if moe else int(cfg.d_ff)))
    p = float(getattr(cfg, "dropout_rate", 0.0) or 0.0)
    return ModelShape(
        hidden=int(cfg.d_model), vocab=_lm_vocab(model), num_heads=int(cfg.num_heads), q_dim=inner, k_dim=inner,
        v_dim=inner, o_dim=inner, top_k=1, expert_intermediate=int(cfg.d_ff), layers=tuple(layers),
        gated_experts=False, activation=str(getattr(cfg, "dense_act_fn", "relu")), eager_attention=True,
        encoder_decoder=True, dropout=p, attn_dropout=p, mlp_dropout=p,
        router_jitter=float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0) > 0,
        extra_dropouts=4 if p > 0 else 0,  # embeddings and final dropouts of both stacks
    )


def _bert_shape(model: nn.Module, family: MoEFamily, cfg: Any) -> ModelShape:
    hidden = int(cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    blocks = family.blocks(model)
    layers = tuple(LayerSpec("decoder", moe, 2) for moe in _moe_layer_flags(model, family, n_layers))
    p = float(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
    return ModelShape(
        hidden=hidden, vocab=_lm_vocab(model), num_heads=int(cfg.num_attention_heads), q_dim=hidden, k_dim=hidden,
        v_dim=hidden, o_dim=hidden, top_k=max((b.top_k for b in blocks), default=1),
        expert_intermediate=int(cfg.intermediate_size), layers=layers, gated_experts=False,
        activation=str(getattr(cfg, "hidden_act", "gelu")), eager_attention=_eager(cfg), norm_kind="layer",
        dropout=p, attn_dropout=float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0),
        embed_norm=True, extra_dropouts=(1 if p > 0 else 0),  # the heads' input dropout
    )
