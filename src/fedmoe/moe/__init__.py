"""Model surgery on native Hugging Face MoE classes: families, slicing, routing stats, LoRA, memory."""
