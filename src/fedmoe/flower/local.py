"""An in-process :class:`~flwr.serverapp.Grid`: the ServerApp and ClientApp in one process.

For debugging and tests of the Flower message path without a SuperLink: each pushed message
is serialised to Flower's wire objects and rebuilt (as a SuperNode would receive it), handed
to the ClientApp with the target node's node config, and the reply (or, when the ClientApp
raises, an error reply with ``CLIENT_APP_RAISED_EXCEPTION``, as ``flwr-clientapp`` sends) is
serialised back. Messages run synchronously, one at a time, when pushed.

``dead_nodes``: node ids whose messages get a ``NODE_UNAVAILABLE`` error reply from the
"SuperLink"; ``dies_after``: node id → number of messages it answers before it is dead
(a node lost mid-run); ``silent_nodes``: node ids that never reply (the server's timeout path).
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run as FlowerRun
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.flower.records import wire_roundtrip

CLIENT_APP_RAISED_EXCEPTION = 2
NODE_UNAVAILABLE = 5
SUPERLINK_NODE_ID = 1


class LocalGrid(Grid):
    """Runs ``client_app`` in-process for nodes ``node_configs`` (node id → node config)."""

    def __init__(self, client_app: ClientApp, node_configs: Mapping[int, Mapping[str, Any]],
                 run_config: Mapping[str, Any], run_id: int = 1, dead_nodes: Iterable[int] = (),
                 silent_nodes: Iterable[int] = (), dies_after: Mapping[int, int] | None = None) -> None:
        self.client_app = client_app
        self.node_configs = {n: dict(c) for n, c in node_configs.items()}
        self.run_config = dict(run_config)
        self.dead_nodes, self.silent_nodes = set(dead_nodes), set(silent_nodes)
        self.dies_after = dict(dies_after or {})
        self.answered = dict.fromkeys(self.node_configs, 0)
        self.states = {n: RecordDict() for n in self.node_configs}
        self._run = FlowerRun.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self.pushed: list[Message] = []
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0

    def set_run(self, run: FlowerRun) -> None:
        self._run = run

    @property
    def run(self) -> FlowerRun:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = msg.object_id
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self.pushed.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent_nodes:
                continue
            if node in self.dies_after and self.answered.get(node, 0) >= self.dies_after[node]:
                self.dead_nodes.add(node)
            if node in self.dead_nodes or node not in self.node_configs:
                self._replies[mid] = Message(Error(NODE_UNAVAILABLE, "node unavailable"), reply_to=msg)
                continue
            meta = copy.deepcopy(msg.metadata)
            incoming = Message(content=wire_roundtrip(msg.content), metadata=meta)
            context = Context(self._run.run_id, node, self.node_configs[node], self.states[node], self.run_config)
            try:
                reply = self.client_app(incoming, context)
                reply.content = wire_roundtrip(reply.content)
            except Exception as exc:  # noqa: BLE001 — mirrors flwr-clientapp's error reply
                reason = f"{type(exc)}:<'{exc}'>\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=incoming)
            self._replies[mid] = reply
            self.answered[node] += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def node_configs(num_partitions: int, data_dir: str = "", first_node_id: int = 100) -> dict[int, dict[str, Any]]:
    """Node configs of ``num_partitions`` SuperNodes (node ids from ``first_node_id``)."""
    out: dict[int, dict[str, Any]] = {}
    for p in range(num_partitions):
        cfg: dict[str, Any] = {"partition-id": p, "num-partitions": num_partitions}
        if data_dir:
            cfg["data-dir"] = data_dir
        out[first_node_id + p] = cfg
    return out
