"""Qwen3-MoE: fused experts, softmax top-k router (no shared expert)."""

from fedmoe.moe.families.base import MoEFamily

FAMILY = MoEFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    block_classes=("Qwen3MoeSparseMoeBlock",),
    auto_class="AutoModelForCausalLM",
    router_attr="gate",
    fused_expert_tensors=("gate_up_proj", "down_proj"),
    normalisation="softmax, top-k (renormalised if norm_topk_prob)",
    config_class="Qwen3MoeConfig",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
)
