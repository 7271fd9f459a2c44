"""BERT-MoE: a BERT encoder whose feed-forward layers are sparse Mixture-of-Experts blocks.

``transformers`` has no BERT-MoE family, so this module defines one, built from the stock
BERT embeddings and attention modules. Each layer's FFN (``intermediate.dense`` H→I with
bias, GELU, ``output.dense`` I→H with bias) becomes :class:`BertMoeSparseMoeBlock`: a
Mixtral-style softmax top-k router (``gate``, weight ``[E, H]``) over ``E`` experts whose
parameters are fused 3-D tensors (``experts.up_proj [E, I, H]``, ``experts.up_bias [E, I]``,
``experts.down_proj [E, H, I]``, ``experts.down_bias [E, H]``). BERT's dropout and
residual LayerNorm (``output.LayerNorm``) stay outside the experts, exactly as in
``BertOutput``, so a BERT checkpoint maps onto this one key for key (sparse upcycling,
Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"; see :mod:`fedmoe.moe.upcycle`).

All forward code reads ``self.num_experts`` / ``self.top_k`` from the modules, never the
config, so a sub-MoE whose layers keep different numbers of experts runs unchanged.

:class:`BertMoeForFedTasks` carries the three heads used by federated clients:
text classification (``task="tc"``), reading comprehension spans (``"rc"``) and extractive
summarisation (``"ts"``). Importing this module registers ``model_type="bert_moe"`` with
``AutoConfig`` and maps it to :class:`BertMoeForFedTasks` in ``AutoModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoEModelOutput
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertSelfAttention
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

TASKS = ("tc", "rc", "ts")


class BertMoeConfig(BertConfig):
    """:class:`~transformers.BertConfig` plus the MoE fields.

    Args (besides BERT's):
        num_experts: experts per MoE layer (``E``).
        num_experts_per_tok: experts each token is routed to (top-k).
        router_init_std: std of the router's normal init; ``0`` initialises it to zero.
        output_router_logits: return per-layer router logits (and a load-balancing loss).
        num_labels: classes of the ``tc`` head (default 4).
    """

    model_type = "bert_moe"

    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_init_std: float = 0.0
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 4
        super().__post_init__(**kwargs)


class BertMoeTopKRouter(nn.Module):
    """Softmax over experts → top-k → renormalise (as ``MixtralTopKRouter``)."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, H]`` → (logits ``[N, E]``, top-k weights ``[N, k]`` (fp32), top-k indices ``[N, k]``)."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, min(self.top_k, self.num_experts), dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value, top_index


class BertMoeExperts(nn.Module):
    """``E`` BERT FFNs (``act(x Wᵤᵀ + bᵤ) W_dᵀ + b_d``) stored as fused ``[E, …]`` tensors."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        h, i = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, i, h))
        self.up_bias = nn.Parameter(torch.empty(self.num_experts, i))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, h, i))
        self.down_bias = nn.Parameter(torch.empty(self.num_experts, h))
        act = config.hidden_act
        self.act_fn = ACT2FN[act] if isinstance(act, str) else act

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[N, H]`` tokens, ``[N, k]`` expert ids and weights → ``Σ_slots w · expert(x)``, ``[N, H]``.

        The ``N·k`` (token, slot) pairs are sorted by expert once; each expert that was hit
        runs on its contiguous chunk. Gathers and their gradients are permutations (no
        scatter-add, which is slow on CPU), and the fused weights are unbound once so the
        backward stacks per-expert gradients instead of filling a full ``[E, …]`` tensor
        per expert.
        """
        n, k = top_k_index.shape
        with torch.no_grad():
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            inverse = torch.argsort(order)
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        slots = hidden_states.unsqueeze(1).expand(n, k, hidden_states.shape[-1]).reshape(n * k, -1)
        chunks = PermuteRows.apply(slots, order, inverse).split(counts)
        up_w, up_b = self.up_proj.unbind(0), self.up_bias.unbind(0)
        down_w, down_b = self.down_proj.unbind(0), self.down_bias.unbind(0)
        outs = []
        for e, x in enumerate(chunks):
            if counts[e]:
                x = self.act_fn(F.linear(x, up_w[e], up_b[e]))
                outs.append(F.linear(x, down_w[e], down_b[e]))
        weights = top_k_weights.reshape(-1)[order, None]
        y = (torch.cat(outs) * weights).to(hidden_states.dtype)
        return PermuteRows.apply(y, inverse, order).view(n, k, -1).sum(dim=1)


class PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose gradient is the inverse permutation (a gather, not a scatter-add)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class BertMoeSparseMoeBlock(nn.Module):
    """Router ``gate`` + fused ``experts``; ``[B, T, H]`` → ``[B, T, H]`` (no residual/norm)."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__()
        self.gate = BertMoeTopKRouter(config)
        self.experts = BertMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).reshape(shape)


class BertMoeOutput(nn.Module):
    """BERT's post-FFN dropout + residual LayerNorm (``BertOutput`` minus its dense layer)."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class BertMoeLayer(GradientCheckpointingLayer):
    """BERT self-attention block, then the sparse MoE FFN (``mlp``) and ``output``."""

    def __init__(self, config: BertMoeConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.attention = BertAttention(config, is_causal=False, layer_idx=layer_idx)
        self.mlp = BertMoeSparseMoeBlock(config)
        self.output = BertMoeOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
        return self.output(self.mlp(attention_output), attention_output)


class BertMoeEncoder(nn.Module):
    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertMoeLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


class BertMoePreTrainedModel(PreTrainedModel):
    config_class = BertMoeConfig
    config: BertMoeConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BertEmbeddings", "BertMoeLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": BertMoeLayer,
        "attentions": BertSelfAttention,
        "router_logits": OutputRecorder(BertMoeTopKRouter, index=0),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, BertMoeExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_bias)
            init.zeros_(module.down_bias)
        elif isinstance(module, BertMoeTopKRouter):
            if self.config.router_init_std > 0:
                init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
            else:
                init.zeros_(module.weight)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


class BertMoeModel(BertMoePreTrainedModel):
    """Pooler-free BERT-MoE encoder; returns :class:`~transformers.modeling_outputs.MoEModelOutput`."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertMoeEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MoEModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        embeddings = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask)
        hidden = self.encoder(embeddings, mask, **kwargs)
        return MoEModelOutput(last_hidden_state=hidden)


@dataclass
class FedTasksOutput(ModelOutput):
    """Output of :class:`BertMoeForFedTasks`.

    ``logits``: ``tc`` → ``[B, num_labels]``; ``rc`` → ``[B, T, 2]`` (start, end);
    ``ts`` → ``[B, S]`` sentence scores (``-inf`` at padded positions).
    ``aux_loss``: load-balancing loss (only with ``output_router_logits=True``).
    """

    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int | list[int], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style balance loss ``E · Σ_e f_e P_e``, per layer, averaged over layers.

    Computed per layer, so layers may have different expert counts (sub-MoEs).
    ``top_k`` may be one value or one per layer; padding tokens are ignored.
    """
    ks = top_k if isinstance(top_k, list) else [top_k] * len(router_logits)
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
    losses = []
    for logits, k in zip(router_logits, ks, strict=True):
        if keep is not None and keep.numel() == logits.shape[0]:
            logits = logits[keep]
        n_exp = logits.shape[-1]
        probs = F.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, min(k, n_exp), dim=-1).indices
        frac = F.one_hot(top, n_exp).float().sum(1).mean(0) / top.shape[-1]
        losses.append(n_exp * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class BertMoeForFedTasks(BertMoePreTrainedModel):
    """BERT-MoE encoder with the ``tc`` / ``rc`` / ``ts`` heads of the federated task types."""

    def __init__(self, config: BertMoeConfig) -> None:
        super().__init__(config)
        self.bert = BertMoeModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.tc_head = nn.Linear(config.hidden_size, config.num_labels)
        self.rc_head = nn.Linear(config.hidden_size, 2)
        self.ts_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task: str = "tc",
        sentence_positions: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> FedTasksOutput:
        """Encode and apply the head of ``task``.

        ``sentence_positions`` (``ts`` only): ``[B, S]`` token indices of sentence starts,
        ``-1`` for padding (their scores are ``-inf``).
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden = self.dropout(out.last_hidden_state)
        if task == "tc":
            logits = self.tc_head(hidden[:, 0])
        elif task == "rc":
            logits = self.rc_head(hidden)
        else:
            if sentence_positions is None:
                raise ValueError("task='ts' needs sentence_positions [B, S] (-1 = padding).")
            scores = self.ts_head(hidden).squeeze(-1)  # [B, T]
            pos = sentence_positions.long()
            logits = scores.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, float("-inf"))
        aux = None
        if output_router_logits and out.router_logits:
            ks = [m.top_k for m in self.modules() if isinstance(m, BertMoeTopKRouter)]
            aux = load_balancing_loss(out.router_logits, ks, attention_mask)
        return FedTasksOutput(
            logits=logits,
            aux_loss=aux,
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
        )


AutoConfig.register(BertMoeConfig.model_type, BertMoeConfig, exist_ok=True)
AutoModel.register(BertMoeConfig, BertMoeForFedTasks, exist_ok=True)

__all__ = [
    "TASKS",
    "BertMoeConfig",
    "BertMoeExperts",
    "BertMoeForFedTasks",
    "BertMoeModel",
    "BertMoeSparseMoeBlock",
    "BertMoeTopKRouter",
    "FedTasksOutput",
    "load_balancing_loss",
]
