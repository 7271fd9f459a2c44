"""DeepSeek-V3: fused routed experts, sigmoid router with a score-correction bias and
group-limited routing, plus shared experts (dense, never sliced).

A sub-MoE keeps ``e_score_correction_bias`` entries of its kept experts. Group-limited
routing cannot be expressed over an arbitrary kept subset, so a sub-MoE routes with
``n_group = topk_group = 1`` (plain top-k over the kept experts); the equivalence with
"dropped experts masked" is exact for global models that use one group (as the tiny
preset does) and documented as an approximation otherwise.
"""

import types
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.moe.families.base import MoEFamily


@dataclass(frozen=True)
class DeepseekV3Family(MoEFamily):
    def fix_block(self, block: nn.Module, n: int) -> None:
        block.gate.num_group = 1
        block.gate.topk_group = 1
        if n == 1:
            # The native router scores groups by their top-2 experts, which needs >= 2
            # experts; with one expert kept the routing is trivially that expert.
            block.gate.forward = types.MethodType(_single_expert_route, block.gate)

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)

    def restrict_config(self, config, max_kept: int, top_k: int) -> None:
        super().restrict_config(config, max_kept, top_k)
        config.n_group = 1
        config.topk_group = 1


def _single_expert_route(self: nn.Module, hidden_states: torch.Tensor):
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states.float(), self.weight.float())
    weights = router_logits.sigmoid()
    if self.norm_topk_prob:
        weights = weights / (weights + 1e-20)
    indices = torch.zeros_like(weights, dtype=torch.long)
    return router_logits, weights * self.routed_scaling_factor, indices


FAMILY = DeepseekV3Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    block_classes=("DeepseekV3MoE",),
    auto_class="AutoModelForCausalLM",
    router_attr="gate",
    router_tensors=("weight", "e_score_correction_bias"),
    fused_expert_tensors=("gate_up_proj", "down_proj"),
    shared_experts=("shared_experts",),
    normalisation="sigmoid + score-correction bias, group-limited top-k, scaled",
    attention_modules=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    config_class="DeepseekV3Config",
    config_num_experts_key="n_routed_experts",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        max_position_embeddings=256, tie_word_embeddings=False, routed_scaling_factor=1.0,
    ),
)
