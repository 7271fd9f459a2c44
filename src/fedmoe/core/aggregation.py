"""Modular aggregation of heterogeneous sub-MoE updates (docs/algorithms.md §1.2 step 4).

Paper (Mei et al. 2024, "Modular Aggregation", Algorithm 1 line 9): dense parameters are
FedAvg'd; an expert held by no sampled client stays unchanged, one held by a single client
is replaced by that client's copy, one held by several is their FedAvg; "the
expert-corresponding dimensions of routers are updated in the same pattern". All averages
are weighted by the clients' example counts, the FedAvg weights |D_k| / Σ|D_k| of eq. 2.

Numerics: weighted averages are accumulated in float64 and cast back to the destination
tensor's dtype; with a single contributor the tensor is copied exactly (no arithmetic).
Non-floating tensors (integer/bool buffers) are never averaged: all contributors must send
the same value, otherwise :class:`ValueError` is raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmoe.core.layout import TensorSlice, UnitId, UnitLayout


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    ``experts[u]`` / ``routers[u]`` hold one tensor per slice of ``layout.experts[u]`` /
    ``layout.routers[u]``, in the layout's order, each shaped like ``slice.read(global)``.
    A unit missing from the dict means the client does not hold that expert.
    """

    client_id: int
    num_examples: int
    dense: dict[str, Tensor] = field(default_factory=dict)
    experts: dict[UnitId, list[Tensor]] = field(default_factory=dict)
    routers: dict[UnitId, list[Tensor]] = field(default_factory=dict)


def normalised_weights(weights: Sequence[float], what: str = "weights") -> list[float]:
    """``w_k / Σ w`` as Python floats (float64); raises if any weight < 0 or the sum is 0."""
    ws = [float(w) for w in weights]
    if any(w < 0 for w in ws):
        raise ValueError(f"{what} must be non-negative, got {ws}.")
    total = sum(ws)
    if total <= 0:
        raise ValueError(f"{what} sum to {total}; at least one contributor must have a positive weight.")
    return [w / total for w in ws]


def weighted_mean(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    what: str = "tensor",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Example-weighted mean ``Σ_k (w_k/Σw)·t_k`` of same-shaped tensors, in float64.

    The float64 result is cast once to ``dtype`` (default: ``tensors[0].dtype``) on
    ``device`` (default: ``tensors[0].device``). One contributor: an exact copy (only the
    dtype cast, no arithmetic). Non-floating dtypes: the common value (ValueError if
    contributors disagree). Always returns a fresh tensor.
    """
    if not tensors:
        raise ValueError(f"{what}: nothing to average.")
    if len(tensors) != len(weights):
        raise ValueError(f"{what}: {len(tensors)} tensors but {len(weights)} weights.")
    first = tensors[0].detach()
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else device
    ws = normalised_weights(weights, f"{what} weights")
    if len(tensors) == 1:
        return first.to(device=device, dtype=dtype, copy=True)
    if not first.is_floating_point():
        for t in tensors[1:]:
            if not torch.equal(t.detach().to(first.device), first):
                raise ValueError(f"{what}: non-floating tensors ({first.dtype}) differ between clients; cannot average.")
        return first.to(device=device, dtype=dtype, copy=True)
    acc = torch.zeros(first.shape, dtype=torch.float64, device=device)
    for w, t in zip(ws, tensors, strict=True):
        acc.add_(t.detach().to(device=device, dtype=torch.float64), alpha=w)
    return acc.to(dtype)


def fedavg(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg of whole state dicts (eq. 2 weights): ``Σ_k w_k·state_k / Σ_k w_k`` per key.

    All states must have the same keys and shapes. Returns fresh tensors.
    """
    if len(states) != len(weights):
        raise ValueError(f"fedavg: {len(states)} states but {len(weights)} weights.")
    if not states:
        raise ValueError("fedavg: no states to average.")
    keys = list(states[0])
    for k, s in enumerate(states[1:], start=1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"fedavg: state {k} has different keys from state 0 (e.g. {diff[:3]}).")
    out: dict[str, Tensor] = {}
    for key in keys:
        ts = [s[key] for s in states]
        for k, t in enumerate(ts):
            if t.shape != ts[0].shape:
                raise ValueError(f"fedavg: `{key}` has shape {tuple(t.shape)} in state {k}, {tuple(ts[0].shape)} in state 0.")
        out[key] = weighted_mean(ts, weights, key)
    return out


class _Writer:
    """Copy-on-write view of the global state: a tensor is cloned the first time it is written."""

    def __init__(self, base: dict[str, Tensor]) -> None:
        self.state = dict(base)
        self._cloned: set[str] = set()

    def write(self, sl: TensorSlice, value: Tensor) -> None:
        """``value`` must already have the target's dtype and device (see ``weighted_mean``)."""
        if sl.dim is None:
            self.state[sl.key] = value  # a fresh tensor: nothing to clone
            self._cloned.add(sl.key)
            return
        if sl.key not in self._cloned:
            self.state[sl.key] = self.state[sl.key].detach().clone()
            self._cloned.add(sl.key)
        sl.write(self.state, value)


def _aggregate_units(
    kind: str,
    global_state: dict[str, Tensor],
    slices_by_unit: dict[UnitId, list[TensorSlice]],
    updates: Sequence[ClientUpdate],
    writer: _Writer,
) -> None:
    """Per-unit rule: no holder → unchanged; one → its copy; several → weighted mean."""
    for upd in updates:
        sent = upd.experts if kind == "expert" else upd.routers
        for unit, tensors in sent.items():
            if unit not in slices_by_unit:
                raise ValueError(f"Client {upd.client_id} sent {kind} {unit}, which the layout does not have.")
            if len(tensors) != len(slices_by_unit[unit]):
                raise ValueError(
                    f"Client {upd.client_id} sent {len(tensors)} tensors for {kind} {unit}; "
                    f"the layout has {len(slices_by_unit[unit])} slices."
                )
    for unit, slices in slices_by_unit.items():
        holders = [u for u in updates if unit in (u.experts if kind == "expert" else u.routers)]
        if not holders:
            continue  # unchanged: the output shares the global tensor (or its untouched rows)
        weights = [h.num_examples for h in holders]
        for s, sl in enumerate(slices):
            want = tuple(sl.read(global_state).shape)
            parts = []
            for h in holders:
                t = (h.experts if kind == "expert" else h.routers)[unit][s]
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"Client {h.client_id} sent {kind} {unit} slice {s} (`{sl.key}`) with shape "
                        f"{tuple(t.shape)}; the global slice has shape {want}."
                    )
                parts.append(t)
            dst = global_state[sl.key]
            mean = weighted_mean(parts, weights, f"{kind} {unit} `{sl.key}`", dtype=dst.dtype, device=dst.device)
            writer.write(sl, mean)


def modular_aggregate(
    global_state: dict[str, Tensor], layout: UnitLayout, updates: Sequence[ClientUpdate]
) -> dict[str, Tensor]:
    """Modular aggregation (docs/algorithms.md §1.2 step 4; Algorithm 1 line 9).

    * dense keys sent by at least one client: example-weighted FedAvg over the clients that
      sent them (keys sent by nobody stay unchanged);
    * expert ``(i, j)``: held by no client → unchanged (bit-identical); by one → that
      client's copy exactly; by several → their example-weighted average;
    * router rows ``(i, j)``: the same rule, per unit.

    Returns a NEW dict; ``global_state`` and the update tensors are not modified. A tensor
    that no update touches is *shared* (the same object as in ``global_state``); a tensor
    that is written (even partially, e.g. one row of a fused expert tensor) is a fresh
    clone whose untouched rows are bit-identical to the input.

    Raises :class:`ValueError` when a tensor's shape differs from its slice's shape (naming
    client, unit and shapes), for a unit or dense key the global state/layout does not
    have, for a dense key that is also an expert/router slice key, and for negative example
    counts or an all-zero weight sum among a unit's holders.
    """
    for upd in updates:
        if upd.num_examples < 0:
            raise ValueError(f"Client {upd.client_id} reports {upd.num_examples} examples; must be >= 0.")
    sliced = {sl.key for sls in (*layout.experts.values(), *layout.routers.values()) for sl in sls}
    writer = _Writer(global_state)

    dense_keys: list[str] = []
    for upd in updates:
        for key, t in upd.dense.items():
            if key not in global_state:
                raise ValueError(f"Client {upd.client_id} sent dense tensor `{key}`, absent from the global state.")
            if key in sliced:
                raise ValueError(f"Client {upd.client_id} sent `{key}` as dense, but the layout slices it per expert.")
            if tuple(t.shape) != tuple(global_state[key].shape):
                raise ValueError(
                    f"Client {upd.client_id} sent dense `{key}` with shape {tuple(t.shape)}; "
                    f"the global tensor has shape {tuple(global_state[key].shape)}."
                )
            if key not in dense_keys:
                dense_keys.append(key)
    for key in dense_keys:
        senders = [u for u in updates if key in u.dense]
        dst = global_state[key]
        value = weighted_mean(
            [u.dense[key] for u in senders], [u.num_examples for u in senders], f"dense `{key}`",
            dtype=dst.dtype, device=dst.device,
        )
        writer.write(TensorSlice(key), value)

    _aggregate_units("expert", global_state, layout.experts, updates, writer)
    _aggregate_units("router", global_state, layout.routers, updates, writer)
    return writer.state
