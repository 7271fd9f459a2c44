"""Routing statistics: the paper's activation probabilities p_{i,j} (docs/algorithms.md §0).

Forward hooks on every router count, per MoE layer i and expert j, the tokens routed to
j — each of a token's top-k choices counts once — and the router probability mass. Then
``p[i, j] = n_{i,j} / (k_i · N_i)``, so each row sums to 1.

Padding tokens are excluded when a token mask is given (``collector.token_masks``): the
mask whose size matches the router's token count is used (encoder and decoder masks of
encoder-decoder models differ in length).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.moe.families import MoEFamily, family_of


class RoutingStats:
    """Context manager that collects routing counts over any number of forward passes."""

    def __init__(self, model: nn.Module, family: MoEFamily | None = None) -> None:
        self.model = model
        self.family = family or family_of(model)
        self.blocks = self.family.blocks(model)
        n_max = max(b.num_experts for b in self.blocks)
        self.counts = np.zeros((len(self.blocks), n_max), dtype=np.float64)
        self.mass = np.zeros_like(self.counts)
        self.tokens = np.zeros(len(self.blocks), dtype=np.float64)
        self.token_masks: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingStats:
        for info in self.blocks:
            router = self.family.router(self.model.get_submodule(info.path))
            self._handles.append(router.register_forward_hook(self._hook(info.index, info.num_experts, info.top_k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _mask_for(self, n_tokens: int) -> torch.Tensor | None:
        for m in self.token_masks:
            if m.numel() == n_tokens:
                return m.reshape(-1).bool()
        return None

    def _hook(self, layer: int, n_exp: int, top_k: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            with torch.no_grad():
                choices, probs = self.family.route_choices(out, top_k)
                mask = self._mask_for(probs.shape[0])
                if mask is not None:
                    mask = mask.to(probs.device)
                    choices, probs = choices[mask], probs[mask]
                counts = torch.bincount(choices.reshape(-1), minlength=n_exp)[:n_exp]
                self.counts[layer, :n_exp] += counts.double().cpu().numpy()
                self.mass[layer, :n_exp] += probs.double().sum(0).cpu().numpy()
                self.tokens[layer] += probs.shape[0]

        return hook

    def p(self) -> np.ndarray:
        """Activation probabilities, layers × experts; each row sums to 1 (0-rows if unseen)."""
        tot = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, tot, out=np.zeros_like(self.counts), where=tot > 0)

    def mean_prob(self) -> np.ndarray:
        """Mean router probability of each expert over the tokens seen (HFedMoE's u_c(e))."""
        return np.divide(self.mass, self.tokens[:, None], out=np.zeros_like(self.mass), where=self.tokens[:, None] > 0)


def activation_probabilities(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], family: MoEFamily | None = None
) -> np.ndarray:
    """``p`` over a data loader of model-input dicts (``attention_mask`` excludes padding)."""
    model.eval()
    with RoutingStats(model, family) as stats, torch.no_grad():
        for batch in batches:
            stats.token_masks = [m for k, m in batch.items() if k.endswith("attention_mask")]
            model(**batch)
    return stats.p()
