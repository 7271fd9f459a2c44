"""BERT-MoE (our own family, :mod:`fedmoe.moe.bert_moe`): fused experts ``up_proj``/``up_bias``/
``down_proj``/``down_bias``, Mixtral-style softmax top-k router.

The config class is not part of ``transformers``, so :class:`BertMoeFamily` overrides
:meth:`build_config`; ``auto_class="AutoModel"`` works because importing
:mod:`fedmoe.moe.bert_moe` maps ``BertMoeConfig`` → ``BertMoeForFedTasks`` in ``AutoModel``.

Importing this module registers the family (``register_family``). When the registry
package imports this module while it is still initialising (before ``register_family``
exists), it must list :data:`FAMILY` in its own table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from fedmoe.moe.bert_moe import BertMoeConfig
from fedmoe.moe.families.base import MoEFamily


@dataclass(frozen=True)
class BertMoeFamily(MoEFamily):
    """:class:`MoEFamily` whose config class lives in :mod:`fedmoe.moe.bert_moe`."""

    def build_config(self, **overrides: Any) -> Any:
        return BertMoeConfig(**{**self.tiny_kwargs, **overrides})


FAMILY = BertMoeFamily(
    name="bert_moe",
    model_types=("bert_moe",),
    block_classes=("BertMoeSparseMoeBlock",),
    auto_class="AutoModel",
    router_attr="gate",
    fused_expert_tensors=("up_proj", "up_bias", "down_proj", "down_bias"),
    normalisation="softmax, top-k renormalised",
    num_experts_attrs=("gate.num_experts", "experts.num_experts"),
    top_k_attrs=("gate.top_k",),
    attention_modules=("query", "key", "value", "attention.output.dense"),
    config_class="BertMoeConfig",
    config_num_experts_key="num_experts",
    config_top_k_key="num_experts_per_tok",
    tiny_kwargs=dict(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_experts=6, num_experts_per_tok=2,
        router_init_std=0.02, num_labels=4,
    ),
)


def _register() -> None:
    registry = sys.modules.get("fedmoe.moe.families")
    register = getattr(registry, "register_family", None)
    if register is not None:
        register(FAMILY)


_register()

__all__ = ["FAMILY", "BertMoeFamily"]
