"""Flower ServerApp: the engine's rounds over the Message API.

The loop is the in-process engine's, on the same :class:`~fedmoe.engine.run.Run` object
(model, data, budgets, strategy) and the same client turn (:mod:`fedmoe.engine.turn`), with
:class:`GridTransport` as its transport: the strategy plans each round, every sampled client's
job is prepared by ``prepare_turn`` and sent to the SuperNode serving that client as
its own message (its sub-MoE's trainable tensors + expert map + round/seed), replies are
matched to requests by ``reply_to_message_id``, and the strategy aggregates the successful
ones and updates expert sets. A client whose turn fails — an error reply (the ClientApp
raised, the node is unavailable …), no reply within ``round-timeout``, or no node serving
its partition — is left out of aggregation and logged in ``rounds.jsonl`` with ``error``.

Strategies whose clients keep personal state (``Strategy.client_kind``: FLEx) get their final
evaluation on the nodes (one ``evaluate`` message per client); the others are evaluated on
the server, as in-process.

Outputs (as ``fedmoe run``'s, see :mod:`fedmoe.engine.run`) land in ``<out-dir>/<run-id>/``
(or exactly in ``out-path`` when set),
relative paths being relative to the ServerApp's working directory (the SuperLink's).
Byte counts are those of the Flower messages: ``bytes_down`` / ``bytes_up`` are the
serialised content of each request / reply; ``bytes_down_base`` is 0, since nodes build the
base model from the experiment config instead of receiving it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmoe.engine.records import RoundRecord
from fedmoe.engine.remote import (
    combine_scores,
    deployment_fingerprint,
    maybe_checkpoint,
    prepare_evaluation,
    reply_from_parts,
    round_plans,
    start_outputs,
    write_outputs,
)
from fedmoe.engine.run import Run, check_empty_rounds
from fedmoe.engine.strategies.base import RoundPlan
from fedmoe.engine.turn import ClientJob, TurnOutcome, play_round
from fedmoe.errors import ConfigError, RunStopped
from fedmoe.flower import keys as K
from fedmoe.flower.records import content_bytes, job_content, parse_predictions, parse_reply, parse_scores
from fedmoe.flower.settings import AppSettings, parse_identity, partition_of

app = ServerApp()

#: Flower's error codes (``flwr.common.constant.ErrorCode``) by number, for readable records
ERROR_NAMES = {0: "UNKNOWN", 1: "LOAD_CLIENT_APP_EXCEPTION", 2: "CLIENT_APP_RAISED_EXCEPTION",
               3: "MESSAGE_UNAVAILABLE", 4: "REPLY_MESSAGE_UNAVAILABLE", 5: "NODE_UNAVAILABLE",
               6: "MOD_FAILED_PRECONDITION", 7: "INVALID_FAB", 8: "CLIENT_APP_CRASHED"}
POLL_S = 0.5
#: seconds a between-rounds refresh waits for newly joined nodes to answer
REFRESH_TIMEOUT_S = 30.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point: run the experiment named by the run config on the connected SuperNodes."""
    settings = AppSettings.from_run_config(context.run_config)
    run_federated(grid, settings, settings.output_dir(context.run_id))


# -- nodes ------------------------------------------------------------------------------------
@dataclass
class NodeDirectory:
    """Which SuperNode serves which partition (client ``c`` is in partition ``c % N``)."""

    num_partitions: int
    nodes: dict[int, int] = field(default_factory=dict)  #: partition id → node id

    def node_for(self, client_id: int) -> int | None:
        return self.nodes.get(partition_of(client_id, self.num_partitions))

    def missing(self) -> list[int]:
        return [p for p in range(self.num_partitions) if p not in self.nodes]


def discover_nodes(grid: Grid, timeout: float, poll: float = POLL_S,
                   known: NodeDirectory | None = None) -> NodeDirectory:
    """Ask every connected node for its identity until all partitions are covered or ``timeout``.

    ``known``: a previous directory; its nodes that are still online are kept and not asked again.
    Raises ``RuntimeError`` when no node answered at all, or when nodes disagree on
    ``num-partitions``; returns a directory with holes (logged) when some partitions have no node.
    """
    deadline = time.monotonic() + timeout
    online = set(grid.get_node_ids()) if known else set()
    asked: set[int] = set(known.nodes.values()) if known else set()
    pending: dict[str, int] = {}
    idents: dict[int, tuple[int, int]] = {
        n: (p, known.num_partitions) for p, n in known.nodes.items() if n in online} if known else {}
    while True:
        new = sorted(n for n in grid.get_node_ids() if n not in asked)
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            ids = list(grid.push_messages(msgs))
            for n, mid in zip(new, ids + [None] * (len(new) - len(ids)), strict=True):
                if mid:
                    pending[mid] = n
            asked.update(new)
        for reply in grid.pull_messages(list(pending)) if pending else []:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                log(WARNING, "[fedmoe] node %s did not answer the identity query: %s", node, _error_text(reply))
                continue
            idents[node] = parse_identity(reply.content)
        directory = _directory(idents)
        if directory is not None and not directory.missing():
            break
        if time.monotonic() > deadline:
            break
        time.sleep(poll)
    if directory is None:
        raise RuntimeError(f"No SuperNode answered the identity query within {timeout:.0f} s.")
    if directory.missing():
        log(WARNING, "[fedmoe] no SuperNode for partitions %s: their clients' turns will fail", directory.missing())
    log(INFO, "[fedmoe] %d partitions served by nodes %s", directory.num_partitions, directory.nodes)
    return directory


def refresh_nodes(grid: Grid, nodes: NodeDirectory, timeout: float, poll: float = POLL_S) -> NodeDirectory:
    """Between rounds: drop nodes that went offline and ask nodes that joined (a restarted
    SuperNode comes back with a new node id) — only when something changed."""
    online = set(grid.get_node_ids())
    known = set(nodes.nodes.values())
    if known <= online and not nodes.missing():
        return nodes
    if not online - known:
        kept = NodeDirectory(nodes.num_partitions, {p: n for p, n in nodes.nodes.items() if n in online})
        if kept.nodes != nodes.nodes:
            log(WARNING, "[fedmoe] nodes went offline; partitions without a node: %s", kept.missing())
        return kept
    return discover_nodes(grid, timeout, poll, known=nodes)


def _directory(idents: dict[int, tuple[int, int]]) -> NodeDirectory | None:
    if not idents:
        return None
    sizes = {n for _, n in idents.values()}
    if len(sizes) > 1:
        raise RuntimeError(f"SuperNodes disagree on num-partitions: {sorted(sizes)}.")
    directory = NodeDirectory(sizes.pop())
    for node, (pid, _) in sorted(idents.items()):
        if pid in directory.nodes:
            log(WARNING, "[fedmoe] nodes %s and %s both claim partition %s; using the first",
                directory.nodes[pid], node, pid)
            continue
        directory.nodes[pid] = node
    return directory


def _error_text(reply: Message) -> str:
    err = reply.error
    return f"{ERROR_NAMES.get(err.code, 'ERROR')} ({err.code}): {err.reason or ''}".strip()


# -- rounds -----------------------------------------------------------------------------------
def collect_replies(grid: Grid, waiting: dict[str, int], timeout: float, poll: float = POLL_S) -> dict[int, Message]:
    """Pull replies to ``waiting`` (message id → client id) until all arrived or ``timeout``.

    Replies are matched by ``reply_to_message_id`` (an error reply for a dead node comes
    from the SuperLink, not from the node); late and unknown replies are ignored.
    """
    deadline = time.monotonic() + timeout
    left = dict(waiting)
    out: dict[int, Message] = {}
    while left:
        for reply in grid.pull_messages(list(left)):
            cid = left.pop(reply.metadata.reply_to_message_id, None)
            if cid is not None:
                out[cid] = reply
        if not left or time.monotonic() > deadline:
            break
        time.sleep(poll)
    return out


class GridTransport:
    """The Flower transport of a client turn (:mod:`fedmoe.engine.turn`): the round's jobs
    go out as one message each over ``grid``, replies are matched by ``reply_to_message_id``.
    Bytes: the serialised content of each request / reply (no base weights: nodes build them)."""

    local = False

    def __init__(self, grid: Grid, nodes: NodeDirectory, fingerprint: str, timeout: float) -> None:
        self.grid, self.nodes, self.fingerprint, self.timeout = grid, nodes, fingerprint, timeout
        self.wire_dtype = "fp32"  #: engine.wire_dtype of the run being served (set by exchange)

    def exchange(self, run: Run, plan: RoundPlan, jobs: Iterable[ClientJob]) -> Iterator[tuple[ClientJob, TurnOutcome]]:
        jobs = list(jobs)
        self.wire_dtype = run.cfg.engine.wire_dtype
        sent, errors = {}, {}
        messages: list[Message] = []
        targets: list[int] = []
        for job in jobs:
            cid = job.client_id
            node = self.nodes.node_for(cid)
            if node is None:
                errors[cid] = f"no SuperNode serves partition {partition_of(cid, self.nodes.num_partitions)}"
                continue
            content = job_content(job, self.fingerprint, self.wire_dtype)
            sent[cid] = content_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(plan.round)))
            targets.append(cid)
        waiting: dict[str, int] = {}
        for cid, mid in zip(targets, _push(self.grid, messages, len(targets)), strict=True):
            if mid:
                waiting[mid] = cid
            else:
                errors[cid] = "the SuperLink did not accept the message"
        replies = collect_replies(self.grid, waiting, self.timeout)
        outcomes = [self._outcome(job, plan, replies.get(job.client_id), errors.get(job.client_id, ""),
                                  sent.get(job.client_id, 0)) for job in jobs]
        if outcomes and all(K.ERR_MISMATCH in o.error for o in outcomes):
            raise ConfigError(f"Every node refused round {plan.round}: its experiment config or base model "
                              f"{K.ERR_MISMATCH} ({outcomes[0].error}).",
                              "install the same fedmoe version everywhere and use the same run config.")
        yield from zip(jobs, outcomes, strict=True)

    def _outcome(self, job: ClientJob, plan: RoundPlan, reply: Message | None, error: str, sent: int) -> TurnOutcome:
        cid = job.client_id
        if not error and reply is None:
            error = f"no reply within {self.timeout:g} s"
        elif not error and reply is not None and reply.has_error():
            error = _error_text(reply)
        result = None
        if not error and reply is not None:
            try:
                result = parse_reply(reply.content, self.wire_dtype)
                if (result.client_id, result.round) != (cid, plan.round):
                    raise ValueError(f"reply is for client {result.client_id} round {result.round}")
            except (KeyError, TypeError, ValueError) as exc:
                error = f"malformed reply: {exc}"
        if error or result is None or reply is None:
            log(WARNING, "[fedmoe] round %s client %s failed: %s", plan.round, cid, error)
            return TurnOutcome(bytes_down=sent, error=error or "unknown error")
        out = TurnOutcome(bytes_down=sent, bytes_up=content_bytes(reply.content), upload=result.upload)
        try:
            out.reply = reply_from_parts(result.upload, result.metrics, result.p, result.extra_up,
                                         max(job.expert_map.global_num_experts))
        except ValueError as exc:
            out.exc = exc
        return out

    def reject(self, rnd: int, cid: int, exc: BaseException) -> str:
        log(WARNING, "[fedmoe] round %s client %s: %s", rnd, cid, exc)
        return str(exc)


def federated_round(grid: Grid, run: Run, plan: RoundPlan, nodes: NodeDirectory, fingerprint: str,
                    timeout: float) -> RoundRecord:
    """One round through :class:`GridTransport`: failures logged, then aggregation."""
    transport = GridTransport(grid, nodes, fingerprint, timeout)
    rr = play_round(run, plan, transport)
    ok = [r for r in rr.clients if not r.error]
    log(INFO, "[fedmoe] round %s (stage %s): %d/%d clients ok, %.1f s", plan.round, plan.stage, len(ok),
        len(plan.sampled), rr.wall_time_s)
    return rr


def evaluate_on_nodes(grid: Grid, run: Run, nodes: NodeDirectory, fingerprint: str,
                      timeout: float) -> dict[str, dict[str, float]]:
    """Final evaluation on the nodes, for strategies whose clients keep personal state (FLEx):
    an ``evaluate`` message per client of ``final_sets`` with the global tensors for its sub-MoE;
    the scores are combined as ``Run.final_scores`` does and the replies' per-example rows become
    ``run.predictions`` (``predictions.jsonl``). A client whose evaluation fails is
    left out (logged); if every one fails the run stops with an error."""
    waiting: dict[str, int] = {}
    failed: dict[int, str] = {}
    order = list(run.strategy.final_sets(run).items())
    for cid, kept in order:
        node = nodes.node_for(cid)
        if node is None:
            failed[cid] = f"no SuperNode serves partition {partition_of(cid, nodes.num_partitions)}"
            continue
        content = job_content(prepare_evaluation(run, cid, kept), fingerprint)
        msg = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id="final")
        for mid in _push(grid, [msg], 1):
            if mid:
                waiting[mid] = cid
            else:
                failed[cid] = "the SuperLink did not accept the message"
    replies = collect_replies(grid, waiting, timeout)
    rows = []
    predictions: dict[int, list[dict]] = {}
    for cid, _ in order:
        reply = replies.get(cid)
        if cid in failed:
            continue
        if reply is None:
            failed[cid] = f"no reply within {timeout:g} s"
        elif reply.has_error():
            failed[cid] = _error_text(reply)
        else:
            rcid, n, scores = parse_scores(reply.content)
            if rcid != cid:
                failed[cid] = f"malformed reply: scores for client {rcid}"
                continue
            try:
                predictions[cid] = parse_predictions(reply.content, cid)
            except ValueError as exc:
                failed[cid] = f"malformed reply: {exc}"
                continue
            rows.append((run.clients[cid].task, n, scores))
    run.predictions = [r for cid, _ in order for r in predictions.get(cid, [])]  # client order, as in-process
    for cid, error in failed.items():
        log(WARNING, "[fedmoe] final evaluation of client %s failed: %s", cid, error)
    if not rows:
        raise RunStopped(f"The final evaluation failed on every node ({len(failed)} clients).",
                         "check the SuperNodes' logs and state directories (node config `state-dir`).")
    return combine_scores(rows)


def _push(grid: Grid, messages: list[Message], n: int) -> Iterable[str | None]:
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    return ids if len(ids) == n else [None] * n


def run_federated(grid: Grid, settings: AppSettings, out: Path) -> dict[str, Any]:
    """The whole experiment on ``grid``: outputs in ``out``; returns the summary."""
    t0 = time.perf_counter()
    cfg = settings.experiment_config()
    start_outputs(cfg, out)
    log(INFO, "[fedmoe] experiment %s, outputs in %s", settings.experiment, out)
    run = Run(cfg, out)
    nodes = discover_nodes(grid, settings.discovery_timeout)
    fingerprint = deployment_fingerprint(cfg, run.loaded_structure)  # the model as loaded, as nodes load it
    for plan in round_plans(run):
        nodes = refresh_nodes(grid, nodes, min(settings.discovery_timeout, REFRESH_TIMEOUT_S))
        federated_round(grid, run, plan, nodes, fingerprint, settings.round_timeout)
        maybe_checkpoint(run, plan.round)
        check_empty_rounds(run)
    scores = None
    if run.strategy.client_kind:  # personal state lives on the nodes: they evaluate
        nodes = refresh_nodes(grid, nodes, min(settings.discovery_timeout, REFRESH_TIMEOUT_S))
        scores = evaluate_on_nodes(grid, run, nodes, fingerprint, settings.round_timeout)
    summary = write_outputs(run, t0, scores)
    log(INFO, "[fedmoe] done: %d rounds, %d failed client turns, scores %s", summary["rounds"],
        summary["failed_client_turns"], summary["scores"])
    return summary
