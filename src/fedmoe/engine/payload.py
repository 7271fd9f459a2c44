"""Payloads are really serialised (safetensors bytes) and their sizes counted.

The in-process engine passes bytes between "server" and "client" exactly as a network
engine would, so byte counts are those of real messages.

Tied / shared tensors (Switch Transformers' ``shared`` = encoder/decoder embeddings =
``lm_head``; tied input/output embeddings of Llama-style decoders) cross once, as
``safetensors.torch.save_model`` writes them: one name keeps the data and every other name
of the same tensor is recorded in the header metadata as ``{dropped name: kept name}``
(:func:`from_bytes` and :func:`load_tensors_file` restore it as the same tensor object).
Views that only partly overlap another tensor are copied, so they are sent in full.
:func:`payload_size` computes ``len(to_bytes(tensors))`` from tensor metadata alone.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import _TYPES, _find_shared_tensors, load, save

#: safetensors' order of the data section: larger alignment first (its ``Dtype`` order, reversed)
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
          "I64", "U64")
_NAME = {v: k for k, v in _TYPES.items()}


def _key(v: torch.Tensor) -> tuple:
    return (v.device, v.dtype, v.data_ptr(), tuple(v.shape), v.stride())


def dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(unique, aliases)``: names of one tensor (same storage, offset, shape, stride) keep
    the first name in sorted order (as ``save_model`` does for complete tensors);
    ``aliases`` maps every dropped name to the kept one."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k in sorted(tensors):
        v = tensors[k]
        key = _key(v) if v.numel() and v.device.type != "meta" else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
        else:
            unique[k] = v
            if key is not None:
                seen[key] = k
    return unique, aliases


def _prepare(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    unique, aliases = dedupe(tensors)
    out = {k: v.detach().contiguous().cpu() for k, v in unique.items()}
    for group in _find_shared_tensors(out):  # partial overlaps left after de-duplication
        if len(group) > 1:
            for k in group:
                out[k] = out[k].clone()
    return out, (aliases or None)


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    if not tensors:
        return b""
    out, meta = _prepare(tensors)
    return save(out, metadata=meta)


def _header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n])


def _restore(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None) -> dict[str, torch.Tensor]:
    for alias, kept in (meta or {}).items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    return tensors


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of ``data``, in sorted key order (safetensors returns them in its hash map's order,
    which changes per process: a checkpoint holding such a dict would not be byte-reproducible)."""
    if not data:
        return {}
    loaded = load(data)
    return _restore({k: loaded[k] for k in sorted(loaded)}, _header(data).get("__metadata__"))


def payload_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 wire_dtype: str = "fp32") -> int:
    """``len(to_bytes(tensors))`` computed from names, dtypes and shapes (nothing serialised).

    Extra ``metadata`` is counted as if it were written too. ``wire_dtype``: the size of
    ``to_bytes(to_wire(tensors, wire_dtype))`` (float32 tensors counted in that dtype; nothing cast).
    Tensors on the ``meta`` device count by their shape (never de-duplicated).
    """
    if not tensors:
        return 0
    unique, aliases = dedupe(tensors)
    meta = {**(metadata or {}), **aliases}
    wire = WIRE_DTYPES[wire_dtype]

    def dtype_of(v: torch.Tensor) -> torch.dtype:
        return wire if v.dtype == torch.float32 else v.dtype

    rows = sorted(((_NAME[dtype_of(v)], k, v.numel() * dtype_of(v).itemsize, list(v.shape)) for k, v in unique.items()),
                  key=lambda r: (-_ORDER.index(r[0]), r[1]))
    parts, offset = [], 0
    if meta:
        parts.append('"__metadata__":' + _dumps(meta))
    for dtype, name, nbytes, shape in rows:
        info = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        parts.append(_dumps(name) + ":" + _dumps(info))
        offset += nbytes
    header = len(("{" + ",".join(parts) + "}").encode())
    return 8 + header + (-header % 8) + offset


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def save_tensors_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``tensors`` (tied names kept once) to ``path`` via a temp file, fsync'ed, renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(to_bytes(tensors) if tensors else save({}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_tensors_file` (or any safetensors file)."""
    return from_bytes(Path(path).read_bytes())


#: ``engine.wire_dtype`` → the dtype floating tensors travel in
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Cast float32 tensors to ``wire_dtype`` for sending (other dtypes travel unchanged).
    Names of one tensor (tied weights) stay one tensor, so it is still sent once."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return tensors
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in tensors.items():
        if v.dtype != torch.float32:
            out[k] = v
        elif v.device.type == "meta" or not v.numel():
            out[k] = v.detach().to(dtype)
        else:
            key = _key(v)
            if key not in cast:
                cast[key] = v.detach().to(dtype)
            out[k] = cast[key]
    return out


def from_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Cast received ``wire_dtype`` tensors back to float32 (exactly: every bf16/fp16 value is an fp32)."""
    dtype = WIRE_DTYPES[wire_dtype]
    if dtype == torch.float32:
        return tensors
    return {k: v.float() if v.dtype == dtype else v for k, v in tensors.items()}
