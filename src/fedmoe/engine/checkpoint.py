"""Server checkpoints after every round, and exact resume.

A checkpoint is a folder ``checkpoints/round-<r>/`` holding the global trainable tensors
(``trainable.safetensors``) and the rest of the server state (``state.pkl``: the strategy's
state — expert maps, ``p``, histories, frozen flags, control variates —, the clients'
base-weight caches, the round records), plus ``manifest.json`` with SHA-256 checksums.
Every file is written to a temporary name, fsync'ed and renamed; ``checkpoints/LATEST``
(also replaced atomically) names the newest complete checkpoint, so a crash at any point
leaves the previous one usable. Randomness is seeded per round, so resuming from round r
replays rounds r+1… exactly as an uninterrupted run would.

``state.pkl`` is a pickle: only resume checkpoints your own runs wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoe.engine.payload import load_tensors_file, save_tensors_file
from fedmoe.errors import FedMoEError

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run

CKPT_DIR = "checkpoints"
LATEST = "LATEST"
FORMAT = 1


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
    _fsync_write(d / "state.pkl", pickle.dumps(state))
    manifest = {"format": FORMAT, "round": rnd, "algorithm": run.cfg.algorithm, "model": run.cfg.model.name,
                "seed": run.cfg.seed, "files": {n: _sha(d / n) for n in ("trainable.safetensors", "state.pkl")}}
    _fsync_write(d / "manifest.json", json.dumps(manifest, indent=1).encode())
    _fsync_write(root / LATEST, d.name.encode())
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return d


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CKPT_DIR
    if not (root / LATEST).is_file():
        return None
    return root / (root / LATEST).read_text().strip()


def load_checkpoint(run: Run, d: Path) -> int:
    """Restore ``run`` from checkpoint folder ``d``; returns the last completed round."""
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"Checkpoint {d} has no manifest.json.", "resume from a run directory written by `fedmoe run`.")
    manifest = json.loads(mpath.read_text())
    for name, digest in manifest["files"].items():
        if not (d / name).is_file() or _sha(d / name) != digest:
            raise CheckpointError(f"Checkpoint file {d / name} is missing or corrupt (checksum mismatch).",
                                  "delete that checkpoint folder to fall back to an older one, or start a new run.")
    for key in ("algorithm", "model", "seed"):
        have = {"algorithm": run.cfg.algorithm, "model": run.cfg.model.name, "seed": run.cfg.seed}[key]
        if manifest[key] != have:
            raise CheckpointError(f"Checkpoint {d} was written with {key}={manifest[key]!r}, the config says {have!r}.",
                                  "resume with the run directory's own config.toml (no overrides of these keys).")
    tensors = load_tensors_file(d / "trainable.safetensors")
    if set(tensors) != set(run.trainables.state):
        raise CheckpointError(f"Checkpoint {d} does not match the model: trainable tensors differ.",
                              "resume with the same model and fine-tuning settings.")
    run.trainables.state = tensors
    state: dict[str, Any] = pickle.loads((d / "state.pkl").read_bytes())
    run.strategy.load_state_dict(state["strategy"])
    run.cache = state["cache"]
    run.rounds = state["rounds"]
    run.latest_p = state.get("latest_p", {})
    run.p_snapshots = state.get("p_snapshots", {})
    return int(state["round"])
