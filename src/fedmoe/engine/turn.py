"""One client turn, written once for both engines: prepare → exchange → finish.

1. server: :func:`prepare_turn` — the trainable tensors shaped for the client's sub-MoE, its
   expert map, seed (:func:`client_seed`) and the strategy's client plan (a :class:`ClientJob`);
2. transport: the job goes to the client and the client's code
   (:func:`~fedmoe.engine.client.run_client`) answers with a :class:`TurnOutcome`. The
   in-process engine's transport (:class:`InProcess`) calls that function directly; the
   Flower engine's (:mod:`fedmoe.flower.server_app`) sends one message per job over a ``Grid``;
3. server: :func:`finish_turn` — the reply checks, the client's update and its record
   (failed turns get ``error`` and no update).

:func:`play_round` runs one round through a transport and ends with ``Run.finish_round``.
A transport is any object with ``local`` (True: the job may carry closures and the
strategy's own client trainables, run in this process), ``exchange(run, plan, jobs)``
(yields ``(job, outcome)`` in ``jobs`` order; ``jobs`` is lazy so that a local transport
prepares each turn just before running it) and ``reject(rnd, cid, exc)`` (logs a rejected
reply, returns the record's one-line error).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from fedmoe.config import ExperimentConfig
from fedmoe.engine.client import ClientPlan, ClientReply, run_client
from fedmoe.engine.faults import (
    ClientFault,
    Deadline,
    check_reply,
    check_update_norm,
    check_upload,
    expected_upload,
)
from fedmoe.engine.payload import from_bytes, from_wire, to_bytes, to_wire
from fedmoe.engine.protocols import RunView
from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import ConfigError
from fedmoe.moe.slicing import ExpertMap, SubMoE, expert_map_of, extract

if TYPE_CHECKING:
    from fedmoe.engine.strategies.base import RoundPlan


class Run(RunView, Protocol):
    """What a client turn uses of :class:`fedmoe.engine.run.Run` besides :class:`RunView`."""

    progress: Any
    faults: dict[tuple[int, int], str]

    def _measure(self, fn: Any) -> tuple[Any, int]: ...

    def _log_fault(self, rnd: int, cid: int, exc: BaseException) -> None: ...

    def p_by_task(self) -> dict[str, list]: ...

    def finish_round(self, plan: RoundPlan, records: list[ClientRecord], updates: list, replies: dict,
                     t0: float) -> RoundRecord: ...


def notify(progress: Any, event: str, *args: Any) -> None:
    """Call ``progress.<event>(*args)`` when the progress object has it (a plain per-client
    callable has none; :class:`fedmoe.progress.RunMonitor` has them all)."""
    fn = getattr(progress, event, None)
    if fn is not None:
        fn(*args)


def reason(exc: BaseException) -> str:
    """One line for ``rounds.jsonl``: the check's own reason, else ``Type: message``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, ClientFault) else f"{type(exc).__name__}: {text}".rstrip(": ")


def client_seed(cfg: ExperimentConfig, rnd: int, cid: int) -> int:
    """The local-training seed of client ``cid`` in round ``rnd``."""
    return cfg.seed * 100_003 + rnd * 1_009 + cid


@dataclass
class ClientJob:
    """What the server prepared for one sampled client in one round."""

    client_id: int
    task: str
    stage: int
    round: int
    seed: int
    kept: list[list[int]]
    expert_map: ExpertMap
    #: the global trainable tensors shaped for the client's sub-MoE (what is sent)
    download: dict[str, torch.Tensor]
    #: algorithm extras sent besides the trainable state (``ClientPlan.extra_down``)
    extra_down: dict[str, torch.Tensor] = field(default_factory=dict)
    #: server-side wrapped sub-MoE: the layout the reply is read with (never trained)
    template: nn.Module | None = None
    #: how the server reads the client's reply (``Strategy.client_trainables``, or the global
    #: trainables for a remote client kind)
    trainables: Trainables | None = None
    #: modelled setup traffic the strategy reports (``ClientPlan.setup_*_bytes``): down, up, base
    setup_bytes: tuple[int, int, int] = (0, 0, 0)
    #: train with gradient checkpointing (``Strategy.uses_checkpointing``)
    checkpointing: bool = False
    #: the strategy's client code, by name (``ClientPlan.node_plan``; "" = none)
    node_plan: str = ""
    #: the strategy's client trainables, by name (``Strategy.client_kind``; "" = the default)
    client_kind: str = ""
    #: local transports only: the client's sub-MoE to train and the strategy's full client plan
    sub: SubMoE | None = None
    plan: ClientPlan | None = None
    #: base weights the client does not hold yet (bytes; local transports: sent once)
    base_bytes: int = 0


@dataclass
class TurnOutcome:
    """What came back from one client: the reply (None: the turn failed before one arrived),
    its decoded upload, the bytes that crossed, and a transport-level error."""

    reply: ClientReply | None = None
    upload: dict[str, torch.Tensor] | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_down_base: int = 0
    error: str = ""
    #: the exception of a failed turn (handed to the transport's ``reject``)
    exc: BaseException | None = None
    #: local transports: the trained model (the update is read from it)
    model: nn.Module | None = None


class Transport(Protocol):
    local: bool

    def exchange(self, run: Run, plan: RoundPlan, jobs: Iterable[ClientJob]) -> Iterator[tuple[ClientJob, TurnOutcome]]:
        ...

    def reject(self, rnd: int, cid: int, exc: BaseException) -> str:
        ...


def prepare_turn(run: Run, cid: int, kept: list[list[int]], stage: int, rnd: int, local: bool) -> ClientJob:
    """What to send client ``cid`` this round.

    A remote transport (``local`` False) cannot send closures: the strategy's client code
    travels by name (``ClientPlan.node_plan``; its ``extra_down`` tensors as data). A strategy
    with its own client trainables names its client kind (``Strategy.client_kind``): the node
    builds them and keeps their state, and the server reads replies with the global
    ``run.trainables`` — whose ``upload_state`` writes nothing. Raises :class:`ConfigError`
    when the strategy's client code cannot cross a network.
    """
    client = run.clients[cid]
    # a local client trains its own copy of the sub-MoE; a remote one builds it on the node
    sub = extract(run.base, kept, run.family) if local else None
    expert_map = sub.expert_map if sub is not None else expert_map_of(run.base, kept, run.family)
    base_bytes = run._base_bytes(cid, kept) if local else 0
    kind = run.strategy.client_kind
    trainables = run.trainables if kind and not local else run.strategy.client_trainables(run, cid, rnd)
    if not local and type(trainables) is not Trainables and not kind:
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` uses its own client trainables ({type(trainables).__name__}) "
            "without a client kind, which remote nodes cannot build.",
            "run it with the in-process engine (`fedmoe run`), or register a client kind "
            "(fedmoe.engine.node_plans.register_client_kind) and set the strategy's `client_kind`.")
    template = run.templates.get(trainables, kept)  # the server's own wrapped sub-MoE (never trained)
    download = trainables.for_client(template, expert_map, client.task)
    cplan = run.strategy.client_plan(run, cid, kept)
    if not local and cplan is not None and (cplan.hooks is not None or cplan.extra_up is not None):
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` runs client-side closures, which a remote engine cannot send.",
            "run it with the in-process engine (`fedmoe run`), or give its strategy a named node plan "
            "(fedmoe.engine.node_plans.register_node_plan, ClientPlan.node_plan).",
        )
    extra = {k: v.detach().cpu() for k, v in (cplan.extra_down or {}).items()} if cplan else {}
    setup = (cplan.setup_down_bytes, cplan.setup_up_bytes, cplan.setup_base_bytes) if cplan else (0, 0, 0)
    return ClientJob(cid, client.task, stage, rnd, client_seed(run.cfg, rnd, cid), [list(k) for k in kept],
                     expert_map, download, extra, template, trainables, setup,
                     checkpointing=run.strategy.uses_checkpointing(run, cid, stage),
                     node_plan=cplan.node_plan if cplan else "", client_kind=kind,
                     sub=sub, plan=cplan if local else None, base_bytes=base_bytes)


def finish_turn(run: Run, job: ClientJob, outcome: TurnOutcome, transport: Transport) -> tuple[ClientRecord, Any]:
    """The client's record and update (None when the turn failed or its reply is rejected:
    not given, missing or wrong-shaped tensors, NaN/Inf, a norm past ``engine.max_update_norm``)."""
    client = run.clients[job.client_id]
    down, up, base = job.setup_bytes
    record = ClientRecord(
        client_id=job.client_id, task=client.task, stage=job.stage, loss=0.0, score=0.0,
        num_examples=len(client.train), bytes_down_base=outcome.bytes_down_base + base,
        bytes_down=outcome.bytes_down + down, bytes_up=outcome.bytes_up + up, peak_memory_bytes=0,
        predicted_memory_bytes=int(run.plan.submodel_bytes(job.kept, job.checkpointing, job.client_id)
                                   + run.strategy.extra_training_bytes(job.client_id)),
        budget_bytes=int(client.budget_bytes or 0), num_experts=sum(len(k) for k in job.kept), steps=0,
        gradient_checkpointing=job.checkpointing,
    )
    if outcome.error:
        record.error = outcome.error
        return record, None
    reply, upload = outcome.reply, outcome.upload
    assert job.template is not None and job.trainables is not None, "finish_turn needs a prepared job"
    try:
        if outcome.exc is not None:
            raise outcome.exc
        assert reply is not None and upload is not None, "an outcome without error has a reply"
        check_upload(expected_upload(job.trainables.upload_state(job.template, client.task)), upload, reply.loss)
        check_reply(reply, (len(job.kept), max(job.expert_map.global_num_experts)), job.extra_down)
        check_update_norm(upload, job.download, run.cfg.engine.max_update_norm)
        model = outcome.model if outcome.model is not None else job.template
        update = job.trainables.to_update(job.client_id, len(client.train), model, job.expert_map, upload,
                                          client.task)
    except Exception as exc:  # noqa: BLE001 — any client failure rejects this reply only
        record.error = transport.reject(job.round, job.client_id, exc) or "unknown error"
        return record, None
    record.loss, record.score, record.steps = reply.loss, reply.score, reply.steps
    record.peak_memory_bytes = int(reply.peak_memory_bytes)
    return record, update


def play_round(run: Run, plan: RoundPlan, transport: Transport) -> RoundRecord:
    """One round: every sampled client's turn through ``transport``, then ``Run.finish_round``."""
    if plan.stage == 2 and "after_stage1" not in run.p_snapshots and run.latest_p:
        run.p_snapshots["after_stage1"] = run.p_by_task()
    t0 = time.perf_counter()
    notify(run.progress, "round_start", plan.round, plan.stage, len(plan.sampled))
    records, updates, replies = [], [], {}
    jobs = (prepare_turn(run, cid, plan.sets[cid], plan.stage, plan.round, transport.local) for cid in plan.sampled)
    for job, outcome in transport.exchange(run, plan, jobs):
        rec, upd = finish_turn(run, job, outcome, transport)
        job.sub = job.template = outcome.model = None  # free this turn's models before the next turn
        records.append(rec)
        if upd is not None:
            assert outcome.reply is not None
            updates.append(upd)
            replies[job.client_id] = outcome.reply
            run.latest_p[job.client_id] = outcome.reply.p
        if run.progress:
            run.progress(plan.round, plan.stage, job.client_id, rec)
    return run.finish_round(plan, records, updates, replies, t0)


class InProcess:
    """The in-process transport: each job runs right away, in this process, through
    :func:`~fedmoe.engine.client.run_client` (closures and the strategy's own client
    trainables included). Bytes: the serialised download, reply and extras, and the base
    weights the client does not hold yet."""

    local = True

    def exchange(self, run: Run, plan: RoundPlan, jobs: Iterable[ClientJob]) -> Iterator[tuple[ClientJob, TurnOutcome]]:
        for job in jobs:
            yield job, self.turn(run, job)

    @staticmethod
    def turn(run: Run, job: ClientJob) -> TurnOutcome:
        wire = run.cfg.engine.wire_dtype
        assert job.sub is not None and job.trainables is not None, "a local job carries its sub-MoE"
        download = to_bytes(to_wire(job.download, wire))
        out = TurnOutcome(bytes_down=len(download), bytes_down_base=job.base_bytes)
        try:
            reply, model = run_client(run.ctx, run.clients[job.client_id], job.sub, job.trainables, download,
                                      job.seed, run._measure, job.plan, Deadline(run.cfg.engine.client_timeout_s),
                                      run.faults.get((job.round, job.client_id)), job.checkpointing)
            out.bytes_down += reply.extra_down_bytes
            out.bytes_up += len(reply.upload) + reply.extra_up_bytes  # a rejected reply still crossed
            out.reply, out.model = reply, model
            out.upload = from_wire(from_bytes(reply.upload), wire)
        except Exception as exc:  # noqa: BLE001 — finish_turn rejects the turn
            out.exc = exc
        return out

    def __init__(self, run: Run) -> None:
        self.run = run

    def reject(self, rnd: int, cid: int, exc: BaseException) -> str:
        self.run._log_fault(rnd, cid, exc)
        return reason(exc)
