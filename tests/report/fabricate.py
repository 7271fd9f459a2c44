"""Hand-written run directories (config.toml, rounds.jsonl, summary.json[, p_by_task.json])
in the format of :mod:`fedmoe.engine.run`, for the report tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRIC_KEYS = {"tc": "accuracy", "rc": "f1", "ts": "rouge2"}


def client(cid: int, task: str, score: float, error: str = "") -> dict[str, Any]:
    """One ClientRecord row (only ``task``, ``score`` and ``error`` matter to the report)."""
    return {"client_id": cid, "task": task, "stage": 2, "loss": 1.0, "score": score, "num_examples": 10,
            "bytes_down_base": 0, "bytes_down": 0, "bytes_up": 0, "peak_memory_bytes": 0,
            "predicted_memory_bytes": 0, "budget_bytes": 0, "num_experts": 4, "steps": 1, "error": error}


def write_run(d: Path, *, algorithm: str, setting: str, seed: int, scores: dict[str, float],
              rounds: list[tuple[float, list[tuple[str, float]]]], comm: tuple[int, int, int] = (0, 0, 0),
              peak: tuple[int, float] = (0, 0.0), experts_start: dict[str, float] | None = None,
              experts_end: dict[str, float] | None = None, stage1: bool = True, stage2_adjust: bool = True,
              p: dict[str, dict[str, list[list[float]]]] | None = None, model: str = "tiny-mixtral",
              finished: bool = True) -> Path:
    """``rounds``: per round, (wall_time_s, [(task, validation score) per sampled client])."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(
        f'seed = {seed}\nalgorithm = "{algorithm}"\n\n[model]\nname = "{model}"\n\n[setting]\npreset = "{setting}"\n\n'
        f"[fedmoe]\nstage1 = {str(stage1).lower()}\nstage2_adjust = {str(stage2_adjust).lower()}\n")
    lines = []
    for r, (wall, clients) in enumerate(rounds):
        recs = [client(i, t, s) for i, (t, s) in enumerate(clients)]
        lines.append(json.dumps({"round": r, "stage": 2, "sampled": list(range(len(recs))), "clients": recs,
                                 "wall_time_s": wall, "bytes_down_base": 0, "bytes_down": 0, "bytes_up": 0,
                                 "actions": [], "theta": {}, "skipped": {}}))
    (d / "rounds.jsonl").write_text("".join(line + "\n" for line in lines))
    if p is not None:
        (d / "p_by_task.json").write_text(json.dumps(p))
    if finished:
        summary = {
            "algorithm": algorithm, "model": model, "setting": setting, "seed": seed, "rounds": len(rounds),
            "scores": {t: {METRIC_KEYS[t]: v, "other": 0.123} for t, v in scores.items()},
            "bytes_down_base": comm[0], "bytes_down": comm[1], "bytes_up": comm[2],
            "peak_memory_max": peak[0], "peak_memory_mean": peak[1],
            "experts_start": experts_start or {}, "experts_end": experts_end or {}, "wall_time_s": 1.0,
        }
        (d / "summary.json").write_text(json.dumps(summary))
    return d
