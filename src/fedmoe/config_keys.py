"""Config key tables and value checks, kept apart from the dataclasses of :mod:`fedmoe.config`.

* :data:`MOVED`: keys that moved to another section (old → new). A config file or ``--set``
  naming an old key is refused with one line naming the new key (:func:`refuse_moved`); a config
  a run *stored* earlier (its ``config.toml``, its checkpoints' manifests) is translated silently
  (:func:`migrate`, :func:`migrate_flat`), so ``fedmoe report``, ``fedmoe export`` and
  ``fedmoe run --resume`` read run folders written before the move.
* :data:`_CHOICES` / :data:`_RANGES` and :func:`validate`: the value checks that need no model
  or data.

Imports no other config module, so :mod:`fedmoe.config` and the readers of stored runs can use it.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from fedmoe.algorithms import ALGORITHM_NAMES
from fedmoe.errors import ConfigError

#: keys that moved (old dotted key → new dotted key); the one table of moved keys
MOVED: dict[str, str] = {
    "fedmoe.rounds": "federation.rounds",
    "setting.clients_per_round": "federation.clients_per_round",
    "fedmoe.exclude_unfit": "federation.exclude_unfit",
}


def _pop(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    section, _, name = key.rpartition(".")
    node = data.get(section)
    if isinstance(node, dict) and name in node:
        value = node.pop(name)
        if not node:  # a section the move emptied
            del data[section]
        return True, value
    return False, None


def refuse_moved(data: dict[str, Any]) -> None:
    """:class:`ConfigError` naming the new key when the nested config ``data`` holds a moved key."""
    for old, new in MOVED.items():
        section, _, name = old.rpartition(".")
        node = data.get(section)
        if isinstance(node, dict) and name in node:
            raise ConfigError(f"{old} moved to {new}.", f"write it as {new} (in [{new.split('.')[0]}] or --set {new}=…).")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config ``data`` (as stored by a run) with moved keys under their new
    names; a new key already present wins. Used only on configs that runs wrote themselves."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for old, new in MOVED.items():
        found, value = _pop(out, old)
        if found:
            section, _, name = new.rpartition(".")
            out.setdefault(section, {}).setdefault(name, value)
    return out


def migrate_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """:func:`migrate` for a flat ``{"a.b": value}`` config (checkpoint manifests)."""
    out = dict(flat)
    for old, new in MOVED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


_CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ALGORITHM_NAMES,  # the algorithm registry (fedmoe.algorithms.REGISTRY)
    "model.dtype": ("float32", "bfloat16", "float16"),
    "train.finetune": ("lora", "full"),
    "engine.name": ("inprocess", "flower-sim"),
    "engine.device": ("auto", "cpu", "cuda"),
    "engine.wire_dtype": ("fp32", "bf16", "fp16"),
}
# key → (low, high, inclusive-low); values must lie in the range
_RANGES: dict[str, tuple[float, float, bool]] = {
    "train.lr": (0.0, float("inf"), False),
    "train.batch_size": (1, float("inf"), True),
    "train.local_epochs": (1, float("inf"), True),
    "train.label_smoothing": (0.0, 1.0, True),
    "train.lora_r": (1, float("inf"), True),
    "fedmoe.alpha": (0.0, 1.0, False),
    "fedmoe.patience": (1, float("inf"), True),
    "fedmoe.top_k_similar": (1, float("inf"), True),
    "federation.rounds": (0, float("inf"), True),
    "fedmoe.stage1_rounds": (0, float("inf"), True),
    "setting.num_clients": (1, float("inf"), True),
    "federation.clients_per_round": (1, float("inf"), True),
    "setting.dirichlet_alpha": (0.0, float("inf"), False),
    "setting.budget_low": (0.0, float("inf"), True),
    "data.max_seq_len": (8, float("inf"), True),
    "data.val_fraction": (0.0, 1.0, False),
    "data.test_fraction": (0.0, 1.0, False),
    "engine.client_timeout_s": (0.0, float("inf"), True),
    "engine.max_empty_rounds": (0, float("inf"), True),
    "seed": (0, 2**32 - 1, True), "train.weight_decay": (0.0, float("inf"), True),
    "train.max_local_steps": (0, float("inf"), True), "train.warmup_ratio": (0.0, 1.0, True),
    "train.grad_clip": (0.0, float("inf"), True), "train.load_balance_coef": (0.0, float("inf"), True),
    "train.lora_alpha": (1, float("inf"), True), "train.lora_dropout": (0.0, 0.99, True),
    "train.eval_batch_size": (1, float("inf"), True), "fedmoe.theta_tol": (0.0, 1.0, False),
    "data.max_examples_per_task": (0, float("inf"), True), "data.max_target_len": (1, float("inf"), True),
    "setting.num_clusters": (1, float("inf"), True), "setting.budget_high": (0.0, float("inf"), False),
    "baseline.num_experts": (-1, float("inf"), True), "baseline.fedprox_mu": (0.0, float("inf"), True),
    "baseline.scaffold_server_lr": (0.0, float("inf"), False), "hfedmoe.lam": (0.0, 1.0, True),
    "hfedmoe.beta": (0.0, float("inf"), True), "hfedmoe.tau": (-float("inf"), 1.0, False),
    "hfedmoe.alpha": (0.0, float("inf"), False), "hfedmoe.max_score_examples": (0, float("inf"), True),
    "flex.gate_bias": (-float("inf"), float("inf"), False), "flex.max_choice_examples": (0, float("inf"), True),
    "flex.num_experts": (-1, float("inf"), True),
    "engine.checkpoint_every": (0, float("inf"), True), "engine.max_update_norm": (0.0, float("inf"), True),
}  # every int/float key has a range (a test checks); every float must also be finite


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Any) -> Any:
    """Value checks that need no model or data (those are checked where they load)."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            fix = f"did you mean `{close[0]}`? (--set {key}={close[0]})" if close else f"set e.g. --set {key}={choices[0]}."
            raise ConfigError(f"`{key}` = {value!r} is not one of {list(choices)}.", fix)
    for key, (lo, hi, inclusive) in _RANGES.items():
        v = _get(cfg, key)
        if not (math.isfinite(v) and (v >= lo if inclusive else v > lo) and v <= hi):
            bound = f"{'>=' if inclusive else '>'} {lo}" + (f" and <= {hi}" if hi != float("inf") else "")
            raise ConfigError(f"`{key}` = {v!r} is out of range.", f"use a value {bound}.")
    if cfg.setting.budget_high < cfg.setting.budget_low:
        raise ConfigError(
            f"setting.budget_high ({cfg.setting.budget_high}) is below setting.budget_low ({cfg.setting.budget_low}).",
            "make budget_high >= budget_low.",
        )
    if cfg.engine.inject_faults:
        from fedmoe.faultspec import parse_faults

        parse_faults(cfg.engine.inject_faults)
    if isinstance(cfg.train.gradient_checkpointing, str) and cfg.train.gradient_checkpointing != "auto":
        raise ConfigError(f"`train.gradient_checkpointing` = {cfg.train.gradient_checkpointing!r} is not true, false "
                          'or "auto".', "set e.g. --set train.gradient_checkpointing=auto.")
    if isinstance(cfg.data.hub_split, dict) and (bad := sorted(set(cfg.data.hub_split) - {"tc", "rc", "ts"})):
        raise ConfigError(f"data.hub_split names unknown task(s) {bad}.",
                          'use the tasks tc, rc, ts, e.g. data.hub_split = {tc = "train", rc = "validation"}.')
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must leave a train split (sum < 1).",
                          "lower one of them, e.g. --set data.test_fraction=0.2.")
    return cfg
