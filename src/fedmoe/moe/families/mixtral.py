"""Mixtral (``transformers`` 5.x): fused experts ``gate_up_proj``/``down_proj``, softmax top-k router."""

from fedmoe.moe.families.base import MoEFamily

FAMILY = MoEFamily(
    name="mixtral",
    model_types=("mixtral",),
    block_classes=("MixtralSparseMoeBlock",),
    auto_class="AutoModelForCausalLM",
    router_attr="gate",
    fused_expert_tensors=("gate_up_proj", "down_proj"),
    normalisation="softmax, top-k renormalised",
    top_k_attrs=("gate.top_k", "top_k"),
    config_class="MixtralConfig",
    config_num_experts_key="num_local_experts",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
)
