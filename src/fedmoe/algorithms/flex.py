"""FLEx (2025): one personalised expert per client, grafted with an adaptive gate.

docs/algorithms.md §4. The model side lives in :mod:`fedmoe.moe.graft` (choosing e*, §4.1, and
grafting the side expert + gate, §4.2). This module is the server/bookkeeping side (§4.3):

* personal tensors — the side experts and side gates, named with :data:`SIDE_MARKERS` — never
  leave the client; :func:`split_state` separates them from the shared tensors and
  :func:`merge_personal` restores them into what the server sent;
* shared tensors — every other trainable tensor a client sends (attention LoRA adapters and
  task heads; pretrained experts and routers are frozen under FLEx) — are FedAvg'd by
  :func:`aggregate` with the |D_c| weights (:func:`fedmoe.core.aggregation.modular_aggregate`).

Pure torch; verbs never modify their input state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.core.aggregation import ClientUpdate, modular_aggregate
from fedmoe.core.layout import UnitLayout
from fedmoe.core.personal import SIDE_MARKERS, is_personal

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("flex", "FLEx: one personalised grafted side expert per client and layer",
                     "fedmoe.engine.strategies.flex:FlexStrategy", "fedmoe.algorithms.flex", "§4", ("flex-choice",))

ClientId = int


def split_state(
    state: Mapping[str, Tensor], markers: Iterable[str] = SIDE_MARKERS
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(shared, personal)`` views of a client's trainable state (§4.3); same tensor objects."""
    markers = tuple(markers)
    shared = {k: v for k, v in state.items() if not is_personal(k, markers)}
    personal = {k: v for k, v in state.items() if is_personal(k, markers)}
    return shared, personal


def merge_personal(shared: Mapping[str, Tensor], personal: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The client's full trainable state: the server's shared tensors + its own personal ones.

    Raises ValueError if a key is in both (a personal tensor must never come from the server).
    """
    both = sorted(set(shared) & set(personal))
    if both:
        raise ValueError(f"merge_personal: keys both shared and personal: {both[:3]}.")
    return {**shared, **personal}


@dataclass
class FlexServerState:
    """What the FLEx server remembers: the global shared tensors and each client's e*."""

    shared: dict[str, Tensor] = field(default_factory=dict)  #: global shared trainable tensors
    personal_experts: dict[ClientId, list[int]] = field(default_factory=dict)  #: e* per MoE layer
    round: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def init_state(trainable: Mapping[str, Tensor], markers: Iterable[str] = SIDE_MARKERS) -> FlexServerState:
    """Server state from a (grafted or not) model's trainable state: its shared part, cloned."""
    shared, _ = split_state(trainable, markers)
    return FlexServerState(shared={k: v.detach().clone() for k, v in shared.items()})


def _copy(state: FlexServerState, shared: dict[str, Tensor] | None = None) -> FlexServerState:
    """A new state; the shared tensors are shared (never modified in place) unless replaced."""
    return FlexServerState(
        shared=dict(state.shared if shared is None else shared),
        personal_experts=copy.deepcopy(state.personal_experts),
        round=state.round,
        events=copy.deepcopy(state.events),
    )


def record_choice(state: FlexServerState, client_id: ClientId, chosen: Sequence[int]) -> FlexServerState:
    """Remember client ``client_id``'s personalised expert per layer (§4.1; bookkeeping only)."""
    new = _copy(state)
    new.personal_experts[client_id] = [int(e) for e in chosen]
    new.events.append({"round": new.round, "kind": "choose", "client_id": client_id, "experts": list(chosen)})
    return new


def client_payload(state: FlexServerState) -> dict[str, Tensor]:
    """What a client receives each round: the shared tensors only (no side experts exist server-side)."""
    return dict(state.shared)


def aggregate(
    state: FlexServerState, updates: Sequence[ClientUpdate], markers: Iterable[str] = SIDE_MARKERS
) -> FlexServerState:
    """§4.3: example-weighted FedAvg of the shared tensors in ``updates[*].dense``.

    Keys sent by nobody stay unchanged (same tensor). A personal key, an expert/router unit,
    or a key unknown to the server state raises ValueError: FLEx never ships those.
    """
    markers = tuple(markers)
    for upd in updates:
        leaked = [k for k in upd.dense if is_personal(k, markers)]
        if leaked or upd.experts or upd.routers:
            raise ValueError(
                f"Client {upd.client_id} sent personal/expert tensors ({(leaked or list(upd.experts))[:3]}); "
                "FLEx only aggregates shared tensors (split them with split_state)."
            )
    layout = UnitLayout(dense_keys=list(state.shared))
    new = _copy(state, modular_aggregate(state.shared, layout, updates))
    new.round += 1
    new.events.append({"round": new.round, "kind": "aggregate", "clients": [u.client_id for u in updates]})
    return new


__all__ = [
    "SIDE_MARKERS", "FlexServerState", "aggregate", "client_payload", "init_state", "is_personal",
    "merge_personal", "record_choice", "split_state",
]
