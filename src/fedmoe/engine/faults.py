"""Client faults: how a reply is checked before it may be aggregated, and test-time injection.

ALGORITHMS-independent server hygiene (issue "Reliability"): a client turn that raises, runs past
``engine.client_timeout_s``, or returns tensors with NaN/Inf, of the wrong shape or for experts it
was not given, is *rejected*: logged with its reason in ``rounds.jsonl`` (``ClientRecord.error``)
and never aggregated. Both engines call :func:`check_upload` on what came back, against what a
correct client would send (:func:`expected_upload`, computed on the server from the sub-MoE it
sent).

Fault injection (``engine.inject_faults`` in-process, the run config's ``inject-fault`` on Flower)
exists for tests and drills: ``"ROUND:CLIENT[:KIND],…"`` with KIND one of :data:`FAULT_KINDS`
(default ``raise``). The faults are applied on the client side by :func:`corrupt_upload` /
:class:`InjectedFault` so the server-side checks see exactly what a faulty client would send.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmoe.errors import ConfigError
from fedmoe.faultspec import FAULT_KINDS, parse_faults  # noqa: F401 — re-exported: moved to a leaf for config

if TYPE_CHECKING:  # torch is imported where used: config validation and Flower settings stay light
    import torch


#: one module per expert: ``….experts.3.…`` (Mixtral-style lists) or ``….experts.expert_3.…`` (Switch)
_EXPERT_INDEX = re.compile(r"\.experts\.(?:expert_)?(\d+)\.")


class ClientFault(Exception):
    """A client turn that is rejected; ``str(exc)`` is the reason written to ``rounds.jsonl``."""


class ClientTimeout(ClientFault):
    """The client did not finish before ``engine.client_timeout_s``."""


class InjectedFault(RuntimeError):
    """Raised by a client turn selected for the ``raise`` fault (tests and drills only)."""


# -- server side: checks ---------------------------------------------------------------------------
def expected_upload(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key → shape of what a correct client uploads (computed from the server's own copy)."""
    return {k: tuple(v.shape) for k, v in state.items()}


def check_upload(expected: Mapping[str, tuple[int, ...]], upload: Mapping[str, torch.Tensor],
                 loss: float | None = None) -> None:
    """Raise :class:`ClientFault` with the reason if ``upload`` must not be aggregated.

    Checked, in order: tensors the client was not given (e.g. for an expert outside its
    sub-MoE), tensors missing, shapes, non-finite values, a non-finite loss.
    """
    import torch

    extra = sorted(set(upload) - set(expected))
    if extra:
        raise ClientFault(f"rejected: {len(extra)} tensor(s) it was not given, e.g. `{extra[0]}`")
    missing = sorted(set(expected) - set(upload))
    if missing:
        raise ClientFault(f"rejected: {len(missing)} tensor(s) missing, e.g. `{missing[0]}`")
    for key in sorted(upload):
        got, want = tuple(upload[key].shape), tuple(expected[key])
        if got != want:
            raise ClientFault(f"rejected: `{key}` has shape {list(got)}, expected {list(want)}")
    for key in sorted(upload):
        t = upload[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ClientFault(f"rejected: `{key}` holds NaN/Inf values")
    if loss is not None and not math.isfinite(loss):
        raise ClientFault(f"rejected: training loss is {loss}")


def check_reply(reply: Any, p_shape: tuple[int, int], extra_down: Mapping[str, torch.Tensor] | None) -> None:
    """Every field of a reply besides the tensors: the same rejection path as :func:`check_upload`.

    ``p`` must be a finite ``[L, E]`` array of ``p_shape`` with values in [0, 1] and layer sums
    <= 1; score, steps and peak memory finite and >= 0; an extra named like one sent down
    (SCAFFOLD's Δc for c) must have its shape and be finite; any other extra (FLEx's e*) must be
    integer expert ids, one per MoE layer, below ``E``.
    """
    import numpy as np
    import torch

    p = reply.p
    if not isinstance(p, np.ndarray) or tuple(p.shape) != tuple(p_shape):
        raise ClientFault(f"rejected: routing statistics p have shape {list(getattr(p, 'shape', []))}, "
                          f"expected {list(p_shape)}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1 + 1e-6).any() or (p.sum(-1) > 1 + 1e-4).any():
        raise ClientFault("rejected: routing statistics p are not probabilities (NaN/Inf, < 0, > 1 or sum > 1)")
    for name in ("score", "steps", "peak_memory_bytes"):
        v = getattr(reply, name)
        if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ClientFault(f"rejected: {name} is {v!r}")
    down = extra_down or {}
    for key, t in sorted((reply.extra or {}).items()):
        if not isinstance(t, torch.Tensor):
            raise ClientFault(f"rejected: extra `{key}` is not a tensor")
        if key in down:
            if tuple(t.shape) != tuple(down[key].shape):
                raise ClientFault(f"rejected: extra `{key}` has shape {list(t.shape)}, expected {list(down[key].shape)}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ClientFault(f"rejected: extra `{key}` holds NaN/Inf values or is not floating point")
        elif t.is_floating_point() or tuple(t.shape) != (p_shape[0],) or bool(((t < 0) | (t >= p_shape[1])).any()):
            raise ClientFault(f"rejected: extra `{key}` is not one expert id per MoE layer (shape {list(t.shape)})")


def check_update_norm(upload: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], bound: float) -> float:
    """‖upload − sent‖₂ over the floating tensors both hold; rejects above ``bound`` (0: no bound)."""
    import torch

    total = 0.0
    for key in sorted(set(upload) & set(sent)):
        u, s = upload[key], sent[key]
        if u.is_floating_point() and u.shape == s.shape:
            total += float(torch.sum((u.double() - s.double()) ** 2))
    norm = math.sqrt(total)
    if bound > 0 and not norm <= bound:
        raise ClientFault(f"rejected: update norm {norm:.4g} exceeds engine.max_update_norm = {bound:g}")
    return norm


def corrupt_fields(p: Any, extra: dict[str, torch.Tensor] | None, kind: str) -> tuple[Any, dict | None]:
    """What a faulty client of ``kind`` sends as ``p`` / extras (copies; inputs kept)."""
    if kind == "bad_p":
        p = p.copy()
        p.flat[0] = float("nan")
    elif kind == "bad_extra":
        extra = dict(extra or {})
        floats = sorted(k for k, v in extra.items() if v.is_floating_point() and v.numel())
        ints = sorted(k for k, v in extra.items() if not v.is_floating_point() and v.numel())
        if floats:
            t = extra[floats[0]].clone()
            t.view(-1)[0] = float("nan")
            extra[floats[0]] = t
        elif ints:
            extra[ints[0]] = extra[ints[0]] + 10**6
        else:
            p = p.copy()
            p.flat[0] = -0.5
        extra = extra or None
    return p, extra


class Deadline:
    """``check()`` raises :class:`ClientTimeout` once ``seconds`` have passed (0: never)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def passed(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.start > self.seconds

    def check(self) -> None:
        if self.passed():
            raise ClientTimeout(f"rejected: no reply within the client timeout of {self.seconds:g} s")

    def hang(self, poll: float = 0.05) -> None:
        """Wait until the deadline passes, then raise (the ``timeout`` fault: a client that hangs)."""
        if self.seconds <= 0:
            raise ConfigError("The `timeout` fault needs a client timeout.",
                              "set engine.client_timeout_s > 0 (in-process) or round-timeout (Flower).")
        while not self.passed():
            time.sleep(poll)
        self.check()


# -- client side: injection ------------------------------------------------------------------------
def corrupt_upload(upload: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """What a faulty client of ``kind`` sends instead of ``upload`` (a new dict; input kept)."""
    import torch

    out = dict(upload)
    floats = sorted(k for k, v in out.items() if v.is_floating_point() and v.numel())
    if not floats:
        return out
    key = floats[0]
    if kind in ("nan", "inf"):
        t = out[key].clone()
        t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
        out[key] = t
    elif kind == "big_update":
        out[key] = out[key] + 1e4
    elif kind == "shape":
        t = out[key]
        out[key] = torch.cat([t, t[:1]], 0) if t.dim() else t.reshape(1)
    elif kind == "extra_expert":
        indexed = [(k, m) for k in sorted(out) if (m := _EXPERT_INDEX.search(k))]
        if indexed:  # one module per expert: a tensor for the next expert index (never given)
            k, m = indexed[0]
            prefix = k[: m.start(1)]
            top = max(int(mm.group(1)) for kk, mm in indexed if kk[: mm.start(1)] == prefix)
            out[f"{prefix}{top + 1}{k[m.end(1):]}"] = out[k].clone()
        else:  # fused experts [E, …]: one more expert row than it holds
            fused = [k for k in sorted(out) if ".experts." in k and out[k].dim() >= 2] or floats
            t = out[fused[0]]
            out[fused[0]] = torch.cat([t, t[:1]], 0)
    return out
