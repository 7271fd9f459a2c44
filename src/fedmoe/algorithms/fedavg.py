"""FedAvg (McMahan et al. 2017) — the dense-sharing baseline of docs/algorithms.md §2.1.

Every client trains the same global model (all experts of every MoE layer); the server
replaces the global weights by the example-weighted average of the clients' weights,
``w ← Σ_k (n_k / Σ_j n_j) · w_k`` (eq. 2 of Mei et al. 2024, FedAvg weights).

"Everything" is every trainable tensor (docs/algorithms.md §1.3 "what is trained and what
travels": LoRA adapters, router rows, task heads by default; every weight with
``train.finetune = "full"``). Tensors that only some clients hold — a task head is sent only
by that task's clients — are averaged over the clients that sent them, and a tensor that no
sampled client sent stays unchanged (bit-identical). Averages are accumulated in float64
and cast back to the global tensor's dtype (:func:`fedmoe.core.aggregation.weighted_mean`);
a single contributor is copied exactly.

Pure functions on plain tensors: no engine, transformers or Flower imports. Verbs never
modify their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.core.aggregation import weighted_mean

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("fedavg", "FedAvg on a global MoE every client can hold",
                     "fedmoe.engine.strategies.baselines:FedAvgStrategy", "fedmoe.algorithms.fedavg", "§2.1")

ClientId = int


@dataclass
class ClientWeights:
    """One client's reply: its locally trained tensors and its example count ``n_k``."""

    client_id: ClientId
    num_examples: int
    weights: dict[str, Tensor]


@dataclass
class FedAvgServerState:
    """What the FedAvg server keeps between rounds: the global weights and the round count."""

    weights: dict[str, Tensor]
    round: int = 0


def check_uploads(global_weights: Mapping[str, Tensor], uploads: Sequence[ClientWeights]) -> None:
    """Raise :class:`ValueError` for an unknown key, a shape mismatch or a negative example count."""
    for up in uploads:
        if up.num_examples < 0:
            raise ValueError(f"Client {up.client_id} reports {up.num_examples} examples; must be >= 0.")
        for key, t in up.weights.items():
            if key not in global_weights:
                raise ValueError(f"Client {up.client_id} sent `{key}`, absent from the global weights.")
            if tuple(t.shape) != tuple(global_weights[key].shape):
                raise ValueError(
                    f"Client {up.client_id} sent `{key}` with shape {tuple(t.shape)}; "
                    f"the global tensor has shape {tuple(global_weights[key].shape)}."
                )


def average(global_weights: Mapping[str, Tensor], uploads: Sequence[ClientWeights]) -> dict[str, Tensor]:
    """Per key, the example-weighted mean over the clients that sent it (FedAvg, eq. 2).

    Returns a new dict; keys no client sent share the input tensor (unchanged).
    """
    check_uploads(global_weights, uploads)
    out = dict(global_weights)
    for key, dst in global_weights.items():
        senders = [u for u in uploads if key in u.weights]
        if senders:
            out[key] = weighted_mean([u.weights[key] for u in senders], [u.num_examples for u in senders],
                                     f"`{key}`", dtype=dst.dtype, device=dst.device)
    return out


def aggregate(state: FedAvgServerState, uploads: Sequence[ClientWeights]) -> FedAvgServerState:
    """One FedAvg server step: the new global weights are :func:`average` of the uploads."""
    if not uploads:
        return FedAvgServerState(dict(state.weights), state.round + 1)
    return FedAvgServerState(average(state.weights, uploads), state.round + 1)
