"""What a sub-MoE saves when a layer keeps fewer experts than ``top_k``.

The additive table charges every MoE layer's routed-expert activations to the dense part at the
full model's ``top_k`` (package docstring: they follow the ``N·top_k`` (token, expert) pairs, not
the kept experts). A layer that keeps ``n < top_k`` experts routes each token to only ``n`` of
them (the extracted sub-MoE clips ``top_k``), so it keeps ``n/top_k`` of those activations and its
backward working set shrinks the same way. :class:`TopKClip` is that difference, computed from
:meth:`~fedmoe.moe.memory.formula.TrainingMemoryModel.activation_terms` itself with ``top_k``
replaced (no second copy of the formula): the additive price minus
:meth:`TopKClip.bytes_saved` is the formula's price of the extracted sub-MoE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from fedmoe.moe.memory.formula import TrainingMemoryModel


@dataclass(frozen=True)
class TopKClip:
    """Bytes a sub-MoE saves by layers that keep fewer than ``top_k`` experts.

    ``saving[m]``: activation bytes (kept for backward) saved when *every* MoE layer keeps ``m``
    experts instead of ``top_k``; ``share[i]``: MoE layer i's fraction of the routed tokens (the
    saving is linear in each layer's tokens); ``working_set[m]``: the backward working set when the
    widest layer routes to ``m`` experts.
    """

    top_k: int
    share: tuple[float, ...]
    saving: tuple[float, ...]  #: index m = 0 … top_k (m = 0 unused: a layer keeps ≥ 1 expert)
    working_set: tuple[float, ...]

    def bytes_saved(self, kept_counts: Sequence[int]) -> float:
        """Bytes below the additive price of a sub-MoE keeping ``kept_counts[i]`` experts in MoE layer i."""
        if len(kept_counts) != len(self.share) or not kept_counts:
            return 0.0
        ms = [max(1, min(self.top_k, int(n))) for n in kept_counts]
        kept = sum(s * self.saving[m] for s, m in zip(self.share, ms, strict=True))
        return kept + self.working_set[self.top_k] - self.working_set[max(ms)]


def topk_clip(mm: TrainingMemoryModel, lora_expert_linears: float = 2.0) -> TopKClip:
    """:class:`TopKClip` of the memory model ``mm`` (``lora_expert_linears``: adapted linears per
    expert under LoRA, as :func:`~fedmoe.moe.memory.table.training_table` counts them)."""
    k = max(1, mm.shape.top_k)
    lora = lora_expert_linears if mm.finetune == "lora" else 0.0

    def terms(m: int) -> dict[str, float]:
        return dataclasses.replace(mm, shape=dataclasses.replace(mm.shape, top_k=m)).activation_terms(0.0, lora)

    at = {m: terms(m) for m in range(1, k + 1)}
    ws = [at[max(1, m)]["working_set"] for m in range(k + 1)]
    kept = [sum(v for t, v in at[k].items() if t != "working_set")
            - sum(v for t, v in at[max(1, m)].items() if t != "working_set") for m in range(k + 1)]
    tokens = mm.moe_layer_tokens()
    total = float(sum(tokens)) or 1.0
    return TopKClip(k, tuple(n / total for n in tokens), tuple(kept), tuple(ws))
