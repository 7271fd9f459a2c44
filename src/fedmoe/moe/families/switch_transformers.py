"""SwitchTransformers (encoder-decoder): per-module experts ``experts.expert_<j>``, top-1
router ``router.classifier`` (optional bias), expert capacity per sequence.

Sparse layers sit in both the encoder and the decoder; both are MoE layers here.
"""

from dataclasses import dataclass

import torch
from torch import nn

from fedmoe.moe.families.base import MoEFamily


@dataclass(frozen=True)
class SwitchFamily(MoEFamily):
    def num_experts(self, block: nn.Module) -> int:
        return int(block.router.num_experts)

    def top_k(self, block: nn.Module) -> int:
        return 1

    def route_choices(self, router_out, top_k: int):
        # router_attr is the classifier: its output is the logits; Switch routes top-1
        # (capacity drops are not counted as a routing decision change).
        logits = router_out.reshape(-1, router_out.shape[-1]).float()
        return logits.argmax(-1, keepdim=True), torch.softmax(logits, -1)


FAMILY = SwitchFamily(
    name="switch_transformers",
    model_types=("switch_transformers",),
    block_classes=("SwitchTransformersSparseMLP",),
    auto_class="AutoModelForSeq2SeqLM",
    router_attr="router.classifier",
    router_tensors=("weight", "bias"),
    per_expert_module="expert_{j}",
    normalisation="softmax, top-1, expert capacity",
    num_experts_attrs=("router.num_experts", "experts.num_experts"),
    top_k_attrs=(),
    attention_modules=("q", "k", "v", "o"),
    config_class="SwitchTransformersConfig",
    config_top_k_key=None,
    tiny_kwargs=dict(
        vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=6, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        expert_capacity=512, router_bias=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    ),
)
