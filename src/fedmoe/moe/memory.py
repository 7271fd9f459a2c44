"""What training a (sub-)MoE costs in memory, and how to measure it (ALGORITHMS.md §1 stage 1 step 3).

FedMoE's θ search prices a submodel as ``mem(dense part) + Σ mem(kept experts)`` and compares
it with a client's budget. ``mem`` is what *training* the submodel costs — weights, gradients
and optimiser state of what is trained, and the activations of one batch — not just weights.
This module states that cost as a formula, splits it per unit so that it is additive, and
measures real peaks to check it (tests/moe/test_memory.py, benchmarks/memory/).

The formula (one training step, at its peak)
--------------------------------------------
::

    mem = W_frozen + W_train + G + O + A

    W_frozen  weights that are not trained: every base weight under LoRA, nothing under full FT
    W_train   trained tensors: every weight (full FT), or the LoRA adapters + router weights +
              task heads (LoRA); adapters are fp32 (peft's default ``autocast_adapter_dtype``)
    G       = W_train                        one gradient per trained element, same dtype
    O       = n_states · s · n_train         AdamW: n_states = 2 (exp_avg, exp_avg_sq); s = bytes per
                                             state element — the trained tensor's dtype by default,
                                             as torch's AdamW; pass 4 for fp32 master states
            + t · W_train                    optimiser-step temporaries: t = 0 for the fused AdamW and
                                             the for-loop one (one tensor at a time, neglected), t = 1
                                             for the multi-tensor ``foreach`` AdamW (torch's default on
                                             CUDA: one temporary list as large as the trained tensors)
    A       = activations kept for backward + the backward working set at the peak, for a batch of
              B sequences of S tokens (N = B·S), see below.

All five terms are live together in the *steady-state* step: from the second step on the
optimiser state exists during forward/backward, and with ``zero_grad(set_to_none=False)``
gradients stay allocated between steps; the peak is then at the start of the backward pass.
With ``set_to_none=True`` (``fedmoe.train.loop``) gradients only appear while activations are
being freed, so the true peak is lower — by up to ``G`` (≈ W under full FT, ≈ nothing under
LoRA): the formula is an upper bound there.

Activations ``A``
-----------------
Counted per token from the configuration (:class:`ModelShape`), in bytes; ``a`` = activation
dtype bytes (the parameter dtype), ``4`` where the model computes in fp32 regardless. Each count
is a tensor that the native ``transformers`` module keeps for backward (read off
``torch.autograd.graph.saved_tensors_hooks``, checked per family in the tests); the factors are
in :class:`ActivationFactors`:

================== =============================================================== =====================
term               bytes per token (per layer unless noted)                        factors
================== =============================================================== =====================
norms              RMSNorm ``H·(4·norm_fp32 + a·norm_act)`` (fp32 input, normalised, norm_fp32 = 1,
                   output); LayerNorm ``2·a·H + 8`` (input, output, mean/rstd)       norm_act = 2 (1 LoRA)
attention          ``a·attn_q·(q + o) + a·attn_kv·(k + v)/2``, + ``4·n_heads``       attn_q = 1, attn_kv = 2
                   (log-sum-exp) for fused SDPA kernels
attention scores   materialised (eager, or SDPA with dropout): ``n_heads·S_kv·4``    scores = 1
                   per query, + mask and dropped copy (``2a``) with dropout
q/k norms, MLA     norms on q/k (Qwen3, OLMoE), latent norms and copies (DeepSeek-V3)
router             ``4·router·E_kept`` (fp32 probabilities) — per kept expert         router = 1
routed experts     ``top_k · (a·(exp_h·H + exp_i·I) + 28)`` (28: sort/gather         exp_h = 2,
                   indices, routing weight) + ``12·top_k`` (top-k ids and weights)   exp_i = 4 SwiGLU,
                                                                                   1 ReLU, 2 GELU
shared/dense MLP   ``a·mlp·I`` (+ ``a·(H + 1)`` for Qwen2-MoE's gated shared expert) mlp = 4 (3 if frozen)
dropout            ``a·H`` per residual dropout (CPU keeps a float mask)
LoRA linear        ``a·r`` per adapted linear (its ``lora_A`` output)
logits, loss       once, ``V·(a + 4·logits)`` (returned logits, log-softmax), + the   logits = 1,
                   loss's extras ``V·(a·shift_copy + 4·loss_extra)``                  see presets
================== =============================================================== =====================

plus the **backward working set** at the peak, the largest of: the loss gradients
``4·loss_grads·V`` per output token (log-softmax and logits gradients), one materialised
attention's score gradients, one MoE layer's expert-activation gradients. And, under LoRA on
fused experts, the merged weight ``W + B·A`` that peft's ``ParamWrapper`` materialises and the
grouped GEMM keeps for backward: ``lora_merge · W_expert`` per kept expert.

The loss terms depend on the loss implementation: :data:`HF_LOSS` is ``transformers``' own
cross-entropy (``out.loss``); :data:`SMOOTHED_CE_LOSS` is the project's client loop
(``fedmoe.train.loop``): its label-smoothed cross-entropy on shifted logits keeps a shifted copy
of the logits (causal LMs) and more fp32 copies of the log-probabilities at the peak, and the
model's own loss runs alongside (the loop passes ``labels``) — calibrated by measuring both
losses on the same models (benchmarks/memory/results.md).

Calibration and accuracy (benchmarks/memory/results.md): the kept-tensor counts match autograd's
saved tensors to 0.998–1.000 for the decoder-only families under full FT (1.01–1.02 under LoRA,
whose first norm keeps less) and within 2.5 % for Switch, DeepSeek-V3 and BERT-MoE
(tests/moe/test_memory.py checks ±8 %). Against measured peaks of the steady-state step (CPU
VmHWM, 7 families, full FT and LoRA): predicted/measured = 0.94–1.02; 0.99–1.02 with MKL's
GEMM-buffer cache off — MKL keeps its packing buffers resident after a GEMM (10–25 MiB here, shows
under full FT), which no tensor accounts for. The project's client loop (:data:`SMOOTHED_CE_LOSS`,
``set_to_none=True``, for-loop AdamW): LoRA 1.01–1.02, full FT 1.05–1.17 (the upper bound above).
Approximations: bf16/fp16 use ``a`` throughout except where fp32 is structural; dropout masks are
counted in ``a`` (CPU keeps float masks, CUDA 1-byte ones); fused SDPA kernels keep no scores.
Not modelled: transient weight gradients of one layer under full FT (a fused expert stack, the
LM head) — they occur after the loss working set is freed and are smaller in these models.

Additive split (the θ search needs ``mem = mem(dense) + Σ_kept mem(expert)``)
----------------------------------------------------------------------------
* **expert (i, j)**: its weight slices and its router rows (+ their gradients and AdamW state
  under full FT); under LoRA its adapter factors (weights, gradients, state), the gradients and
  state of its router rows and its merged weight (fused experts); plus its column of router
  probabilities, ``4·N`` bytes.
* **dense part**: everything else — including the routed experts' activations. Those scale
  with the number of (token, expert) pairs, ``N·top_k`` per MoE layer, not with how many
  experts are kept (the tokens are shared among whichever experts are kept), so they are
  charged once per layer to the dense part with the full model's ``top_k`` — an upper bound
  when a layer keeps fewer than ``top_k`` experts (top-k is clipped). Charging them per
  expert would need each expert's load: a uniform ``top_k/E_kept`` share is not additive (it
  depends on the kept count) and the worst case (every token on every kept expert) overstates
  by ``E_kept/top_k``.

:func:`training_table` gives that split for a concrete model as a :class:`MemoryTable`;
``table.submodel_bytes(kept)`` prices any submodel without building it and equals
:func:`estimate_for_model` of the extracted sub-MoE exactly (when every layer keeps at least
``top_k`` experts). :func:`unit_training_bytes` is the same split in the form
``fedmoe.engine.budget`` asks for.

Measuring
---------
:func:`measure_peak` measures the peak of a callable (CUDA: allocator peak; CPU: the process's
VmHWM high-water mark). :func:`measure_training_step` measures materialising a model and
training it for a steady-state step from a baseline taken *before* the model exists, so weights
are included; :func:`measure_in_subprocess` does so in a fresh process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import inspect
import math
import os
import re
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from fedmoe.errors import ModelError
from fedmoe.moe.families import MoEFamily, family_of

T = TypeVar("T")
Finetune = Literal["full", "lora"]
AdamImpl = Literal["fused", "foreach", "for-loop"]

#: optimiser-step temporaries per trained byte, by AdamW implementation (module docstring)
OPTIMIZER_TRANSIENT: dict[str, float] = {"fused": 0.0, "for-loop": 0.0, "foreach": 1.0}
#: bytes per routed (token, expert) pair of index bookkeeping in the grouped experts: sort
#: permutation, gather index and inverse permutation (int64) and the routing weight (fp32)
ROUTING_INDEX_BYTES = 3 * 8 + 4
#: bytes per token and top-k slot the router keeps: expert id (int64) + weight (fp32)
ROUTER_TOPK_BYTES = 8 + 4


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# weights per unit
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryTable:
    """An additive memory table: ``dense_bytes`` plus ``expert_bytes[i, j]`` per (layer, expert).

    ``expert_bytes`` is ``[L, max E]`` (int64); entries past a layer's ``num_experts[i]`` are 0.
    """

    dense_bytes: int
    expert_bytes: np.ndarray
    num_experts: tuple[int, ...]

    def total(self) -> int:
        """Bytes of the whole model: dense + every expert."""
        return self.dense_bytes + int(self.expert_bytes.sum())

    def submodel_bytes(self, kept: Iterable[Iterable[int]]) -> int:
        """``dense_bytes + Σ_{(i, j) kept} expert_bytes[i, j]``; ``kept[i]`` = expert ids of layer i."""
        sets = [[int(j) for j in k] for k in kept]
        if len(sets) != len(self.num_experts):
            raise ValueError(f"kept covers {len(sets)} MoE layers, the table has {len(self.num_experts)}.")
        parts = []
        for i, ids in enumerate(sets):
            for j in ids:
                if not 0 <= j < self.num_experts[i]:
                    raise ValueError(f"expert {j} is out of range for layer {i} ({self.num_experts[i]} experts).")
                parts.append(int(self.expert_bytes[i, j]))
        return submodel_training_bytes(self.dense_bytes, parts)


def submodel_training_bytes(dense_bytes_part: float, expert_bytes_kept: Iterable[float]) -> int:
    """``mem = mem(dense part) + Σ mem(kept experts)`` (ALGORITHMS.md §1 stage 1 step 3).

    The parts come from :func:`training_table` (training cost) or :func:`param_bytes_by_unit`
    (weights only); nothing is shared between parts, so the sum is the whole cost.
    """
    return int(round(float(dense_bytes_part) + sum(float(b) for b in expert_bytes_kept)))


def _check_unwrapped(model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise ModelError(
            "Memory tables take the base model, not a peft-wrapped one.",
            "pass the model before apply_lora; LoRA adapters are priced from lora_r.",
        )


def _unit_elements(model: nn.Module, family: MoEFamily) -> tuple[dict[str, torch.Tensor], list[list[dict[str, int]]]]:
    """All tensors (parameters + buffers, each once) and, per layer and expert, how many
    elements of which tensor it owns (its expert slices and router rows)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            tensors[name] = t
    owned: list[list[dict[str, int]]] = []
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        layer = []
        for j in range(info.num_experts):
            counts: dict[str, int] = {}
            for s in family.expert_slices(info.path, block, j) + family.router_slices(info.path, block, j):
                t = tensors.get(s.key)
                if t is not None:
                    n = t.numel() if s.dim is None else t.numel() // t.shape[s.dim] * len(s.index)
                    counts[s.key] = counts.get(s.key, 0) + n
            layer.append(counts)
        owned.append(layer)
    return tensors, owned


def _table(dense: int, per_expert: list[list[int]]) -> MemoryTable:
    counts = tuple(len(layer) for layer in per_expert)
    arr = np.zeros((len(per_expert), max(counts, default=0)), dtype=np.int64)
    for i, layer in enumerate(per_expert):
        arr[i, : len(layer)] = layer
    return MemoryTable(int(dense), arr, counts)


def param_bytes_by_unit(model: nn.Module, family: MoEFamily | None = None) -> MemoryTable:
    """Weight bytes of a (sub-)MoE split into the dense part and each expert ``[L, E]``.

    An expert's bytes are its expert tensors (row ``j`` of fused ``[E, …]`` parameters, or every
    tensor of its own module) **and its router rows** (weight row, bias / score-correction
    entry): a submodel holds exactly the router rows of its kept experts. Everything else is
    dense: embeddings, attention, norms, LM head, shared experts, dense MLPs, task heads.
    Buffers count like parameters; tied tensors count once, so ``table.total()`` equals the
    model's parameter + buffer bytes exactly.
    """
    _check_unwrapped(model)
    family = family or family_of(model)
    tensors, owned = _unit_elements(model, family)
    per_expert = [[sum(tensors[k].element_size() * n for k, n in c.items()) for c in layer] for layer in owned]
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return _table(total - sum(map(sum, per_expert)), per_expert)


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
    #: loss extras at the peak: copies of the logits in the activation dtype (a shifted slice for
    #: causal LMs) and further fp32 copies of the log-probabilities
    shift_copy: float = 0.0
    loss_extra: float = 0.0
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
#: the project's client loop (``fedmoe.train.loop``): ``smoothed_ce`` on shifted logits keeps a
#: shifted copy of the logits (causal LMs) and 1.5 fp32 copies of the log-probabilities more at
#: the peak, and since the loop passes ``labels`` to the model, ``transformers``' own loss keeps
#: its log-softmax too (+1): ``loss_extra = 2.5`` (measured: 2.46 + shift copy causal, 2.49 seq2seq)
SMOOTHED_CE_LOSS = ActivationFactors(shift_copy=1.0, loss_extra=2.5)


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


# --------------------------------------------------------------------------------------------
# the training-memory model
# --------------------------------------------------------------------------------------------
def training_bytes(
    *,
    frozen_param_bytes: float,
    trainable_param_bytes: float,
    trainable_elements: float,
    activation_bytes: float,
    optimizer_states: int = 2,
    state_bytes: float | None = None,
    optimizer_transient: float = 0.0,
) -> int:
    """``W_frozen + W_train + G + O + A`` (module docstring).

    ``G = W_train``; ``O = optimizer_states · s · trainable_elements + optimizer_transient · W_train``
    with ``s = state_bytes``, or the trained tensors' element size when ``None`` (torch's AdamW).
    """
    s = state_bytes if state_bytes is not None else (trainable_param_bytes / trainable_elements if trainable_elements else 0.0)
    opt = optimizer_states * s * trainable_elements + optimizer_transient * trainable_param_bytes
    return int(round(frozen_param_bytes + 2 * trainable_param_bytes + opt + activation_bytes))


@dataclass(frozen=True)
class TrainingMemoryModel:
    """The memory model for one training configuration (batch, sequence, fine-tuning mode).

    ``act_bytes``: the activation dtype's element size (the parameter dtype); ``adapter_bytes``:
    the LoRA adapters' (fp32, peft's default). ``target_len``: decoder length of encoder-decoder
    models (default ``seq_len``). ``factors``: :data:`HF_LOSS` (default, ``out.loss``) or
    :data:`SMOOTHED_CE_LOSS` (``fedmoe.train.loop``), or calibrated ones of your own.
    """

    shape: ModelShape
    batch_size: int
    seq_len: int
    finetune: Finetune = "lora"
    lora_r: int = 8
    act_bytes: int = 4
    adapter_bytes: int = 4
    optimizer_states: int = 2
    state_bytes: float | None = None
    adam_impl: AdamImpl = "fused"
    target_len: int | None = None
    factors: ActivationFactors = field(default_factory=ActivationFactors)

    def __post_init__(self) -> None:
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {self.finetune!r}.")
        if self.adam_impl not in OPTIMIZER_TRANSIENT:
            raise ValueError(f"adam_impl must be one of {sorted(OPTIMIZER_TRANSIENT)}, got {self.adam_impl!r}.")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size}, {self.seq_len}.")

    # -- tokens ------------------------------------------------------------------------------
    def tokens(self, stack: str = "decoder") -> int:
        """Tokens per batch in a stack (encoder-decoder decoders: ``B·target_len``)."""
        if self.shape.encoder_decoder and stack == "decoder":
            return self.batch_size * (self.target_len or self.seq_len)
        return self.batch_size * self.seq_len

    def moe_layer_tokens(self) -> list[int]:
        """Tokens each MoE layer routes, in MoE-layer order."""
        return [self.tokens(s.stack) for s in self.shape.layers if s.moe]

    # -- weights / optimiser -------------------------------------------------------------------
    def trained_cost(self, param_bytes: float, elements: float) -> float:
        """``G + O`` of trained tensors (their weights are counted separately)."""
        s = self.state_bytes if self.state_bytes is not None else (param_bytes / elements if elements else 0.0)
        return param_bytes + self.optimizer_states * s * elements + OPTIMIZER_TRANSIENT[self.adam_impl] * param_bytes

    def adapter_cost(self, elements: float) -> float:
        """LoRA adapter weights + ``G + O``."""
        b = self.adapter_bytes * elements
        return b + self.trained_cost(b, elements)

    # -- activations ---------------------------------------------------------------------------
    def activation_terms(self, lora_attn_linears: float = 0.0, lora_expert_linears: float = 0.0) -> dict[str, float]:
        """The dense part's activation bytes by term: kept for backward (``norms``, ``attention``,
        ``scores``, ``experts``, ``mlp``, ``lora``, ``dropout``, ``logits``, ``head``) and the
        backward working set at the peak (``working_set``: the largest of the loss gradients,
        one materialised attention's score gradients, one MoE layer's expert gradients).

        ``lora_attn_linears``: LoRA-adapted attention linears per layer (mean);
        ``lora_expert_linears``: adapted linears per per-module expert (their ``lora_A`` outputs
        scale with the routed tokens).
        """
        sh, f, a = self.shape, self.factors, self.act_bytes
        lora = self.finetune == "lora"
        mask = a  # CPU dropout keeps a mask in the activation dtype
        if sh.norm_kind == "layer":
            norm_tok = 2 * a * sh.hidden + 8
        else:
            norm_tok = sh.hidden * (4 * f.norm_fp32 + a * (f.norm_act_lora if lora else f.norm_act)) + 4
        gated_mlp = f.mlp_gated_frozen if lora else f.exp_i_gated
        plain_i = f.exp_i_relu if sh.activation == "relu" else f.exp_i_gelu
        terms = dict.fromkeys(("norms", "attention", "scores", "experts", "mlp", "lora", "dropout", "logits", "head"), 0.0)
        work_scores = work_experts = 0.0

        def plain_mlp(width: int) -> float:  # non-gated activation (+ dropout mask and dropped copy)
            return a * plain_i * width + ((mask + a) * width if sh.mlp_dropout > 0 else 0.0)

        def attention(tokens: int, kv_len: int, kv_tokens: int, self_attention: bool) -> None:
            nonlocal work_scores
            # materialised attention repeats GQA's key/value heads
            kv_w = 2 * sh.q_dim if sh.materialised_scores and sh.k_dim < sh.q_dim else sh.k_dim + sh.v_dim
            lse = 0 if sh.materialised_scores else 4 * sh.num_heads
            terms["attention"] += tokens * (a * f.attn_q * (sh.q_dim + sh.o_dim) + lse)
            terms["attention"] += kv_tokens * a * f.attn_kv * kv_w / 2
            if self_attention:  # norm outputs are q/k themselves (qk-norms) or a projection's input (MLA)
                terms["attention"] += tokens * ((norm_tok / sh.hidden - a) * sh.qk_norm
                                                + norm_tok / sh.hidden * sh.extra_attn_norm + a * sh.extra_attn_saved)
            if sh.materialised_scores:
                probs = tokens * sh.num_heads * kv_len
                terms["scores"] += probs * (4 * f.scores + ((mask + a) if sh.attn_dropout > 0 else 0.0))
                work_scores = max(work_scores, probs * a * f.scores_grads)

        enc_tokens = self.tokens("encoder")
        for spec in sh.layers:
            n = self.tokens(spec.stack)
            length = n // self.batch_size
            terms["norms"] += n * spec.num_norms * norm_tok
            attention(n, length, n, True)
            if spec.cross_attention:  # queries from the decoder, keys/values over the encoder output
                attention(n, self.seq_len, enc_tokens, False)
            if sh.dropout > 0:  # residual-branch dropout masks
                terms["dropout"] += n * spec.num_norms * sh.hidden * mask
            if lora:
                terms["lora"] += n * a * self.lora_r * lora_attn_linears
            if spec.moe:
                k = sh.top_k
                if sh.gated_experts:
                    e = a * (f.exp_h * sh.hidden + f.exp_i_gated * sh.expert_intermediate)
                else:
                    e = a * f.exp_h * sh.hidden + plain_mlp(sh.expert_intermediate)
                terms["experts"] += n * k * (e + ROUTING_INDEX_BYTES) + n * (k * ROUTER_TOPK_BYTES + 4)
                terms["experts"] += n * a * sh.hidden if sh.router_jitter else 0.0
                work_experts = max(work_experts, n * k * e * f.expert_grads)
                if lora and lora_expert_linears:
                    terms["lora"] += n * k * a * self.lora_r * lora_expert_linears
                if sh.shared_intermediate:
                    terms["mlp"] += n * a * (gated_mlp * sh.shared_intermediate + (sh.hidden + 1 if sh.shared_gate else 0))
            elif spec.dense_intermediate:
                w = spec.dense_intermediate
                terms["mlp"] += n * (a * gated_mlp * w if sh.gated_experts else plain_mlp(w))
        out = self.tokens("decoder")
        # the final norm (pre-norm models; both stacks of encoder-decoders) or the embedding norm (BERT)
        terms["head"] += out * norm_tok + (enc_tokens * norm_tok if sh.encoder_decoder else 0.0)
        terms["dropout"] += (sh.extra_dropouts + (1 if sh.embed_norm and sh.dropout > 0 else 0)) * out * sh.hidden * mask
        shift = f.shift_copy if not sh.encoder_decoder else 0.0
        terms["logits"] = out * sh.vocab * a  # returned by the model, held through backward
        terms["head"] += out * sh.vocab * (4 * f.logits + a * shift + 4 * f.loss_extra) + out * 16  # + ids, labels
        terms["working_set"] = max(out * sh.vocab * 4 * f.loss_grads, work_scores, work_experts)
        return terms

    def dense_activation_bytes(self, lora_attn_linears: float = 0.0, lora_expert_linears: float = 0.0) -> int:
        """Activation bytes of the dense part: the sum of :meth:`activation_terms`."""
        return int(round(sum(self.activation_terms(lora_attn_linears, lora_expert_linears).values())))

    def expert_activation_bytes(self, tokens: int, merged_weight_bytes: float = 0.0) -> float:
        """Activations of one kept expert: its router-probability column (fp32, per token) and,
        under LoRA on fused experts, its merged weight kept for backward."""
        b = 4 * self.factors.router * tokens
        if self.finetune == "lora":
            b += self.factors.lora_merge * merged_weight_bytes
        return b


# --------------------------------------------------------------------------------------------
# a concrete model: the additive training table
# --------------------------------------------------------------------------------------------
def _attention_regex(family: MoEFamily) -> re.Pattern[str]:
    """The attention projections LoRA adapts (as :func:`fedmoe.moe.lora.lora_config`)."""
    attn = "|".join(re.escape(n) for n in family.attention_modules)
    return re.compile(rf".*\.({attn})$")


def _lora_targets(model: nn.Module, family: MoEFamily) -> tuple[int, int, dict[tuple[int, int], tuple[int, int]]]:
    """(attention adapter elements per unit rank, adapted attention linears,
    {(i, j): (expert adapter elements per unit rank, bytes of its merged weights)}).

    Mirrors :func:`fedmoe.moe.lora.lora_config`: LoRA on the family's attention projections and
    on every expert matrix (3-D fused tensors, merged per forward; or ``wi``/``wo`` of per-module
    experts, ordinary LoRA).
    """
    attn_re = _attention_regex(family)
    attn_elems = attn_count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and attn_re.fullmatch(name) and ".experts." not in name:
            attn_elems += mod.in_features + mod.out_features
            attn_count += 1
    expert: dict[tuple[int, int], tuple[int, int]] = {}
    for info in family.blocks(model):
        block = model.get_submodule(info.path)
        for j in range(info.num_experts):
            if family.fused:
                n = merged = 0
                for tname in family.fused_expert_tensors:
                    t = getattr(block.experts, tname)
                    if t.dim() == 3:
                        n += t.shape[1] + t.shape[2]
                        merged += t.shape[1] * t.shape[2] * t.element_size()
            else:
                sub = block.experts.get_submodule(family.per_expert_module.format(j=j))
                n = sum(m.in_features + m.out_features for nm, m in sub.named_modules()
                        if isinstance(m, nn.Linear) and nm.rsplit(".", 1)[-1] in ("wi", "wo"))
                merged = 0
            expert[(info.index, j)] = (n, merged)
    return attn_elems, attn_count, expert


def _is_head(name: str) -> bool:
    from fedmoe.moe.lora import HEAD_PATTERNS

    return any(f"{h}." in name or name.startswith(h) for h in HEAD_PATTERNS)


def memory_model_for(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    **kwargs: Any,
) -> TrainingMemoryModel:
    """The :class:`TrainingMemoryModel` of a concrete model (shape read from its config;
    ``act_bytes`` from its parameter dtype unless given)."""
    family = family or family_of(model)
    kwargs.setdefault("act_bytes", dtype_bytes(next(model.parameters()).dtype))
    return TrainingMemoryModel(ModelShape.from_model(model, family), batch_size, seq_len, finetune, lora_r, **kwargs)


@dataclass
class _UnitCosts:
    """Training bytes of one unit (the dense part or one expert) by component."""

    weights: float = 0.0  #: frozen + trained weights
    trained: float = 0.0  #: gradients + optimiser state of trained weights
    adapters: float = 0.0  #: LoRA adapter weights + gradients + optimiser state
    activations: float = 0.0

    def total(self) -> int:
        return int(round(self.weights + self.trained + self.adapters + self.activations))


def _unit_costs(
    model: nn.Module, family: MoEFamily, mm: TrainingMemoryModel
) -> tuple[_UnitCosts, list[list[_UnitCosts]], dict[str, float], int]:
    """(dense part, per-expert costs, dense activation terms, trained elements)."""
    tensors, owned = _unit_elements(model, family)
    params = {id(p) for p in model.parameters()}
    blocks = family.blocks(model)
    moe_tokens = mm.moe_layer_tokens()
    if len(moe_tokens) != len(blocks):  # layer specs could not be matched to the blocks
        moe_tokens = [mm.tokens()] * len(blocks)
    owned_by_key: dict[str, int] = {}
    for layer in owned:
        for c in layer:
            for k, n in c.items():
                owned_by_key[k] = owned_by_key.get(k, 0) + n
    router_keys = {s.key for info in blocks for s in family.router_slices(info.path, model.get_submodule(info.path), 0)}
    lora = mm.finetune == "lora"

    def trained(key: str, t: torch.Tensor) -> bool:
        return id(t) in params and (not lora or key in router_keys or _is_head(key))

    dense = _UnitCosts()
    d_bytes = d_elems = 0.0
    for key, t in tensors.items():
        n = t.numel() - owned_by_key.get(key, 0)
        dense.weights += n * t.element_size()
        if trained(key, t):
            d_bytes += n * t.element_size()
            d_elems += n
    dense.trained = mm.trained_cost(d_bytes, d_elems)
    trained_elems = d_elems

    attn_elems, attn_count, expert_lora = _lora_targets(model, family) if lora else (0, 0, {})
    if lora:
        dense.adapters = mm.adapter_cost(mm.lora_r * attn_elems)
        trained_elems += mm.lora_r * attn_elems
    per_layer_attn = attn_count / max(1, len(mm.shape.layers)) if lora else 0.0
    per_module_lora = 0.0 if family.fused else 2.0  # LoRA on wi and wo of per-module experts
    terms = mm.activation_terms(per_layer_attn, per_module_lora)
    dense.activations = sum(terms.values())

    experts: list[list[_UnitCosts]] = []
    for info, layer in zip(blocks, owned, strict=True):
        row = []
        for j, c in enumerate(layer):
            u = _UnitCosts()
            e_bytes = e_elems = 0.0
            for key, n in c.items():
                t = tensors[key]
                u.weights += n * t.element_size()
                if trained(key, t):
                    e_bytes += n * t.element_size()
                    e_elems += n
            u.trained = mm.trained_cost(e_bytes, e_elems)
            trained_elems += e_elems
            n_adapter, merged = expert_lora.get((info.index, j), (0, 0))
            if lora:
                u.adapters = mm.adapter_cost(mm.lora_r * n_adapter)
                trained_elems += mm.lora_r * n_adapter
            u.activations = mm.expert_activation_bytes(moe_tokens[info.index], merged)
            row.append(u)
        experts.append(row)
    return dense, experts, terms, int(trained_elems)


def training_table(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    memory_model: TrainingMemoryModel | None = None,
    **kwargs: Any,
) -> MemoryTable:
    """Training bytes of a (sub-)MoE split additively: dense part + each expert ``[L, E]``.

    ``table.submodel_bytes(kept)`` is the training memory of the submodel keeping ``kept``
    (module docstring: what each part holds); ``table.total()`` is :func:`estimate_for_model`.
    ``kwargs`` go to :class:`TrainingMemoryModel` (``adam_impl``, ``state_bytes``,
    ``adapter_bytes``, ``target_len``, ``factors`` …).
    """
    _check_unwrapped(model)
    family = family or family_of(model)
    mm = memory_model or memory_model_for(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    dense, experts, _, _ = _unit_costs(model, family, mm)
    return _table(dense.total(), [[u.total() for u in row] for row in experts])


def estimate_for_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    **kwargs: Any,
) -> int:
    """Training bytes of one steady-state step of ``model`` (a full MoE or an extracted sub-MoE)."""
    return training_table(model, batch_size, seq_len, finetune, lora_r, family, **kwargs).total()


def unit_training_bytes(
    model: nn.Module,
    family: MoEFamily | None = None,
    *,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    **kwargs: Any,
) -> tuple[float, np.ndarray]:
    """``(dense bytes, expert bytes [L, E])`` of :func:`training_table`, for ``fedmoe.engine.budget``.

    Defaults follow the project's client loop (``fedmoe.train.loop``): its label-smoothed loss
    (:data:`SMOOTHED_CE_LOSS`) and torch's default AdamW — ``foreach`` (one temporary as large
    as the trained tensors) when CUDA is available, the for-loop one otherwise.
    """
    kwargs.setdefault("factors", SMOOTHED_CE_LOSS)
    kwargs.setdefault("adam_impl", "foreach" if torch.cuda.is_available() else "for-loop")
    table = training_table(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    return float(table.dense_bytes), table.expert_bytes.astype(np.float64)


def memory_breakdown(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    finetune: Finetune = "lora",
    lora_r: int = 8,
    family: MoEFamily | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """The estimate by component, whole model: ``weights``, ``trained`` (gradients + optimiser
    state of trained weights), ``adapters`` (LoRA weights + gradients + state), ``activations``
    (and each dense activation term as ``act_<term>``, plus ``act_router`` and ``act_lora_merge``
    summed over experts), ``trained_elements`` and ``total`` (= :func:`estimate_for_model`)."""
    _check_unwrapped(model)
    family = family or family_of(model)
    mm = memory_model_for(model, batch_size, seq_len, finetune, lora_r, family, **kwargs)
    dense, experts, terms, trained_elements = _unit_costs(model, family, mm)
    units = [dense] + [u for row in experts for u in row]
    out = {k: int(round(sum(getattr(u, k) for u in units))) for k in ("weights", "trained", "adapters", "activations")}
    out.update({f"act_{k}": int(round(v)) for k, v in terms.items()})
    tokens = mm.moe_layer_tokens()
    if len(tokens) != len(experts):
        tokens = [mm.tokens()] * len(experts)
    out["act_router"] = int(round(sum(4 * mm.factors.router * tokens[i] * len(row) for i, row in enumerate(experts))))
    out["act_lora_merge"] = out["activations"] - int(round(dense.activations)) - out["act_router"]
    out["trained_elements"] = trained_elements
    out["total"] = sum(u.total() for u in units)
    return out


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """``gc.collect()`` and glibc ``malloc_trim(0)``: give freed heap pages back to the OS so a
    following RSS baseline does not count memory the next allocation would reuse."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def use_mmap_for_large_allocations(threshold: int = 1 << 16) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, threshold)``: serve allocations above ``threshold`` with
    their own ``mmap``, returned to the OS on free. Without it glibc raises the threshold
    dynamically (up to 32 MiB) and freed tensors stay in the heap, so RSS peaks include heap
    fragmentation. :func:`measure_in_subprocess` sets it in its fresh process (it slows large
    allocations a little, so it is not set in-process); returns False where unavailable."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD


def _status_kib(field_name: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def measure_peak(fn: Callable[[], T], device: str | torch.device | None = "auto") -> tuple[T, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the peak memory *above* what was in use
    just before ``fn`` started.

    * CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated − memory_allocated``
      before — tensor bytes from the caching allocator (not its reserved-but-free blocks).
    * CPU (Linux): write ``5`` to ``/proc/self/clear_refs`` to reset the VmHWM high-water mark
      to the current RSS, run ``fn``, and return ``VmHWM − VmRSS(before)``. This is resident
      memory, so it includes allocator overheads (malloc headers, alignment, heap fragmentation)
      and anything else the process touches meanwhile (lazily imported modules, thread stacks);
      free heap memory is trimmed first (:func:`release_free_memory`).
    * CPU without ``/proc`` (or no permission to reset it): ``resource.getrusage``'s peak RSS,
      which cannot be reset — the result is ``max(0, ru_maxrss after − ru_maxrss before)``, the
      growth of the process's all-time peak, so it is **less precise**: 0 when ``fn`` stays
      below an earlier peak of the process, and it counts from that peak, not from the memory
      in use before ``fn`` (use a fresh process).
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, max(0, torch.cuda.max_memory_allocated(dev) - before)
    release_free_memory()
    if _reset_hwm():
        before = _status_kib("VmRSS")
        if before is not None:
            result = fn()
            hwm = _status_kib("VmHWM") or before
            return result, max(0, hwm - before) * 1024
    before_max = _ru_maxrss_bytes()
    result = fn()
    return result, max(0, _ru_maxrss_bytes() - before_max)


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes, Linux: KiB


@dataclass(frozen=True)
class StepMeasurement:
    """Measured peak of building a model and training it (see :func:`measure_training_step`)."""

    peak_bytes: int
    weight_bytes: int  #: parameters + buffers of the (wrapped) model
    trainable_bytes: int
    trainable_elements: int
    loss: float
    device: str


def make_batch(
    model: nn.Module, batch_size: int, seq_len: int, seed: int = 0, target_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Random token ids for memory measurements: ``input_ids`` + ``labels`` for causal and
    encoder-decoder LMs (``out.loss``); ``input_ids`` only for models without an LM head
    (train those with a ``loss_fn``)."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch_size, seq_len), generator=g)
    if getattr(model.config, "is_encoder_decoder", False):
        tgt = torch.randint(2, vocab, (batch_size, target_len or seq_len), generator=g)
        return {"input_ids": ids, "labels": tgt}
    if _lm_vocab(model) == 0:
        return {"input_ids": ids}
    return {"input_ids": ids, "labels": ids.clone()}


#: ``loss_fn(model, batch)`` → the loss, or ``(loss, *held)``: whatever else it returns (e.g. the
#: model's output) stays alive through backward, as a training loop holds its outputs
LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]


def _forward_kwargs(model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if getattr(base.config, "use_cache", None) is not None and "use_cache" in params:
        data = dict(data, use_cache=False)  # no KV cache while training
    return data


def _train_steps(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    finetune: Finetune,
    lora_r: int,
    lora_alpha: int,
    steps: int,
    lr: float,
    dev: torch.device,
    set_to_none: bool,
    adam_impl: AdamImpl,
    loss_fn: LossFn | None,
) -> StepMeasurement:
    from fedmoe.moe.lora import apply_lora

    model = model_factory().to(dev)
    model.train()
    if finetune == "lora":
        model = apply_lora(model, r=lora_r, alpha=lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw: dict[str, Any] = {"fused": True} if adam_impl == "fused" else {"foreach": adam_impl == "foreach"}
    opt = torch.optim.AdamW(params, lr=lr, **opt_kw)
    data = _forward_kwargs(model, {k: v.to(dev) for k, v in batch.items()})
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        if loss_fn is not None:
            out = loss_fn(model, data)
            loss = out[0] if isinstance(out, tuple) else out
        else:
            out = model(**data)  # held through backward, as a training loop holds its outputs
            loss = out.loss
        loss.backward()
        del out
        opt.step()
    seen: set[int] = set()
    weights = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            weights += t.numel() * t.element_size()
    return StepMeasurement(
        peak_bytes=0, weight_bytes=weights, trainable_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable_elements=sum(p.numel() for p in params), loss=float(loss.detach()), device=str(dev),
    )


def measure_training_step(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    *,
    finetune: Finetune = "full",
    lora_r: int = 8,
    lora_alpha: int = 16,
    steps: int = 2,
    lr: float = 1e-4,
    device: str | torch.device | None = "auto",
    set_to_none: bool = False,
    adam_impl: AdamImpl = "fused",
    warmup: bool | Callable[[], nn.Module] = True,
    loss_fn: LossFn | None = None,
) -> StepMeasurement:
    """Peak memory of materialising ``model_factory()`` and training it, from a baseline taken
    *before* the model exists (so weights count), to compare with :func:`estimate_for_model`.

    One run: build the model (on ``device``), wrap it with LoRA if asked
    (:func:`fedmoe.moe.lora.apply_lora`), create AdamW, then ``steps`` times
    ``zero_grad(set_to_none)`` → forward on ``batch`` → ``out.loss`` (or ``loss_fn(model, batch)``,
    see :data:`LossFn`) → backward → ``step``. The default ``steps=2`` with ``set_to_none=False`` measures the
    *steady-state* step the formula describes: the first step allocates gradients and optimiser
    state, the second runs forward/backward with both allocated.

    ``warmup`` runs the same thing once, unmeasured, beforehand (``True``), or a cheaper one on
    the model a given factory builds (e.g. the family's ``tiny-`` preset) with a 2×8 batch, so
    lazy imports, kernel and thread-pool initialisation are not counted; ``False``: none.
    ``adam_impl="fused"`` falls back to the for-loop AdamW where no fused kernel exists.
    """
    dev = _resolve_device(device)
    impl: AdamImpl = adam_impl if adam_impl != "fused" or dev.type in ("cuda", "cpu") else "for-loop"

    def run(factory: Callable[[], nn.Module], data: Mapping[str, torch.Tensor]) -> StepMeasurement:
        return _train_steps(factory, data, finetune, lora_r, lora_alpha, steps, lr, dev, set_to_none, impl, loss_fn)

    if warmup is True:
        run(model_factory, batch)
    elif callable(warmup):
        small = warmup()
        run(warmup, make_batch(small, 2, 8))
        del small
    release_free_memory()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result, peak = measure_peak(lambda: run(model_factory, batch), dev)
    return replace(result, peak_bytes=peak)


def _subprocess_jobs(jobs: list[dict[str, Any]], num_threads: int | None) -> list[StepMeasurement]:
    use_mmap_for_large_allocations()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    out = []
    for job in jobs:
        job = dict(job)
        factory = job.pop("model_factory")
        batch = job.pop("batch")
        out.append(measure_training_step(factory, batch, **job))
        release_free_memory()
    return out


def measure_in_subprocess(
    jobs: list[dict[str, Any]],
    *,
    num_threads: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900.0,
) -> list[StepMeasurement]:
    """Run :func:`measure_training_step` for each job (its keyword arguments, including
    ``model_factory`` and ``batch``) one after another in one fresh ``spawn``-ed process.

    A fresh process starts with a clean VmHWM and holds no memory of earlier work; there, large
    allocations get their own mappings (:func:`use_mmap_for_large_allocations`) so freed tensors
    leave RSS at once, and every measurement resets the high-water mark, so jobs do not pollute
    each other. Factories must be picklable (a module-level function, or a ``functools.partial``
    of one such as ``partial(build_tiny, "tiny-mixtral", hidden_size=256)``); as with any ``spawn``,
    a calling script must be a file (not stdin) and guard its entry point. ``env``: extra
    environment variables of the child, e.g. ``{"MKL_DISABLE_FAST_MM": "1"}`` to stop MKL from
    caching GEMM buffers (module docstring, "Measuring").
    """
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            future = pool.submit(_subprocess_jobs, list(jobs), num_threads)
            return future.result(timeout=timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_training_step_subprocess(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    *,
    num_threads: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900.0,
    **kwargs: Any,
) -> StepMeasurement:
    """:func:`measure_training_step` in a fresh process (see :func:`measure_in_subprocess`)."""
    job = dict(kwargs, model_factory=model_factory, batch=dict(batch))
    return measure_in_subprocess([job], num_threads=num_threads, env=env, timeout=timeout)[0]


def ratio(predicted: float, measured: float) -> float:
    """``predicted / measured`` (``inf`` when nothing was measured)."""
    return predicted / measured if measured else math.inf


__all__ = [
    "HF_LOSS",
    "SMOOTHED_CE_LOSS",
    "ActivationFactors",
    "LayerSpec",
    "MemoryTable",
    "ModelShape",
    "StepMeasurement",
    "TrainingMemoryModel",
    "dtype_bytes",
    "estimate_for_model",
    "make_batch",
    "measure_in_subprocess",
    "measure_peak",
    "measure_training_step",
    "measure_training_step_subprocess",
    "memory_breakdown",
    "memory_model_for",
    "param_bytes_by_unit",
    "ratio",
    "release_free_memory",
    "submodel_training_bytes",
    "training_bytes",
    "training_table",
    "unit_training_bytes",
    "use_mmap_for_large_allocations",
]

