"""Server checkpoints after every round, and exact resume.

A checkpoint is a folder ``checkpoints/round-<r>/`` holding the global trainable tensors
(``trainable.safetensors``) and the rest of the server state (``state.json`` + the tensors and
arrays it refers to in ``state.safetensors``: the strategy's state — expert maps, ``p``,
histories, frozen flags, control variates —, the clients' base-weight caches, the round
records), plus ``manifest.json`` with SHA-256 checksums and the run's resolved config.
Every file is written to a temporary name, fsync'ed and renamed; ``checkpoints/LATEST``
(also replaced atomically) names the newest complete checkpoint, so a crash at any point
leaves the previous one usable. Randomness is seeded per round, so resuming from round r
replays rounds r+1… exactly as an uninterrupted run would.

No pickle: a checkpoint is data only (:mod:`fedmoe.engine.safe_state` builds nothing but
plain values, tensors and fedmoe's own dataclasses), so a crafted checkpoint cannot run code on
``--resume``; the checksums catch corruption, not forgery. ``--resume`` refuses a config that
differs from the manifest's in any key but :data:`RESUME_MUTABLE` and names the keys that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoe.config import config_to_dict
from fedmoe.config_keys import migrate_flat
from fedmoe.engine.payload import load_tensors_file, save_tensors_file
from fedmoe.engine.safe_state import StateFormatError, decode, encode
from fedmoe.errors import FedMoEError

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run

CKPT_DIR = "checkpoints"
LATEST = "LATEST"
FORMAT = 2
#: config keys a resumed run may change (recorded in the manifest of its next checkpoints)
RESUME_MUTABLE = ("federation.rounds", "engine.checkpoint_every", "engine.max_empty_rounds", "engine.client_timeout_s",
                  "engine.device", "engine.inject_faults")


class CheckpointError(FedMoEError):
    """A missing, corrupt or mismatched checkpoint."""


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run: Run, rnd: int, keep: int = 2) -> Path:
    root = run.out / CKPT_DIR
    d = root / f"round-{rnd:05d}"
    d.mkdir(parents=True, exist_ok=True)
    save_tensors_file(run.trainables.state, d / "trainable.safetensors")
    state = {"round": rnd, "strategy": run.strategy.state_dict(), "cache": run.cache, "rounds": run.rounds,
             "latest_p": run.latest_p, "p_snapshots": run.p_snapshots}
    tree, tensors = encode(state)
    save_tensors_file(tensors, d / "state.safetensors")
    _fsync_write(d / "state.json", json.dumps(tree).encode())
    files = ("trainable.safetensors", "state.safetensors", "state.json")
    manifest = {"format": FORMAT, "round": rnd, "algorithm": run.cfg.algorithm, "model": run.cfg.model.name,
                "seed": run.cfg.seed, "config": _flat(config_to_dict(run.cfg)),
                "files": {n: _sha(d / n) for n in files}}
    _fsync_write(d / "manifest.json", json.dumps(manifest, indent=1).encode())
    _fsync_write(root / LATEST, d.name.encode())
    older = sorted(p for p in root.glob("round-*") if p.is_dir() and p.name < d.name)
    for old in older[: max(0, len(older) - (keep - 1))]:  # never this run's newest; never a newer-named one
        shutil.rmtree(old, ignore_errors=True)
    return d


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CKPT_DIR
    if not (root / LATEST).is_file():
        return None
    name = (root / LATEST).read_text(errors="replace").strip()
    if not re.fullmatch(r"round-\d{5,}", name):
        raise CheckpointError(f"{root / LATEST} names {name[:40]!r}, not a checkpoint folder.",
                              "delete that file and resume again, or start a new run.")
    return root / name


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every flat config key that differs."""
    return [f"{k}: {old.get(k, '<unset>')!r} → {new.get(k, '<unset>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _bad(d: Path, what: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint {d} is unreadable: {what}.",
                           "delete that checkpoint folder to fall back to an older one, or start a new run.")


def load_checkpoint(run: Run, d: Path) -> int:
    """Restore ``run`` from checkpoint folder ``d``; returns the last completed round."""
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"Checkpoint {d} has no manifest.json.", "resume from a run directory written by `fedmoe run`.")
    try:
        manifest = json.loads(mpath.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(d, f"manifest.json is not a fedmoe manifest ({exc})") from None
    if manifest.get("format") != FORMAT or set(manifest["files"]) != {"trainable.safetensors", "state.safetensors",
                                                                      "state.json"}:
        raise CheckpointError(f"Checkpoint {d} has format {manifest.get('format')!r}; this fedmoe reads format {FORMAT} "
                              "(JSON + safetensors, no pickle).", "start the run again with this version of fedmoe.")
    for name, digest in manifest["files"].items():
        if not (d / name).is_file() or _sha(d / name) != digest:
            raise CheckpointError(f"Checkpoint file {d / name} is missing or corrupt (checksum mismatch).",
                                  "delete that checkpoint folder to fall back to an older one, or start a new run.")
    _check_config(run.cfg, manifest, d)
    try:
        tensors = load_tensors_file(d / "trainable.safetensors")
        tree = json.loads((d / "state.json").read_text())
        state: dict[str, Any] = decode(tree, load_tensors_file(d / "state.safetensors"))
        rnd = int(state["round"])
    except (StateFormatError, ValueError, KeyError, TypeError, OSError) as exc:
        raise _bad(d, str(exc)) from None
    if set(tensors) != set(run.trainables.state):
        raise CheckpointError(f"Checkpoint {d} does not match the model: trainable tensors differ.",
                              "resume with the same model and fine-tuning settings.")
    try:
        run.strategy.load_state_dict(state["strategy"])
        run.cache, run.rounds = state["cache"], state["rounds"]
        run.latest_p, run.p_snapshots = state.get("latest_p", {}), state.get("p_snapshots", {})
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise _bad(d, f"server state does not fit this run ({exc!r})") from None
    run.trainables.state = tensors
    return rnd


def _check_config(cfg: Any, manifest: dict[str, Any], d: Path) -> None:
    new = _flat(config_to_dict(cfg))
    old = migrate_flat(manifest.get("config", {}))  # checkpoints written before a key moved
    changed = [c for c in config_changes(old, new) if c.split(":")[0] not in RESUME_MUTABLE]
    if changed:
        raise CheckpointError(f"The config differs from the one checkpoint {d} was written with: {'; '.join(changed)}.",
                              "undo those changes in config.toml / --set (only "
                              f"{', '.join(RESUME_MUTABLE)} may change on --resume), or start a new run.")

