"""The training-memory formula: whole models, per-unit split, LoRA targets, breakdowns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.moe.families import MoEFamily, family_of
from fedmoe.moe.memory.shapes import SMOOTHED_CE_LOSS, ActivationFactors, ModelShape
from fedmoe.moe.memory.units import (
    OPTIMIZER_TRANSIENT,
    ROUTER_TOPK_BYTES,
    ROUTING_INDEX_BYTES,
    AdamImpl,
    Finetune,
    MemoryTable,
    _check_unwrapped,
    _table,
    _unit_elements,
    dtype_bytes,
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

    def supervised_tokens(self) -> int:
        """Tokens a batch supervises: every decoder token of encoder-decoders; of causal LMs the
        target tokens, at most ``target_len`` per row (``fedmoe.train.batching``: the prompt's
        labels are ignored), all tokens when ``target_len`` is None."""
        out = self.tokens("decoder")
        if self.shape.encoder_decoder or self.target_len is None:
            return out
        return min(out, self.batch_size * self.target_len)

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
        # encoder-decoders: an encoder layer's backward runs after the decoder's saved tensors
        # (and the loss's) are freed, so its working set only counts above those
        enc_work = enc_kept = 0.0
        for spec in sh.layers:
            if sh.encoder_decoder and spec.stack == "encoder":
                outer = (work_scores, work_experts)
                work_scores = work_experts = 0.0
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
                if self.adapter_bytes != a:  # peft casts each adapted linear's input to the adapter dtype
                    terms["lora"] += n * self.adapter_bytes * sh.hidden * lora_attn_linears
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
            if sh.encoder_decoder and spec.stack == "encoder":
                enc_work = max(enc_work, work_scores, work_experts)
                enc_kept = sum(terms.values())
                work_scores, work_experts = outer
        out = self.tokens("decoder")
        # the final norm (pre-norm models; both stacks of encoder-decoders) or the embedding norm (BERT)
        terms["head"] += out * norm_tok + (enc_tokens * norm_tok if sh.encoder_decoder else 0.0)
        terms["dropout"] += (sh.extra_dropouts + (1 if sh.embed_norm and sh.dropout > 0 else 0)) * out * sh.hidden * mask
        shift = f.shift_copy if not sh.encoder_decoder else 0.0
        terms["logits"] = out * sh.vocab * a  # returned by the model, held through backward
        terms["head"] += out * sh.vocab * (4 * f.logits + 4 * f.loss_extra) + out * 16  # + ids, labels
        sup = self.supervised_tokens()
        terms["head"] += sup * sh.vocab * 4 * f.loss_supervised
        later = sum(terms.values()) - enc_kept - (enc_tokens * norm_tok if sh.encoder_decoder else 0.0)
        # the loss's backward: the full-size gradients, or first the supervised rows' ones; its
        # shifted logits copy (a forward transient) is freed before backward starts
        loss_work = max(out * sh.vocab * 4 * f.loss_grads, sup * sh.vocab * 4 * f.loss_supervised_grads,
                        out * sh.vocab * a * shift)
        terms["working_set"] = max(loss_work, work_scores, work_experts, enc_work - later)
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
                    if t.dim() == 3:  # unmerged expert LoRA (fedmoe.moe.expert_lora): no merged weight
                        n += t.shape[1] + t.shape[2]
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
    per_module_lora = 2.0  # LoRA on the two expert matrices (wi/wo, or fused, computed unmerged)
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
