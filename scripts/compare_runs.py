"""Compare two run directories written by ``fedmoe run``: are the outputs bit-identical?

    python scripts/compare_runs.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]

What is compared, file by file over the union of both trees:

* ``rounds.jsonl``: every record, with the timing fields (:data:`TIME_KEYS`) removed at any depth;
* ``summary.json``: the same, after removing :data:`TIME_KEYS`;
* checkpoints' ``state.json`` with its ``state.safetensors``: the encoded state tree with each
  tensor reference replaced by the tensor (dtype, shape, bytes) and :data:`TIME_KEYS` removed;
  the same entries in another dict order (SCAFFOLD's client variates come from safetensors
  bytes, whose Rust hash map orders them per process) are a ``note:`` line;
* ``*.safetensors`` (global trainable state, checkpoints, FLEx side experts): every tensor
  bitwise (dtype, shape and bytes) and the metadata;
* ``manifest.json`` of checkpoints: as JSON without the ``files`` hashes (the files themselves
  are compared above);
* ``*.pkl`` (checkpoint state): the opcode stream of the pickle (:mod:`pickletools`), with the
  float that follows a :data:`TIME_KEYS` key masked (the round records inside hold wall times),
  frame sizes ignored, and each tensor torch nested in it compared by dtype, shape and bytes
  (its storage keys vary between runs). Nothing is unpickled; nested tensors are read with
  ``torch.load(weights_only=True)``: no code from the files runs. Run both sides with the same
  ``PYTHONHASHSEED`` (e.g. 0): checkpoints pickle sets of strings, whose order follows hashing.
  Dicts rebuilt from safetensors bytes (SCAFFOLD's client variates) came in the order of its
  Rust hash map, which changed per process, in runs written before ``from_bytes`` sorted them:
  the same opcodes in another order are reported as a ``note:`` line, not as a difference;
* ``config.toml``: byte for byte; when the bytes differ but the values are equal once keys that
  moved section (:data:`fedmoe.config_keys.MOVED`, e.g. ``fedmoe.rounds`` → ``federation.rounds``)
  carry their new names, a ``note:`` line (a run written before the move against one written after);
  the flat config inside checkpoints' ``manifest.json`` is compared after the same renaming;
* everything else (``expert_map.json``, ``p_by_task.json``, ``LATEST`` …): byte
  for byte.

A file present on one side only is a difference. Exit status 0 when every pair is identical,
1 otherwise (each difference on one line), 2 for a missing directory. ``note:`` lines never
change the status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: fields holding measured times: they differ between any two runs
TIME_KEYS = frozenset({"wall_time_s"})
#: prefix of lines that describe a difference that is not one (the outputs are still identical)
NOTE = "note: "


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensors(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], dict[str, str]]:
    """Key → (dtype, shape, raw bytes) of every tensor of a safetensors file, and its metadata."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out[key] = (str(t.dtype), tuple(t.shape), raw)
    return out, meta


#: a tensor pickled by torch is a nested legacy ``torch.save`` blob; its storage keys are not
#: deterministic, so the tensor inside is compared instead
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _torch_blob(data: bytes) -> tuple[str, str, tuple[int, ...], bytes]:
    """A nested torch tensor or storage as (dtype, shape, raw bytes), read with ``weights_only=True`` (no code runs)."""
    import io

    import torch

    t = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if isinstance(t, torch.storage.TypedStorage):  # pickled tensors nest their storage
        t = torch.empty(0, dtype=t.dtype).set_(t)
    return ("tensor", str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _pickle_ops(data: bytes) -> list[tuple[str, Any]]:
    """The opcodes of a pickle with their arguments; a float right after a time key becomes None."""
    import pickletools

    memo: dict[int, Any] = {}
    ops: list[tuple[str, Any]] = []
    last: Any = None  # the value the previous opcode pushed, when it is a string (else None)
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = last
            ops.append((name, None if name == "MEMOIZE" else arg))
            continue
        if name in ("BINFLOAT", "FLOAT") and last in TIME_KEYS:
            arg = None
        elif name == "FRAME":  # frame sizes follow the sizes of the blobs compared below
            arg = None
        elif isinstance(arg, bytes) and arg.startswith(_TORCH_LEGACY_MAGIC):
            arg = _torch_blob(arg)
        ops.append((name, arg))
        last = memo.get(int(arg)) if name in ("BINGET", "LONG_BINGET", "GET") else arg if isinstance(arg, str) else None
    return ops


def _canon(tree: Any, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], ordered: bool) -> Any:
    """A checkpoint state tree (:mod:`fedmoe.engine.safe_state` encoding) with each tensor
    reference replaced by the tensor (dtype, shape, bytes) and the time keys removed; with
    ``ordered`` False, dict entries are sorted (their order can follow a hash map)."""

    def c(o: Any) -> Any:
        if isinstance(o, list):
            return tuple(c(x) for x in o)
        if not isinstance(o, dict):
            return o
        tag = o.get("__t")
        if tag in ("tensor", "ndarray"):
            return ("tensor", tensors.get(o.get("k")), o.get("dtype"))
        if tag == "dict":
            items = [(c(k), c(v)) for k, v in o.get("items", []) if k not in TIME_KEYS]
            return ("dict", tuple(items) if ordered else tuple(sorted(items, key=repr)))
        return tuple((k, c(v)) for k, v in sorted(o.items()) if k not in TIME_KEYS)

    return c(tree)


def _compare_state(a: Path, b: Path, rel: str) -> list[str]:
    ta, tb = json.loads(a.read_text()), json.loads(b.read_text())
    sa = a.parent / "state.safetensors"
    sb = b.parent / "state.safetensors"
    xa = _tensors(sa)[0] if sa.is_file() else {}
    xb = _tensors(sb)[0] if sb.is_file() else {}
    if _canon(ta, xa, True) == _canon(tb, xb, True):
        return []
    if _canon(ta, xa, False) == _canon(tb, xb, False):
        return [f"{NOTE}{rel}: same entries in another order (dicts filled from safetensors bytes follow its hash map)"]
    return [f"{rel}: differs"]


def compare_file(a: Path, b: Path, rel: str) -> list[str]:
    """Differences between two files of the same relative path ``rel`` (empty: identical)."""
    name = a.name
    if name == "state.safetensors" and (a.parent / "state.json").is_file():
        return []  # the tensors of state.json: compared with it
    if name.endswith(".safetensors"):
        (ta, ma), (tb, mb) = _tensors(a), _tensors(b)
        diffs = [f"{rel}: metadata differs"] if ma != mb else []
        for key in sorted(set(ta) | set(tb)):
            if key not in ta or key not in tb:
                diffs.append(f"{rel}: tensor {key} only in {'A' if key in ta else 'B'}")
            elif ta[key][:2] != tb[key][:2]:
                diffs.append(f"{rel}: tensor {key} dtype/shape {ta[key][:2]} vs {tb[key][:2]}")
            elif ta[key][2] != tb[key][2]:
                diffs.append(f"{rel}: tensor {key} values differ")
        return diffs
    if name == "rounds.jsonl":
        ra = [_strip(json.loads(x)) for x in a.read_text().splitlines() if x.strip()]
        rb = [_strip(json.loads(x)) for x in b.read_text().splitlines() if x.strip()]
        if len(ra) != len(rb):
            return [f"{rel}: {len(ra)} vs {len(rb)} records"]
        return [f"{rel}: round record {i} differs" for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y]
    if name == "state.json":  # a checkpoint's server state (round records inside) + its state.safetensors
        return _compare_state(a, b, rel)
    if name == "summary.json":
        return [] if _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text())) else [f"{rel}: differs"]
    if name.endswith(".pkl"):
        oa, ob = _pickle_ops(a.read_bytes()), _pickle_ops(b.read_bytes())
        if oa == ob:
            return []
        if sorted(map(repr, oa)) == sorted(map(repr, ob)):
            return [f"{NOTE}{rel}: same entries in another order (dicts filled from safetensors bytes follow its hash map)"]
        return [f"{rel}: pickled state differs"]
    if name == "manifest.json":
        ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
        ja.pop("files", None)
        jb.pop("files", None)
        for j in (ja, jb):  # a run written before a config key moved: the key under its new name
            j["config"] = migrate_flat(j.get("config", {}))
        return [] if ja == jb else [f"{rel}: differs"]
    if a.read_bytes() == b.read_bytes():
        return []
    if name == "config.toml" and _moved_equal(a, b):
        return [f"{NOTE}{rel}: same config once moved keys carry their new names (fedmoe.config_keys.MOVED)"]
    return [f"{rel}: bytes differ"]


def migrate_flat(flat: dict[str, Any]) -> dict[str, Any]:
    from fedmoe.config_keys import migrate_flat as migrate

    return migrate(flat)


def _moved_equal(a: Path, b: Path) -> bool:
    """Whether two ``config.toml`` files hold the same values once moved keys are renamed."""
    import tomllib

    from fedmoe.config_keys import migrate

    try:
        return migrate(tomllib.loads(a.read_text())) == migrate(tomllib.loads(b.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def compare_runs(a: Path, b: Path) -> list[str]:
    """Every difference between run directories ``a`` and ``b`` (empty list: identical)."""
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs = [f"{rel}: only in {'A' if rel in files_a else 'B'}" for rel in sorted(files_a ^ files_b)]
    for rel in sorted(files_a & files_b):
        diffs += compare_file(a / rel, b / rel, rel)
    return diffs


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print("usage: compare_runs.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]", file=sys.stderr)
        return 2
    status = 0
    for a, b in zip(argv[::2], argv[1::2], strict=True):
        pa, pb = Path(a), Path(b)
        for p in (pa, pb):
            if not p.is_dir():
                print(f"{p}: no such run directory; pass two folders written by `fedmoe run --out`.", file=sys.stderr)
                return 2
        lines = compare_runs(pa, pb)
        diffs = [d for d in lines if not d.startswith(NOTE)]
        n = sum(1 for p in pa.rglob("*") if p.is_file())
        print(f"{'IDENTICAL' if not diffs else 'DIFFERENT'} {pa} {pb} ({n} files)")
        for d in lines:
            print("  " + d)
        status |= bool(diffs)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
