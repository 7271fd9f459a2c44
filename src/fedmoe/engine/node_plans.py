"""Client-side algorithm code, by name, so that both engines run the same code on the client.

A strategy's per-turn client code (FedProx's proximal term, SCAFFOLD's gradient correction
and variate update, FLEx's e* report) cannot be sent as closures over the network: the
strategy names it instead (``ClientPlan.node_plan``, a string that crosses in the request)
and the client builds it with :func:`build_node_plan` from what it has locally — the
experiment config, the client's id and task, the keys it downloaded, the algorithm's extra
tensors (``extra_down``) and its own persistent :class:`ClientStore`. The in-process engine
calls the same functions, so both engines train identically.

Stores: state that must survive between a client's turns and must never leave it (SCAFFOLD's
``c_k``). In-process the strategy owns it (:class:`SlotStore` over a dict kept in the
strategy's ``state_dict``, so checkpoints and exact resume keep it); on a Flower node it is a
:class:`DiskStore` in the node's state directory (written atomically), so it survives a
restart of the node process.

Strategies whose clients wrap their model differently and keep files between rounds (FLEx)
register a *client kind* with :func:`register_client_kind`: how a node builds that client's
:class:`~fedmoe.engine.trainables.Trainables` from its context and state folder.

Registration happens when :mod:`fedmoe.engine.strategies` is imported (its modules decorate
their plans and kinds). This module never imports the strategies (they import it: that was an
import cycle); the two entry points that look plans up import them: :mod:`fedmoe.engine.run`
(in-process) and :mod:`fedmoe.engine.node` (a Flower node).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from fedmoe.algorithms import fedprox, scaffold
from fedmoe.config import ExperimentConfig
from fedmoe.engine.payload import load_tensors_file, save_tensors_file
from fedmoe.errors import ConfigError
from fedmoe.moe.families import MoEFamily
from fedmoe.train.loop import LocalHooks, LocalResult

if TYPE_CHECKING:
    from fedmoe.data.settings import ClientData
    from fedmoe.engine.protocols import ClientContext
    from fedmoe.engine.trainables import Trainables

Tensors = dict[str, torch.Tensor]
#: ``extra_up(model, extra_down, result)``: tensors sent back besides the trainable state
ExtraUp = Callable[[nn.Module, Tensors, LocalResult], Tensors]


class ClientStore(Protocol):
    """Named tensor sets a client keeps between its turns (never sent)."""

    def load(self, name: str) -> Tensors | None: ...

    def save(self, name: str, tensors: Tensors) -> None: ...


class SlotStore:
    """In-process store: one client's slot ``table[key]`` of a dict the strategy owns.

    The strategy's ``state_dict`` holds ``table``, so a checkpoint carries the client state
    and a resumed run replays exactly. ``name`` is ignored (one slot per table).
    """

    def __init__(self, table: dict[Any, Tensors], key: Any) -> None:
        self.table, self.key = table, key

    def load(self, name: str) -> Tensors | None:
        return self.table.get(self.key)

    def save(self, name: str, tensors: Tensors) -> None:
        self.table[self.key] = tensors


class DiskStore:
    """Node store: ``<folder>/<name>.safetensors``, written atomically (temp file + rename),
    so a node killed mid-write keeps the previous version."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def load(self, name: str) -> Tensors | None:
        path = self.path(name)
        return load_tensors_file(path) if path.is_file() else None

    def save(self, name: str, tensors: Tensors) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors_file(tensors, self.path(name))


@dataclass
class NodeTurn:
    """What a client has locally when it builds an algorithm's hooks for one turn."""

    cfg: ExperimentConfig
    family: MoEFamily
    client_id: int
    task: str
    #: keys of the trainable tensors the client received this turn (its share of the global state)
    download_keys: list[str]
    #: algorithm tensors the server sent besides the trainable state (``ClientPlan.extra_down``)
    extra_down: Tensors
    store: ClientStore


NodePlan = Callable[[NodeTurn], tuple[LocalHooks, ExtraUp | None]]
#: node plan name → builder; names cross the network in the request's config record
NODE_PLANS: dict[str, NodePlan] = {}


def register_node_plan(name: str) -> Callable[[NodePlan], NodePlan]:
    """Decorator: register ``fn`` as the node plan ``name``."""

    def deco(fn: NodePlan) -> NodePlan:
        NODE_PLANS[name] = fn
        return fn

    return deco


def build_node_plan(name: str, turn: NodeTurn) -> tuple[LocalHooks, ExtraUp | None]:
    """The local-loop hooks and ``extra_up`` of node plan ``name`` for this turn."""
    if name not in NODE_PLANS:
        raise ConfigError(f"Unknown node plan `{name}` (known: {', '.join(sorted(NODE_PLANS)) or 'none'}).",
                          "install the same fedmoe version on the server and every node.")
    return NODE_PLANS[name](turn)


@register_node_plan("fedprox")
def fedprox_plan(turn: NodeTurn) -> tuple[LocalHooks, ExtraUp | None]:
    """FedProx: ``(μ/2)‖w − w_global‖²`` over the tensors received this turn, μ = ``baseline.fedprox_mu``."""
    term = fedprox.ProximalTerm(turn.cfg.baseline.fedprox_mu, set(turn.download_keys))
    return LocalHooks(extra_loss=term), None


#: store name of SCAFFOLD's client variate
SCAFFOLD_CK = "scaffold.c_k"


@register_node_plan("scaffold")
def scaffold_plan(turn: NodeTurn) -> tuple[LocalHooks, ExtraUp | None]:
    """SCAFFOLD: correct gradients with ``c − c_k`` (``c`` = ``extra_down``, ``c_k`` from the
    client's store); afterwards store ``c_k⁺`` and send ``Δc_k`` up."""
    client = scaffold.ScaffoldClient(turn.extra_down, turn.store.load(SCAFFOLD_CK) or {})

    def extra_up(model: nn.Module, extra_down: Tensors, res: LocalResult) -> Tensors:
        c_new, delta = client.finish(res.steps, res.lr)
        turn.store.save(SCAFFOLD_CK, c_new)
        return delta

    return LocalHooks(before_step=client.before_step), extra_up


# -- client kinds ------------------------------------------------------------------------------
#: ``(ctx, client, folder, rnd) -> Trainables``: how a node builds a client's own trainables
#: (``rnd`` None: the final evaluation); ``folder`` is the client's state folder on the node
ClientKind = Callable[["ClientContext", "ClientData", Path, "int | None"], "Trainables"]
CLIENT_KINDS: dict[str, ClientKind] = {}


def register_client_kind(name: str) -> Callable[[ClientKind], ClientKind]:
    """Decorator: register how nodes build the trainables of client kind ``name``."""

    def deco(fn: ClientKind) -> ClientKind:
        CLIENT_KINDS[name] = fn
        return fn

    return deco


def client_kind_trainables(name: str, ctx: ClientContext, client: ClientData, folder: Path,
                           rnd: int | None) -> Trainables:
    """The trainables of client kind ``name`` (strategies register theirs on import)."""
    if name not in CLIENT_KINDS:
        raise ConfigError(f"Unknown client kind `{name}` (known: {', '.join(sorted(CLIENT_KINDS)) or 'none'}).",
                          "install the same fedmoe version on the server and every node.")
    return CLIENT_KINDS[name](ctx, client, folder, rnd)
