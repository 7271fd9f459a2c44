"""``fedmoe export``: a finished run as files plain ``transformers`` / ``peft`` code loads.

* global result (default): ``DIR/adapter/`` is a ``peft`` LoRA adapter written by peft's own
  ``save_pretrained`` — LoRA factors under their peft names, and the routers (and task heads)
  the federation trained as ``modules_to_save``, so ``PeftModel.from_pretrained`` keeps them.
  ``DIR/base/`` holds the frozen base model when it is not a hub name or a local directory
  (tiny models and presets exist only inside fedmoe). With ``train.finetune = "full"`` the
  global model is written as a plain ``save_pretrained`` folder ``DIR/model/`` instead.
* ``--client K``: client K's personalised model — its sub-MoE (kept experts only) with its
  LoRA merged in — as ``DIR/config.json`` + ``model.safetensors`` + ``expert_map.json``.
  When every MoE layer keeps the same number of experts, ``AutoModelFor….from_pretrained(DIR)``
  loads it; in general ``fedmoe.moe.slicing.load_sub_moe(DIR).model`` does (layers may keep
  different numbers of experts, which one HF config cannot say).

The mapping from fedmoe's trainable-tensor names to peft's lives in one place,
:func:`_ours`; the file names are peft's own: the adapter is built with
:func:`~fedmoe.moe.lora.lora_config`, filled by name and saved by peft (:func:`peft_model_of`).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from fedmoe.errors import ConfigError, FedMoEError
from fedmoe.moe.lora import HEAD_PATTERNS, PEFT_PREFIX, LoraSpec, lora_config
from fedmoe.moe.slicing import MAP_FILE, SubMoE, extract, save_sub_moe

GLOBAL_FILE = "global_trainable.safetensors"
README = "README.md"


class ExportError(FedMoEError):
    """A run folder that cannot be exported."""


@dataclass
class RunResult:
    """What ``export`` needs of a finished run: the rebuilt :class:`~fedmoe.engine.run.Run`
    (base model, family, strategy set up as in the run) with the run's global tensors loaded,
    and the final expert sets from ``expert_map.json``."""

    run: Any
    sets: dict[int, list[list[int]]]


def load_result(run_dir: str | Path) -> RunResult:
    """Rebuild a finished run's global state from its folder (no training, no evaluation)."""
    from safetensors.torch import load_file

    from fedmoe.config import load_config
    from fedmoe.engine.run import Run

    d = Path(run_dir)
    for name in ("config.toml", GLOBAL_FILE, MAP_FILE, "summary.json"):
        if not (d / name).is_file():
            raise ExportError(f"{d} is not a finished run folder: {name} is missing.",
                              "pass the --out folder of a `fedmoe run` that completed (it writes summary.json).")
    cfg = load_config(d / "config.toml", stored=True)
    run = Run(cfg, d)
    state = load_file(str(d / GLOBAL_FILE))
    want = run.trainables.state
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        raise ExportError(f"{d / GLOBAL_FILE} does not match the model of {d / 'config.toml'}.",
                          "export a run folder as `fedmoe run` left it (same fedmoe version).")
    run.trainables.state = {k: state[k].to(want[k].dtype) for k in want}
    sets = {int(k): v for k, v in json.loads((d / MAP_FILE).read_text()).items()}
    return RunResult(run, sets)


def router_modules(model: nn.Module, family: Any) -> list[str]:
    """Full module names of every router (what ``modules_to_save`` keeps)."""
    return [f"{b.path}.{family.router_attr}" for b in family.blocks(model)]


def peft_model_of(base: nn.Module, family: Any, state: dict[str, torch.Tensor], lora: LoraSpec) -> nn.Module:
    """A peft model over a copy of ``base`` holding ``state`` (fedmoe's trainable tensors),
    with routers and task heads as ``modules_to_save``."""
    model = copy.deepcopy(base)
    heads = sorted({n.split(".")[0] for n, _ in model.named_parameters()
                    if any(n.startswith(h + ".") for h in HEAD_PATTERNS)})
    config = lora_config(family, model, lora.r, lora.alpha, lora.dropout)
    config.modules_to_save = router_modules(model, family) + heads
    pm = get_peft_model(model, config)
    params = {_ours(n): p for n, p in pm.named_parameters() if p.requires_grad}
    missing = sorted(set(state) - set(params))
    if missing:
        raise ExportError(f"peft has no place for trained tensors {missing[:3]}.",
                          "report this: the LoRA layout and the export disagree.")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return pm


def _ours(peft_name: str) -> str:
    """peft's parameter name → fedmoe's trainable-state key (``modules_to_save`` copies read
    as the module they replace)."""
    name = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
    return name.replace(".modules_to_save.default.", ".")


def export_global(res: RunResult, out: Path) -> list[Path]:
    run = res.run
    t, family = run.cfg.train, run.family
    written = []
    if t.finetune == "full":
        model = copy.deepcopy(run.base)
        model.load_state_dict(run.trainables.state, strict=False)
        model.save_pretrained(out / "model")
        written.append(out / "model")
    else:
        pm = peft_model_of(run.base, family, run.trainables.state, LoraSpec.of(t))
        base_ref = _base_reference(run.cfg.model.name)
        pm.peft_config["default"].base_model_name_or_path = base_ref or "../base"
        pm.save_pretrained(out / "adapter", save_embedding_layers=False)
        written.append(out / "adapter")
        if base_ref is None:
            run.base.save_pretrained(out / "base")
            written.append(out / "base")
    _save_tokenizer(run.tokenizer, written[0])
    return written


def client_model(res: RunResult, cid: int) -> SubMoE:
    """Client ``cid``'s personalised model, LoRA merged: the sub-MoE it was evaluated on."""
    from fedmoe.engine.trainables import Trainables

    run = res.run
    trainables = run.strategy.client_trainables(run, cid, None)
    if type(trainables) is not Trainables:
        raise ExportError(f"`{run.cfg.algorithm}` clients keep personal modules that no Hugging Face class holds.",
                          "export the global adapter (omit --client).")
    sub = extract(run.base, res.sets[cid], run.family)
    model = trainables.wrap(sub)
    trainables.load(model, trainables.for_client(model, sub.expert_map, run.clients[cid].task))
    if trainables.finetune != "full":
        model = model.merge_and_unload()
    model.eval()
    return SubMoE(model, sub.expert_map)


def export_client(res: RunResult, cid: int, out: Path) -> list[Path]:
    sub = client_model(res, cid)
    save_sub_moe(sub, out)
    _save_tokenizer(res.run.tokenizer, out)
    return [out]


def _base_reference(name: str) -> str | None:
    """The model name when plain ``from_pretrained`` resolves it (hub name or folder), else None."""
    from fedmoe.moe.models import TINY_PREFIX
    from fedmoe.moe.presets import PATTERN

    if name.startswith(TINY_PREFIX) or PATTERN.match(name):
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _save_tokenizer(tok: Any, folder: Path) -> None:
    save = getattr(tok, "save_pretrained", None)
    if callable(save) and type(tok).__module__.startswith("transformers"):
        save(folder)


def export_run(run_dir: str | Path, out: str | Path, client: int | None = None) -> list[Path]:
    """Write the run's global adapter (or, with ``client``, that client's model) under ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"Export folder {out} is not empty.", "pass --out with a new or empty folder.")
    res = load_result(run_dir)
    if client is not None and client not in res.sets:
        raise ConfigError(f"Client {client} is not in this run (clients: {', '.join(map(str, sorted(res.sets)))}).",
                          "pass --client with one of those ids.")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return export_global(res, out) if client is None else export_client(res, client, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no half-written export
        raise
