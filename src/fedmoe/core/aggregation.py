"""Modular aggregation of heterogeneous sub-MoE updates (docs/algorithms.md §1.2 step 4).

Paper (Mei et al. 2024, "Modular Aggregation", Algorithm 1 line 9): dense parameters are
FedAvg'd; an expert held by no sampled client stays unchanged, one held by a single client
is replaced by that client's copy, one held by several is their FedAvg; "the
expert-corresponding dimensions of routers are updated in the same pattern". All averages
are weighted by the clients' example counts, the FedAvg weights |D_k| / Σ|D_k| of eq. 2.

Numerics: weighted averages into float32 tensors are accumulated in float32, straight into the
output's memory (``out = w_1·t_1; out += w_k·t_k``, no dtype conversions or temporaries); the
error against the exact weighted mean is at most ``γ_{K+1} · Σ_k w_k·|t_k|`` elementwise
(``K`` contributors, ``γ_n = n·u / (1 − n·u)``, ``u = 2⁻²⁴``: each term passes through at most
``K + 1`` roundings — its weight, its product and the ``K − 1`` additions; plus ``(K+1)·2⁻¹⁴⁹``
where results are subnormal), so for ``K ≤ 14`` it
stays below ``2⁻²⁰ · max_k |t_k|`` (checked against a float64 oracle in the tests). Other floating
dtypes (bf16, fp16, fp64) are accumulated in float64 and cast back once. With a single
contributor the tensor is copied exactly (no arithmetic). Non-floating tensors (integer/bool
buffers) are never averaged: all contributors must send the same value, otherwise
:class:`ValueError` is raised.
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
    out: Tensor | None = None,
) -> Tensor:
    """Example-weighted mean ``Σ_k (w_k/Σw)·t_k`` of same-shaped tensors (see the module's numerics).

    The result has ``dtype`` (default: ``tensors[0].dtype``) on ``device`` (default:
    ``tensors[0].device``); with ``out`` (a tensor or view of that shape) it is written there and
    ``out`` is returned. One contributor: an exact copy (only the dtype cast, no arithmetic).
    Non-floating dtypes: the common value (ValueError if contributors disagree). Without ``out``
    it always returns a fresh tensor.
    """
    if not tensors:
        raise ValueError(f"{what}: nothing to average.")
    if len(tensors) != len(weights):
        raise ValueError(f"{what}: {len(tensors)} tensors but {len(weights)} weights.")
    first = tensors[0].detach()
    if out is not None:
        dtype, device = out.dtype, out.device
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else device
    ws = normalised_weights(weights, f"{what} weights")
    if len(tensors) > 1 and not first.is_floating_point():
        for t in tensors[1:]:
            if not torch.equal(t.detach().to(first.device), first):
                raise ValueError(f"{what}: non-floating tensors ({first.dtype}) differ between clients; cannot average.")
    if len(tensors) == 1 or not first.is_floating_point():
        if out is None:
            return first.to(device=device, dtype=dtype, copy=True)
        return out.copy_(first)
    if dtype == torch.float32:
        acc = out if out is not None else torch.empty(first.shape, dtype=dtype, device=device)
        torch.mul(first.to(device=device, dtype=dtype), ws[0], out=acc)
        for w, t in zip(ws[1:], tensors[1:], strict=True):
            acc.add_(t.detach().to(device=device, dtype=dtype), alpha=w)
        return acc
    acc = torch.zeros(first.shape, dtype=torch.float64, device=device)
    for w, t in zip(ws, tensors, strict=True):
        acc.add_(t.detach().to(device=device, dtype=torch.float64), alpha=w)
    return acc.to(dtype) if out is None else out.copy_(acc)


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


def _slice_shape(t: Tensor, sl: TensorSlice) -> tuple[int, ...]:
    """Shape of ``sl.read(state)`` without reading (copying) it."""
    if sl.dim is None:
        return tuple(t.shape)
    shape = list(t.shape)
    shape[sl.dim] = len(sl.index)
    return tuple(shape)


def _slice_view(t: Tensor, sl: TensorSlice) -> Tensor | None:
    """A view of ``t`` covering ``sl`` (an evenly spaced index along one dim), or None."""
    if sl.dim is None:
        return t
    idx = sl.index
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in zip(idx, idx[1:], strict=False)):
        return None
    return t.narrow(sl.dim, idx[0], idx[-1] - idx[0] + 1)[(slice(None),) * sl.dim + (slice(None, None, step),)]


class _Writer:
    """Copy-on-write view of the global state: a tensor is cloned the first time it is written."""

    def __init__(self, base: dict[str, Tensor]) -> None:
        self.state = dict(base)
        self._cloned: set[str] = set()

    def mean_into(self, sl: TensorSlice, parts: list[Tensor], weights: list[int], what: str) -> None:
        """Write the weighted mean of ``parts`` into ``sl`` (in place where ``sl`` is a view)."""
        if sl.dim is None and sl.key not in self._cloned:  # a whole tensor: a fresh result, no clone
            dst = self.state[sl.key]
            self.state[sl.key] = weighted_mean(parts, weights, what, dtype=dst.dtype, device=dst.device)
            self._cloned.add(sl.key)
            return
        if sl.key not in self._cloned:
            self.state[sl.key] = self.state[sl.key].detach().clone()
            self._cloned.add(sl.key)
        view = _slice_view(self.state[sl.key], sl)
        if view is not None:
            weighted_mean(parts, weights, what, out=view)
        else:
            dst = self.state[sl.key]
            sl.write(self.state, weighted_mean(parts, weights, what, dtype=dst.dtype, device=dst.device))


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
            want = _slice_shape(global_state[sl.key], sl)
            parts = []
            for h in holders:
                t = (h.experts if kind == "expert" else h.routers)[unit][s]
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"Client {h.client_id} sent {kind} {unit} slice {s} (`{sl.key}`) with shape "
                        f"{tuple(t.shape)}; the global slice has shape {want}."
                    )
                parts.append(t)
            writer.mean_into(sl, parts, weights, f"{kind} {unit} `{sl.key}`")


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
        writer.mean_into(TensorSlice(key), [u.dense[key] for u in senders], [u.num_examples for u in senders],
                         f"dense `{key}`")

    _aggregate_units("expert", global_state, layout.experts, updates, writer)
    _aggregate_units("router", global_state, layout.routers, updates, writer)
    return writer.state
