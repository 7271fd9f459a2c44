"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") — docs/algorithms.md §2.2.

FedAvg plus a proximal term in each client's local objective (Li et al. 2020, eq. 2 /
Algorithm 2):

    h_k(w; w_global) = F_k(w) + (μ/2) · ‖w − w_global‖²,

so the local gradient is ``∇F_k(w) + μ·(w − w_global)``. Here ``w`` is the client's
trainable tensors (LoRA adapters, router rows, heads; every weight with full fine-tuning)
and ``w_global`` the global values it received this round; the server step is FedAvg's
(:func:`fedmoe.algorithms.fedavg.aggregate`). μ is ``baseline.fedprox_mu`` (default 0.01).
With μ = 0 FedProx is FedAvg exactly.

``w_global`` costs no extra bytes: it is the model the client downloaded. :class:`ProximalTerm`
snapshots the trainable tensors the first time it is called — in the first local step, before
any optimiser update, when they still equal the downloaded global values.

Pure torch; no engine, transformers or Flower imports.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.algorithms.fedavg import ClientWeights, FedAvgServerState, aggregate, average

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("fedprox", "FedProx: FedAvg + proximal term in the local loss",
                     "fedmoe.engine.strategies.baselines:FedProxStrategy", "fedmoe.algorithms.fedprox", "§2.2", ("fedprox",))

DEFAULT_MU = 0.01

__all__ = [
    "DEFAULT_MU", "ClientWeights", "FedAvgServerState", "ProximalTerm", "aggregate", "average",
    "proximal_gradient", "proximal_term",
]


def proximal_term(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    """``(μ/2) · Σ_key ‖params[key] − anchor[key]‖²`` over the keys of ``anchor`` (float32 at least).

    Differentiable in ``params``; ``anchor`` is treated as a constant.
    """
    if mu < 0:
        raise ValueError(f"FedProx μ must be >= 0, got {mu}.")
    terms = []
    for key, a in anchor.items():
        p = params[key]
        dt = torch.promote_types(p.dtype, torch.float32)
        terms.append((p.to(dt) - a.detach().to(device=p.device, dtype=dt)).pow(2).sum())
    if not terms:
        return torch.zeros(())
    return (mu / 2) * torch.stack([t.to(terms[0].dtype) for t in terms]).sum()


def proximal_gradient(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> dict[str, Tensor]:
    """Closed form of ∇ :func:`proximal_term`: ``μ · (w − w_global)`` per key."""
    return {k: mu * (params[k].detach() - a.detach()) for k, a in anchor.items()}


class ProximalTerm:
    """The local-loss addition of FedProx, usable as ``LocalHooks.extra_loss``.

    The first call snapshots ``named_params`` (detached copies) as ``w_global``; every call
    returns :func:`proximal_term` against that snapshot. ``keys`` restricts the term to
    those tensors (default: every trainable tensor the loop passes).
    """

    def __init__(self, mu: float, keys: set[str] | None = None) -> None:
        if mu < 0:
            raise ValueError(f"FedProx μ must be >= 0, got {mu}.")
        self.mu = float(mu)
        self.keys = keys
        self.anchor: dict[str, Tensor] | None = None

    def __call__(self, named_params: Mapping[str, Tensor]) -> Tensor:
        if self.anchor is None:
            self.anchor = {k: p.detach().clone() for k, p in named_params.items()
                           if self.keys is None or k in self.keys}
        return proximal_term(named_params, self.anchor, self.mu)
