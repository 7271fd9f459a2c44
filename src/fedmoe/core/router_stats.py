"""Streaming router statistics of one MoE layer (docs/algorithms.md §3.2–3.4): HFedMoE's inputs.

A leaf of pure numpy, so that the model side (:func:`fedmoe.moe.graft.collect_router_stats`)
and the server side (:mod:`fedmoe.algorithms.hfedmoe`) share it without ``moe`` importing
``algorithms``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_LAMBDA = 0.5  #: §3.2 λ (choice)
DEFAULT_BETA = 0.1  #: §3.3 β (choice)


def as_probs(G: Any) -> np.ndarray:
    g = np.asarray(G, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] == 0:
        raise ValueError(f"router probabilities must be [B>0, E], got shape {g.shape}.")
    if not np.isfinite(g).all() or (g < 0).any():
        raise ValueError("router probabilities must be finite and non-negative.")
    return g


def xlogx(x: np.ndarray) -> np.ndarray:
    """``x·log x`` elementwise with the convention 0·log 0 = 0 (no eps: the log never sees 0)."""
    pos = x > 0
    return np.where(pos, x * np.log(np.where(pos, x, 1.0)), 0.0)


class RouterStats:
    """Streaming §3.2–3.3 sums of one MoE layer over any number of ``[N, E]`` probability batches.

    KL uses the identity (1/B) Σ_b G log(G/p̄) = (1/B) Σ_b G log G − p̄ log p̄, clamped at 0
    against rounding; it equals :func:`fedmoe.algorithms.hfedmoe.ib_score` up to float64 rounding. ``counts`` are the
    top-k selections per expert ("the experts the router used", §3.4).
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.rows = 0
        self.sum_g = np.zeros(num_experts)
        self.max_g = np.zeros(num_experts)
        self.sum_xlogx = np.zeros(num_experts)
        self.counts = np.zeros(num_experts)

    def add(self, probs: Any, choices: Any = None) -> None:
        g = as_probs(probs)
        if g.shape[1] != self.num_experts:
            raise ValueError(f"probabilities have {g.shape[1]} experts; expected {self.num_experts}.")
        self.rows += g.shape[0]
        self.sum_g += g.sum(axis=0)
        self.max_g = np.maximum(self.max_g, g.max(axis=0))
        self.sum_xlogx += xlogx(g).sum(axis=0)
        if choices is not None:
            c = np.asarray(choices, dtype=np.int64).reshape(-1)
            self.counts += np.bincount(c, minlength=self.num_experts)[: self.num_experts]

    def usage(self) -> np.ndarray:
        """u_c(e) = s_cumul(e), the mean router probability (§3.5)."""
        return self.sum_g / self.rows if self.rows else np.zeros(self.num_experts)

    def used(self) -> np.ndarray:
        return self.counts > 0

    def importance(self, lam: float = DEFAULT_LAMBDA) -> np.ndarray:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}.")
        return lam * self.usage() + (1.0 - lam) * self.max_g

    def ib_score(self, lam: float = DEFAULT_LAMBDA, beta: float = DEFAULT_BETA) -> tuple[np.ndarray, np.ndarray]:
        if not self.rows:
            z = np.zeros(self.num_experts)
            return z, z.copy()
        kl = np.maximum(self.sum_xlogx / self.rows - xlogx(self.usage()), 0.0)
        return kl, self.importance(lam) - beta * kl
