"""Flower ClientApp: one client's turn on a SuperNode, through the engine's ``run_client`` path.

Messages it answers:

* ``query`` — the node's identity (``partition-id``, ``num-partitions`` from its node
  config), so the server knows which clients the node serves;
* ``train`` — a client turn: the request names the client (which must belong to this node's
  partition), its expert map, round and seed, and carries the sub-MoE's trainable tensors.
  The node builds the same client context as the in-process engine (base model, tokenizer and
  data partition from the experiment config in the run config), runs
  :func:`fedmoe.engine.remote.client_turn` and replies with the trained tensors, routing
  statistics and metrics.

The experiment config is read from the run config on the node (the app bundle carries the
TOML); the request holds its SHA-256 fingerprint and a node whose config differs refuses.
Heavy imports (torch, transformers) happen on the first ``train`` message only, so identity
queries stay cheap. Each SuperNode process handles one message (``subprocess`` isolation);
in simulation the Ray actors persist and :data:`_NODE_CACHE` keeps the loaded model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K
from fedmoe.flower.settings import AppSettings, NodeIdentity, identity_content

if TYPE_CHECKING:
    from fedmoe.engine.remote import NodeState

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
    return Message(handle_train(msg.content, context.run_config, context.node_config), reply_to=msg)


def node_state(settings: AppSettings, ident: NodeIdentity) -> NodeState:
    """Build (or reuse) the node's model, tokenizer and data from the experiment config."""
    from fedmoe.engine.remote import build_node_state, config_fingerprint

    cfg = settings.experiment_config(ident.data_dir)
    key = (config_fingerprint(cfg, ignore=()), ident.data_dir)
    if key not in _NODE_CACHE:
        _NODE_CACHE.clear()
        _NODE_CACHE[key] = build_node_state(cfg)
    return _NODE_CACHE[key]


def handle_train(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> RecordDict:
    """The train handler without Flower's message envelope (testable in-process)."""
    from fedmoe.engine.payload import from_bytes
    from fedmoe.engine.remote import client_turn, deployment_fingerprint, measure_fn
    from fedmoe.flower.records import parse_request, reply_content

    settings = AppSettings.from_run_config(run_config)
    ident = NodeIdentity.from_node_config(node_config)
    req = parse_request(content)
    if not ident.serves(req.client_id):
        raise ConfigError(
            f"Client {req.client_id} does not belong to this node (partition {ident.partition_id} of "
            f"{ident.num_partitions}).", "check the SuperNodes' --node-config partition ids.")
    node = node_state(settings, ident)
    if deployment_fingerprint(node.cfg, node.base) != req.fingerprint:
        raise ConfigError(f"The node's experiment config or base model {K.ERR_MISMATCH}.",
                          "install the same fedmoe version on every node and the server, and give them the same "
                          "run config; strategies that replace the global model need the in-process engine.")
    reply = client_turn(node, req.client_id, req.expert_map.kept, req.download, req.seed, req.extra_down,
                        measure_fn(node.cfg), fault=settings.faults.get((req.round, req.client_id)))
    return reply_content(reply, from_bytes(reply.upload), req.client_id, req.round)
