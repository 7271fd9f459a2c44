"""The training-memory formula: whole models, per-unit split, LoRA targets, breakdowns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedmoe.moe.families import MoEFamily, family_of
from fedmoe.moe.memory.shapes import ActivationFactors, ModelShape
from fedmoe.moe.memory.units import (
    OPTIMIZER_TRANSIENT,
    ROUTER_TOPK_BYTES,
    ROUTING_INDEX_BYTES,
    AdamImpl,
    Finetune,
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
# a concrete model
# --------------------------------------------------------------------------------------------
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
