"""Payloads are really serialised (safetensors bytes) and their sizes counted.

The in-process engine passes bytes between "server" and "client" exactly as a network
engine would, so byte counts are those of real messages.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    if not tensors:
        return b""
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return load(data) if data else {}
