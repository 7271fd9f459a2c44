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


#: ``engine.wire_dtype`` → the dtype floating tensors travel in
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Cast float32 tensors to ``wire_dtype`` for sending (other dtypes travel unchanged)."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return tensors
    return {k: v.detach().to(dtype) if v.dtype == torch.float32 else v for k, v in tensors.items()}


def from_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Cast received ``wire_dtype`` tensors back to float32 (exactly: every bf16/fp16 value is an fp32)."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return tensors
    return {k: v.float() if v.dtype == dtype else v for k, v in tensors.items()}
