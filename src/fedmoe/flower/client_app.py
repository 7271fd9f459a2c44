"""Flower ClientApp: one client's turn on a SuperNode, through the engine's ``run_client`` path.

Messages it answers:

* ``query`` — the node's identity (``partition-id``, ``num-partitions`` from its node
  config), so the server knows which clients the node serves;
* ``train`` — a client turn: the request names the client (which must belong to this node's
  partition), its expert map, round and seed, the strategy's client code and client kind by
  name, and carries the sub-MoE's trainable tensors (and the algorithm's extra tensors).
  The node builds the same client context as the in-process engine (base model, tokenizer and
  data partition from the experiment config in the run config), runs
  :func:`fedmoe.engine.node.client_turn` and replies with the trained tensors, routing
  statistics and metrics. Client state kept between turns (SCAFFOLD's ``c_k``, FLEx's side
  experts) lives in the node's state directory (node config ``state-dir``);
* ``evaluate`` — the final evaluation of a client whose personal state only the node holds
  (FLEx): its test scores, number of test examples and per-example rows (``predictions.jsonl``).

The experiment config is read from the run config on the node (the app bundle carries the
TOML); the request holds its SHA-256 fingerprint and a node whose config differs refuses.
Heavy imports (torch, transformers) happen on the first ``train`` message only, so identity
queries stay cheap. Each SuperNode process handles one message (``subprocess`` isolation);
in simulation the Ray actors persist and :data:`_NODE_CACHE` keeps the loaded model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K
from fedmoe.flower.settings import AppSettings, NodeIdentity, identity_content

if TYPE_CHECKING:
    from fedmoe.engine.node import NodeState
    from fedmoe.flower.records import TrainRequest

app = ClientApp()

#: node state per (config fingerprint, data dir): reused while the process lives
_NODE_CACHE: dict[tuple[str, str], NodeState] = {}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's identity (``partition-id`` / ``num-partitions``)."""
    return Message(identity_content(NodeIdentity.from_node_config(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one client turn; exceptions become Flower error replies (the server logs them)."""
    return Message(handle_train(msg.content, context.run_config, context.node_config, context.run_id), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final evaluation of one client with its own state (strategies with a client kind, FLEx)."""
    return Message(handle_evaluate(msg.content, context.run_config, context.node_config, context.run_id),
                   reply_to=msg)


def node_state(settings: AppSettings, ident: NodeIdentity) -> NodeState:
    """Build (or reuse) the node's model, tokenizer and data from the experiment config."""
    from fedmoe.engine.fingerprint import config_fingerprint
    from fedmoe.engine.node import build_node_state

    cfg = settings.experiment_config(ident.data_dir)
    key = (config_fingerprint(cfg, ignore=()), ident.data_dir)
    if key not in _NODE_CACHE:
        _NODE_CACHE.clear()
        _NODE_CACHE[key] = build_node_state(cfg)
    return _NODE_CACHE[key]


def _checked_request(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                     run_id: int) -> tuple[AppSettings, TrainRequest, NodeState, Path]:
    """Parse a request and check it is for this node and this experiment; the node state and
    the requested client's state folder."""
    from fedmoe.engine.fingerprint import deployment_fingerprint
    from fedmoe.engine.node import client_folder
    from fedmoe.flower.records import parse_request

    settings = AppSettings.from_run_config(run_config)
    ident = NodeIdentity.from_node_config(node_config)
    req = parse_request(content)
    if not ident.serves(req.client_id):
        raise ConfigError(
            f"Client {req.client_id} does not belong to this node (partition {ident.partition_id} of "
            f"{ident.num_partitions}).", "check the SuperNodes' --node-config partition ids.")
    ident.check_paths(settings)  # the experiment file, before it is read
    ident.check_paths(settings, settings.experiment_config(ident.data_dir))  # before any data or model is read
    node = node_state(settings, ident)
    if deployment_fingerprint(node.cfg, node.structure) != req.fingerprint:
        raise ConfigError(f"The node's experiment config or base model {K.ERR_MISMATCH}.",
                          "install the same fedmoe version on every node and the server, and give them the same "
                          "run config (the experiment TOML and its overrides).")
    return settings, req, node, client_folder(ident.run_state_dir(settings, run_id), req.client_id)


def handle_train(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                 run_id: int = 0) -> RecordDict:
    """The train handler without Flower's message envelope (testable in-process)."""
    from fedmoe.engine.node import client_turn, measure_fn
    from fedmoe.engine.payload import from_bytes
    from fedmoe.flower.records import reply_content

    settings, req, node, folder = _checked_request(content, run_config, node_config, run_id)
    reply = client_turn(node, req.client_id, req.expert_map.kept, req.download, req.seed, req.extra_down,
                        measure_fn(node.cfg), fault=settings.faults.get((req.round, req.client_id)),
                        node_plan=req.node_plan, client_kind=req.client_kind, folder=folder, rnd=req.round,
                        checkpointing=req.checkpointing)
    return reply_content(reply, from_bytes(reply.upload), req.client_id, req.round)


def handle_evaluate(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                    run_id: int = 0) -> RecordDict:
    """The evaluate handler: the client's test scores with the sent global tensors and its own state."""
    from fedmoe.engine.node import client_evaluation
    from fedmoe.flower.records import scores_content

    _, req, node, folder = _checked_request(content, run_config, node_config, run_id)
    rows: list[dict] = []
    n, scores = client_evaluation(node, req.client_id, req.expert_map.kept, req.download, req.client_kind, folder,
                                  predictions=rows)
    return scores_content(req.client_id, n, scores, rows)
