"""Server state to JSON + safetensors and back, without pickle.

:func:`encode` turns a nested value into a JSON-able tree and a flat tensor dict (for one
safetensors file); :func:`decode` reverses it. Decoding cannot run code from the file: it
builds only JSON scalars, lists, dicts, tuples, sets, tensors, numpy arrays and scalars, and
instances of dataclasses that fedmoe itself defines and has already imported (looked up by
name in an allow-list, constructed field by field through their own ``__init__``). Anything
else is refused with :class:`StateFormatError`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np
import torch

_TAG = "__t"


class StateFormatError(ValueError):
    """The state file holds something the decoder does not build."""


def _key(k: Any) -> Any:
    if isinstance(k, str | int | float | bool) or k is None:
        return k
    if isinstance(k, tuple):
        return [_key(x) for x in k]
    raise TypeError(f"cannot encode dict key of type {type(k).__name__}")


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}

    def enc(o: Any) -> Any:
        if o is None or isinstance(o, bool | str):
            return o
        if isinstance(o, int):
            return o
        if isinstance(o, float):
            return o if math.isfinite(o) else {_TAG: "float", "v": repr(o)}
        if isinstance(o, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = o.detach().cpu().contiguous()
            return {_TAG: "tensor", "k": name}
        if isinstance(o, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(o).copy())
            return {_TAG: "ndarray", "k": name, "dtype": str(o.dtype)}
        if isinstance(o, np.generic):
            return {_TAG: "np", "dtype": str(o.dtype), "v": enc(o.item())}
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            cls = type(o)
            return {_TAG: "dc", "cls": f"{cls.__module__}:{cls.__qualname__}",
                    "f": {f.name: enc(getattr(o, f.name)) for f in dataclasses.fields(o) if f.init}}
        if isinstance(o, dict):
            return {_TAG: "dict", "items": [[enc(_key(k)), enc(v)] for k, v in o.items()],
                    "ktup": [isinstance(k, tuple) for k in o]}
        if isinstance(o, tuple):
            return {_TAG: "tuple", "v": [enc(x) for x in o]}
        if isinstance(o, set | frozenset):
            return {_TAG: "set", "v": [enc(x) for x in sorted(o, key=repr)]}
        if isinstance(o, list):
            return [enc(x) for x in o]
        raise TypeError(f"cannot encode checkpoint value of type {type(o).__name__}")

    return enc(obj), tensors


def _dataclass(name: str) -> type:
    mod, _, qual = name.partition(":")
    if not (mod == "fedmoe" or mod.startswith("fedmoe.")) or mod not in sys.modules or "." in qual or not qual:
        raise StateFormatError(f"class {name!r} is not allowed in a checkpoint")
    cls = getattr(sys.modules[mod], qual, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise StateFormatError(f"class {name!r} is not allowed in a checkpoint")
    return cls


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def tensor(k: Any) -> torch.Tensor:
        if not isinstance(k, str) or k not in tensors:
            raise StateFormatError(f"tensor {k!r} missing from the state file")
        return tensors[k]

    def key(k: Any, is_tuple: bool) -> Any:
        return tuple(key(x, isinstance(x, list)) for x in k) if is_tuple else k

    def dec(o: Any) -> Any:
        if o is None or isinstance(o, bool | str | int | float):
            return o
        if isinstance(o, list):
            return [dec(x) for x in o]
        if not isinstance(o, dict) or not isinstance(o.get(_TAG), str):
            raise StateFormatError("unexpected value in the state file")
        tag = o[_TAG]
        if tag == "float":
            if o.get("v") not in ("nan", "inf", "-inf"):
                raise StateFormatError("bad float in the state file")
            return float(o["v"])
        if tag == "tensor":
            return tensor(o.get("k"))
        if tag == "ndarray":
            return tensor(o.get("k")).numpy().astype(np.dtype(str(o.get("dtype"))), copy=True)
        if tag == "np":
            return np.dtype(str(o.get("dtype"))).type(dec(o.get("v")))
        if tag == "dc":
            cls = _dataclass(str(o.get("cls")))
            fields = o.get("f")
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            if not isinstance(fields, dict) or not set(fields) <= names:
                raise StateFormatError(f"fields of {cls.__name__} do not match")
            return cls(**{k: dec(v) for k, v in fields.items()})
        if tag == "dict":
            items, ktup = o.get("items"), o.get("ktup")
            if not (isinstance(items, list) and isinstance(ktup, list) and len(items) == len(ktup)):
                raise StateFormatError("bad dict in the state file")
            return {key(dec(k), t): dec(v) for (k, v), t in zip(items, ktup, strict=True)}
        if tag == "tuple":
            return tuple(dec(x) for x in o.get("v", []))
        if tag == "set":
            return {dec(x) for x in o.get("v", [])}
        raise StateFormatError(f"unknown tag {tag!r} in the state file")

    return dec(tree)
