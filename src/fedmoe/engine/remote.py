"""A client's turn split into server and client halves, for engines whose clients run elsewhere.

The in-process :class:`~fedmoe.engine.run.Run` runs one client's turn as one call
(``Run._client``) and one round as ``Run.round``. A networked engine (``fedmoe.flower``)
needs the turn in three steps, with a network hop between them:

1. server: :func:`prepare_client` — the trainable tensors shaped for the client's sub-MoE,
   its expert map and seed (the first half of ``Run._client``);
2. client: :func:`client_turn` — rebuilds the sub-MoE from its own copy of the base model
   and runs the same :func:`~fedmoe.engine.client.run_client` code path;
3. server: :func:`finish_client` (or :func:`failed_record`) — the second half of
   ``Run._client``, with the same reply checks — and :func:`close_round`, which calls the
   round tail both engines share (``Run.finish_round``): failed clients are left out of
   aggregation and kept in ``rounds.jsonl`` with their ``error``.

:func:`start_outputs` / :func:`write_outputs` are the head and tail of
:func:`~fedmoe.engine.run.run_experiment`. These helpers call ``Run``'s state and methods
and mirror its code line by line (tests/flower checks that both give identical weights);
nothing here changes the in-process engine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmoe.config import ExperimentConfig, dump_toml, load_config
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.engine.client import ClientReply
from fedmoe.engine.faults import check_reply, check_update_norm, check_upload, expected_upload
from fedmoe.engine.fingerprint import (  # noqa: F401 (re-exported)
    config_fingerprint,
    deployment_fingerprint,
    model_fingerprint,
)
from fedmoe.engine.node import (  # noqa: F401 (re-exported: the client half)
    NodeState,
    build_node_state,
    client_evaluation,
    client_turn,
    measure_fn,
)
from fedmoe.engine.payload import to_bytes
from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.engine.run import Run, _jsonable, combine_scores, write_outputs  # noqa: F401 (re-exported)
from fedmoe.engine.strategies.base import RoundPlan
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import ConfigError
from fedmoe.moe.slicing import ExpertMap, expert_map_of


# -- configuration -----------------------------------------------------------------------
def config_from_text(text: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Parse a TOML experiment config held in a string (e.g. :func:`dump_toml`'s output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=True) as f:
        f.write(text)
        f.flush()
        return load_config(f.name, overrides)


#: ``ClientJob.round`` of a final-evaluation job
EVAL_ROUND = -1


def client_seed(cfg: ExperimentConfig, rnd: int, cid: int) -> int:
    """The local-training seed of client ``cid`` in round ``rnd`` (as in ``Run._client``)."""
    return cfg.seed * 100_003 + rnd * 1_009 + cid


def round_plans(run: Run) -> Iterator[RoundPlan]:
    """The strategy's plans, one round at a time (each drawn after the previous round closed)."""
    for rnd in range(run.strategy.num_rounds(run)):
        yield run.strategy.plan(run, rnd)


# -- server half --------------------------------------------------------------------------
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
    #: how the client wraps its sub-MoE (``Strategy.client_trainables``)
    trainables: Trainables | None = None
    #: modelled setup traffic the strategy reports (``ClientPlan.setup_*_bytes``): down, up, base
    setup_bytes: tuple[int, int, int] = (0, 0, 0)
    #: train with gradient checkpointing (``Strategy.uses_checkpointing``)
    checkpointing: bool = False
    #: the strategy's client code, by name (``ClientPlan.node_plan``; "" = none)
    node_plan: str = ""
    #: the strategy's client trainables, by name (``Strategy.client_kind``; "" = the default)
    client_kind: str = ""


def prepare_client(run: Run, cid: int, kept: list[list[int]], stage: int, rnd: int) -> ClientJob:
    """First half of ``Run._client``: what to send client ``cid`` this round.

    The strategy's client code travels by name (``ClientPlan.node_plan``; its ``extra_down``
    tensors as data). A strategy with its own client trainables names its client kind
    (``Strategy.client_kind``): the node builds them and keeps their state, and the server reads
    replies with the global ``run.trainables`` — whose ``upload_state`` writes nothing.

    Raises :class:`ConfigError` when the strategy needs client-side code that cannot cross a
    network: closures (a ``ClientPlan`` with ``hooks`` / ``extra_up``) or its own
    ``Trainables`` without a registered client kind.
    """
    client = run.clients[cid]
    kind = run.strategy.client_kind
    trainables = run.trainables if kind else run.strategy.client_trainables(run, cid, rnd)
    if type(trainables) is not Trainables and not kind:
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` uses its own client trainables ({type(trainables).__name__}) "
            "without a client kind, which remote nodes cannot build.",
            "run it with the in-process engine (`fedmoe run`), or register a client kind "
            "(fedmoe.engine.node_plans.register_client_kind) and set the strategy's `client_kind`.")
    expert_map = expert_map_of(run.base, kept, run.family)
    template = run.templates.get(trainables, kept)
    download = trainables.for_client(template, expert_map, client.task)
    cplan = run.strategy.client_plan(run, cid, kept)
    if cplan is not None and (cplan.hooks is not None or cplan.extra_up is not None):
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` runs client-side closures, which a remote engine cannot send.",
            "run it with the in-process engine (`fedmoe run`), or give its strategy a named node plan "
            "(fedmoe.engine.node_plans.register_node_plan, ClientPlan.node_plan).",
        )
    extra = {k: v.detach().cpu() for k, v in (cplan.extra_down or {}).items()} if cplan else {}
    setup = (cplan.setup_down_bytes, cplan.setup_up_bytes, cplan.setup_base_bytes) if cplan else (0, 0, 0)
    return ClientJob(cid, client.task, stage, rnd, client_seed(run.cfg, rnd, cid), [list(k) for k in kept],
                     expert_map, download, extra, template, trainables, setup,
                     node_plan=cplan.node_plan if cplan else "", client_kind=kind,
                     checkpointing=run.strategy.uses_checkpointing(run, cid, stage))


def prepare_evaluation(run: Run, cid: int, kept: list[list[int]]) -> ClientJob:
    """What a node needs for client ``cid``'s final evaluation (strategies with a client kind):
    the global tensors shaped for its sub-MoE, as ``Run.final_scores`` loads them."""
    client = run.clients[cid]
    expert_map = expert_map_of(run.base, kept, run.family)
    template = run.templates.get(run.trainables, kept)
    download = run.trainables.for_client(template, expert_map, client.task)
    return ClientJob(cid, client.task, 0, EVAL_ROUND, 0, [list(k) for k in kept], expert_map, download,
                     client_kind=run.strategy.client_kind)


def reply_from_parts(upload: dict[str, torch.Tensor], metrics: dict[str, float], p: np.ndarray,
                     extra_up: dict[str, torch.Tensor] | None = None, width: int | None = None) -> ClientReply:
    """Rebuild a :class:`ClientReply` on the server from what crossed the network.

    ``width``: the server's number of experts per layer (``max(global_num_experts)`` of the
    job's expert map). A node indexes ``p`` by its own base model's experts; when the strategy
    replaced the global model by a smaller one (a prefix of each layer's experts), the columns
    beyond ``width`` are experts the client did not hold (zero) and are dropped.
    """
    if width is not None and p.shape[-1] != width:
        if p.shape[-1] < width or np.any(p[..., width:]):
            raise ValueError(f"routing statistics have {p.shape[-1]} expert columns; the server's model has {width}")
        p = p[..., :width]
    return ClientReply(
        upload=to_bytes(upload), loss=float(metrics["loss"]), score=float(metrics["score"]), p=p,
        steps=int(metrics["steps"]), peak_memory_bytes=int(metrics["peak_memory_bytes"]),
        extra=extra_up or {}, extra_down_bytes=0, extra_up_bytes=0,
    )


def finish_client(run: Run, job: ClientJob, reply: ClientReply, upload: dict[str, torch.Tensor],
                  bytes_down: int, bytes_up: int, bytes_down_base: int = 0) -> tuple[ClientRecord, ClientUpdate]:
    """Second half of ``Run._client``: the client's update and its record.

    Raises :class:`~fedmoe.engine.faults.ClientFault` when the upload must be rejected
    (tensors not given, missing, wrong shape, NaN/Inf, non-finite loss).

    ``bytes_down`` / ``bytes_up`` are the sizes of what actually crossed the network
    (the engine measures its own messages); ``bytes_down_base`` the base weights sent. The
    strategy's modelled setup traffic (``ClientPlan.setup_*_bytes``) is added, as in-process.
    """
    client = run.clients[job.client_id]
    assert job.template is not None and job.trainables is not None, "finish_client needs a prepared job"
    check_upload(expected_upload(job.trainables.upload_state(job.template, client.task)), upload, reply.loss)
    check_reply(reply, (len(job.kept), max(job.expert_map.global_num_experts)), job.extra_down)
    check_update_norm(upload, job.download, run.cfg.engine.max_update_norm)
    update = job.trainables.to_update(job.client_id, len(client.train), job.template, job.expert_map, upload,
                                      client.task)
    down, up, base = job.setup_bytes
    record = _record(run, job, bytes_down=bytes_down + down, bytes_down_base=bytes_down_base + base,
                     bytes_up=bytes_up + up, loss=reply.loss, score=reply.score, peak=reply.peak_memory_bytes,
                     steps=reply.steps)
    return record, update


def failed_record(run: Run, job: ClientJob, error: str, bytes_down: int = 0) -> ClientRecord:
    """The record of a client whose turn failed: zero loss/score/steps, ``error`` set."""
    return _record(run, job, bytes_down=bytes_down, bytes_down_base=0, bytes_up=0, loss=0.0, score=0.0, peak=0,
                   steps=0, error=error or "unknown error")


def _record(run: Run, job: ClientJob, *, bytes_down: int, bytes_down_base: int, bytes_up: int, loss: float,
            score: float, peak: int, steps: int, error: str = "") -> ClientRecord:
    client = run.clients[job.client_id]
    return ClientRecord(
        client_id=job.client_id, task=client.task, stage=job.stage, loss=loss, score=score,
        num_examples=len(client.train), bytes_down_base=bytes_down_base, bytes_down=bytes_down, bytes_up=bytes_up,
        peak_memory_bytes=int(peak), predicted_memory_bytes=int(run.plan.submodel_bytes(job.kept, job.checkpointing)),
        budget_bytes=int(client.budget_bytes or 0), num_experts=sum(len(k) for k in job.kept), steps=steps,
        error=error, gradient_checkpointing=job.checkpointing,
    )


def close_round(run: Run, plan: RoundPlan, records: list[ClientRecord], updates: list[ClientUpdate],
                replies: dict[int, ClientReply], t0: float) -> RoundRecord:
    """Tail of ``Run.round``: aggregate the successful updates, structure updates, log the round.

    ``records`` holds every sampled client (failed ones with ``error``); ``updates`` and
    ``replies`` only the successful ones, in ``plan.sampled`` order.
    """
    if plan.stage == 2 and "after_stage1" not in run.p_snapshots and run.latest_p:
        run.p_snapshots["after_stage1"] = run.p_by_task()
    for cid, reply in replies.items():
        run.latest_p[cid] = reply.p
    if run.progress:
        for rec in records:
            run.progress(plan.round, plan.stage, rec.client_id, rec)
    return run.finish_round(plan, records, updates, replies, t0)


def maybe_checkpoint(run: Run, rnd: int) -> None:
    """Write a server checkpoint after round ``rnd`` when ``engine.checkpoint_every`` says so."""
    every = run.cfg.engine.checkpoint_every
    if every and (rnd + 1) % every == 0:
        from fedmoe.engine.checkpoint import save_checkpoint

        save_checkpoint(run, rnd)


def start_outputs(cfg: ExperimentConfig, out: Path) -> None:
    """Head of ``run_experiment``: an empty ``rounds.jsonl`` and the resolved ``config.toml``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").write_text("")
    (out / "config.toml").write_text(dump_toml(cfg))
