"""The client half of a networked client turn: what a node builds once, one training turn,
and the final evaluation of a client whose personal state only the node holds.

The server half is :mod:`fedmoe.engine.turn` (one client turn for both engines). Both call the in-process engine's code
(:func:`~fedmoe.engine.client.run_client`, :func:`~fedmoe.engine.client.evaluate_client`) so
that both engines give the same weights and scores.

**Node state directory.** Client state that must stay on the client between its turns
(SCAFFOLD's ``c_k``, FLEx's side experts) lives under the node's state directory, one folder
per client (:func:`client_folder`); the ClientApp chooses the directory (docs/deploy.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmoe.config import ExperimentConfig
from fedmoe.core.layout import UnitLayout
from fedmoe.data.settings import ClientData, build_federation
from fedmoe.engine.client import ClientContext, ClientPlan, ClientReply, evaluate_client, run_client
from fedmoe.engine.faults import Deadline
from fedmoe.engine.fingerprint import model_fingerprint
from fedmoe.engine.node_plans import DiskStore, client_kind_trainables
from fedmoe.engine.payload import to_bytes
from fedmoe.engine.strategies import STRATEGIES  # noqa: F401 — importing the strategies fills node_plans' registries
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import ConfigError
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.lora import LoraSpec
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import extract
from fedmoe.train.batching import model_kind
from fedmoe.train.loop import pick_device, seed_everything


@dataclass
class NodeState:
    """What a client node builds once from the experiment config (as ``Run.__init__`` does)."""

    cfg: ExperimentConfig
    base: nn.Module
    family: MoEFamily
    ctx: ClientContext
    clients: dict[int, ClientData]
    trainables: Trainables
    #: :func:`~fedmoe.engine.fingerprint.model_fingerprint` of ``base`` as loaded
    structure: str = ""


def build_node_state(cfg: ExperimentConfig) -> NodeState:
    """Load the base model and the federation's data like ``Run.__init__`` (no budgets, no global state).

    A node holds every client's partition only in this emulated set-up; it serves the
    ones its ``partition-id`` selects.
    """
    seed_everything(cfg.seed)
    prepare_measurement(cfg)
    base, family, tokenizer = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    fed = build_federation(cfg)
    ctx = ClientContext(cfg, family, model_kind(family.name), tokenizer, pick_device(cfg.engine.device), fed.tasks)
    t = cfg.train
    trainables = Trainables(family, t.finetune, LoraSpec.of(t), {}, UnitLayout())
    return NodeState(cfg, base, family, ctx, {c.client_id: c for c in fed.clients}, trainables,
                     model_fingerprint(base))


def prepare_measurement(cfg: ExperimentConfig) -> None:
    """With ``engine.measure_memory`` on, set the process up for measuring client turns before it
    loads anything large (:func:`fedmoe.moe.memory.prepare_process`; a no-op on CUDA and after the first call)."""
    if cfg.engine.measure_memory:
        from fedmoe.moe.memory import prepare_process

        prepare_process(pick_device(cfg.engine.device))


def measure_fn(cfg: ExperimentConfig) -> Callable[[Callable[[], Any]], tuple[Any, int]]:
    """``measure(fn) -> (result, peak_bytes)`` as ``Run._measure`` does."""

    def measure(fn: Callable[[], Any]) -> tuple[Any, int]:
        if not cfg.engine.measure_memory:
            return fn(), 0
        from fedmoe.moe.memory import measure_client_turn

        return measure_client_turn(fn, pick_device(cfg.engine.device))

    return measure


def client_folder(state_dir: Path, cid: int) -> Path:
    """The folder of client ``cid``'s own state under a node's state directory."""
    return Path(state_dir) / f"client-{cid}"


def node_trainables(node: NodeState, cid: int, client_kind: str, folder: Path | None,
                    rnd: int | None) -> Trainables:
    """The node's default trainables, or those of the strategy's client kind (e.g. FLEx's)."""
    if not client_kind:
        return node.trainables
    if folder is None:
        raise ConfigError(f"Client kind `{client_kind}` keeps client state, but the node has no state folder.",
                          "give the node a state directory (node config `state-dir`).")
    return client_kind_trainables(client_kind, node.ctx, node.clients[cid], folder, rnd)


def client_turn(node: NodeState, cid: int, kept: list[list[int]], download: dict[str, torch.Tensor], seed: int,
                extra_down: dict[str, torch.Tensor] | None = None,
                measure: Callable[[Callable[[], Any]], tuple[Any, int]] | None = None,
                fault: str | None = None, *, node_plan: str = "", client_kind: str = "",
                folder: Path | None = None, rnd: int = 0, checkpointing: bool | None = None) -> ClientReply:
    """Client half: extract the sub-MoE from the node's base model and run :func:`run_client`
    (with the node's ``engine.client_timeout_s`` and, for drills, an injected ``fault``).

    ``node_plan``: the algorithm's client code (:mod:`fedmoe.engine.node_plans`), with its
    store in ``folder``; ``client_kind``: the strategy's own client trainables, kept in
    ``folder``; ``rnd``: the round (FLEx restores the newest personal file of an earlier one);
    ``checkpointing``: gradient checkpointing as the server chose it (None: ``train.gradient_checkpointing is True``).
    """
    client = node.clients[cid]
    sub = extract(node.base, kept, node.family)
    trainables = node_trainables(node, cid, client_kind, folder, rnd)
    if node_plan and folder is None:
        raise ConfigError(f"Node plan `{node_plan}` keeps client state, but the node has no state folder.",
                          "give the node a state directory (node config `state-dir`).")
    cplan = None
    if extra_down or node_plan:
        cplan = ClientPlan(extra_down=extra_down or None, node_plan=node_plan,
                           store=DiskStore(folder) if folder is not None else None)
    reply, _ = run_client(node.ctx, client, sub, trainables, to_bytes(download), seed,
                          measure or measure_fn(node.cfg), cplan, Deadline(node.cfg.engine.client_timeout_s), fault,
                          checkpointing)
    return reply


def client_evaluation(node: NodeState, cid: int, kept: list[list[int]], download: dict[str, torch.Tensor],
                      client_kind: str = "", folder: Path | None = None,
                      predictions: list | None = None) -> tuple[int, dict[str, float]]:
    """Final evaluation of client ``cid`` on the node: ``(test examples, scores)``, with the
    global tensors sent and the client's own state (as ``Run.final_scores`` in-process);
    ``predictions`` gets its per-example rows."""
    client = node.clients[cid]
    sub = extract(node.base, kept, node.family)
    trainables = node_trainables(node, cid, client_kind, folder, None)
    return len(client.test), evaluate_client(node.ctx, client, sub, trainables, download, predictions=predictions)
