"""What server and nodes must agree on before a node trains for a server: the resolved
experiment config and the structure of the base model each side *loaded*.

The structure is taken from the model as loaded from the config, before a strategy replaces
the global model (the baselines' smaller MoE keeps the first n experts of each layer): a
node always holds the full base model and extracts the same sub-MoE from it, since the kept
sets the server sends are prefixes of each layer's experts.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from fedmoe.config import ExperimentConfig, config_to_dict


def config_fingerprint(cfg: ExperimentConfig, ignore: tuple[str, ...] = ("data.data_dir",)) -> str:
    """SHA-256 of the resolved config, without node-local keys (``ignore``, dotted)."""
    d = config_to_dict(cfg)
    for key in ignore:
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's structure (state keys, shapes, dtypes)."""
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


def deployment_fingerprint(cfg: ExperimentConfig, base: nn.Module | str) -> str:
    """The config (node-local keys left out) and the loaded base model's structure (a model,
    or its :func:`model_fingerprint`, e.g. ``Run.loaded_structure``)."""
    structure = base if isinstance(base, str) else model_fingerprint(base)
    return hashlib.sha256(f"{config_fingerprint(cfg)}/{structure}".encode()).hexdigest()
