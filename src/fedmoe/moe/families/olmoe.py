"""OLMoE: fused experts, softmax top-k router."""

from fedmoe.moe.families.base import MoEFamily

FAMILY = MoEFamily(
    name="olmoe",
    model_types=("olmoe",),
    block_classes=("OlmoeSparseMoeBlock",),
    auto_class="AutoModelForCausalLM",
    router_attr="gate",
    fused_expert_tensors=("gate_up_proj", "down_proj"),
    normalisation="softmax, top-k (renormalised if norm_topk_prob)",
    config_class="OlmoeConfig",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=6, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=1, bos_token_id=None,
        eos_token_id=0,
    ),
)
