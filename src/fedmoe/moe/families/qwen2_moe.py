"""Qwen2-MoE: fused routed experts + a gated shared expert (dense, never sliced)."""

from fedmoe.moe.families.base import MoEFamily

FAMILY = MoEFamily(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    block_classes=("Qwen2MoeSparseMoeBlock",),
    auto_class="AutoModelForCausalLM",
    router_attr="gate",
    fused_expert_tensors=("gate_up_proj", "down_proj"),
    shared_experts=("shared_expert", "shared_expert_gate"),
    normalisation="softmax, top-k (renormalised if norm_topk_prob)",
    config_class="Qwen2MoeConfig",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
        max_position_embeddings=256, norm_topk_prob=False, tie_word_embeddings=False,
    ),
)
