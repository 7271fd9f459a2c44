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
from typing import TYPE_CHECKING

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
