"""Names of personal tensors: FLEx's grafted side experts and gates (docs/algorithms.md §4.2–4.3).

A leaf, so that the model surgery that creates these tensors (:mod:`fedmoe.moe.graft`) and the
server bookkeeping that must never aggregate them (:mod:`fedmoe.algorithms.flex`) name them
alike without ``moe`` importing ``algorithms``.
"""

from __future__ import annotations

from collections.abc import Iterable

#: substrings naming the personal (side) tensors, see :func:`fedmoe.moe.graft.graft_side_experts`
SIDE_MARKERS: tuple[str, ...] = ("side_expert", "side_gate")


def is_personal(key: str, markers: Iterable[str] = SIDE_MARKERS) -> bool:
    """Whether ``key`` names a side-expert / side-gate tensor (a path component contains a marker)."""
    parts = key.split(".")
    return any(m in part for m in markers for part in parts)
