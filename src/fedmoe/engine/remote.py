"""A client's turn split into server and client halves, for engines whose clients run elsewhere.

The in-process :class:`~fedmoe.engine.run.Run` runs one client's turn as one call
(``Run._client``) and one round as ``Run.round``. A networked engine (``fedmoe.flower``)
needs the turn in three steps, with a network hop between them:

1. server: :func:`prepare_client` — the trainable tensors shaped for the client's sub-MoE,
   its expert map and seed (the first half of ``Run._client``);
2. client: :func:`client_turn` — rebuilds the sub-MoE from its own copy of the base model
   and runs the same :func:`~fedmoe.engine.client.run_client` code path;
3. server: :func:`finish_client` (or :func:`failed_record`) and :func:`close_round` — the
   second half of ``Run._client`` and the tail of ``Run.round``, with failed clients left
   out of aggregation and kept in ``rounds.jsonl`` with their ``error``.

:func:`start_outputs` / :func:`write_outputs` are the head and tail of
:func:`~fedmoe.engine.run.run_experiment`. These helpers call ``Run``'s state and methods
and mirror its code line by line (tests/flower checks that both give identical weights);
nothing here changes the in-process engine.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.config import ExperimentConfig, config_to_dict, dump_toml, load_config
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.core.layout import UnitLayout
from fedmoe.data.settings import ClientData, build_federation
from fedmoe.engine.client import ClientContext, ClientPlan, ClientReply, run_client
from fedmoe.engine.faults import Deadline, check_upload, expected_upload
from fedmoe.engine.payload import to_bytes
from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.engine.run import Run, _jsonable, write_outputs  # noqa: F401 (re-exported)
from fedmoe.engine.strategies.base import RoundPlan
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import ConfigError
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import ExpertMap, extract
from fedmoe.train.batching import model_kind
from fedmoe.train.loop import pick_device, seed_everything


# -- configuration -----------------------------------------------------------------------
def config_from_text(text: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Parse a TOML experiment config held in a string (e.g. :func:`dump_toml`'s output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=True) as f:
        f.write(text)
        f.flush()
        return load_config(f.name, overrides)


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
    """SHA-256 of a model's structure (state keys, shapes, dtypes): a node's base model must
    match the server's (a strategy may replace the global model, e.g. with fewer experts)."""
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


def deployment_fingerprint(cfg: ExperimentConfig, base: nn.Module) -> str:
    """What server and node must agree on: the resolved config (node-local keys left out) and
    the base model's structure."""
    return hashlib.sha256(f"{config_fingerprint(cfg)}/{model_fingerprint(base)}".encode()).hexdigest()


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


def prepare_client(run: Run, cid: int, kept: list[list[int]], stage: int, rnd: int) -> ClientJob:
    """First half of ``Run._client``: what to send client ``cid`` this round.

    Raises :class:`ConfigError` when the strategy needs client-side code a node does not
    have: hooks (a ``ClientPlan`` with ``hooks`` / ``extra_up`` callables, which cannot cross
    a network) or its own ``Trainables`` class (client state kept between rounds).
    """
    client = run.clients[cid]
    trainables = run.strategy.client_trainables(run, cid, rnd)
    if type(trainables) is not Trainables:
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` uses its own client trainables ({type(trainables).__name__}), "
            "which remote nodes do not have.", "run it with the in-process engine (`fedmoe run`).")
    sub = extract(run.base, kept, run.family)
    template = trainables.wrap(sub)
    download = trainables.for_client(template, sub.expert_map, client.task)
    cplan = run.strategy.client_plan(run, cid, kept)
    if cplan is not None and (cplan.hooks is not None or cplan.extra_up is not None):
        raise ConfigError(
            f"Algorithm `{run.cfg.algorithm}` runs client-side hooks, which a remote engine cannot send.",
            "run it with the in-process engine (`fedmoe run`), or give its strategy a node-side plan.",
        )
    extra = {k: v.detach().cpu() for k, v in (cplan.extra_down or {}).items()} if cplan else {}
    setup = (cplan.setup_down_bytes, cplan.setup_up_bytes, cplan.setup_base_bytes) if cplan else (0, 0, 0)
    return ClientJob(cid, client.task, stage, rnd, client_seed(run.cfg, rnd, cid), [list(k) for k in kept],
                     sub.expert_map, download, extra, template, trainables, setup)


def reply_from_parts(upload: dict[str, torch.Tensor], metrics: dict[str, float], p: np.ndarray,
                     extra_up: dict[str, torch.Tensor] | None = None) -> ClientReply:
    """Rebuild a :class:`ClientReply` on the server from what crossed the network."""
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
        peak_memory_bytes=int(peak), predicted_memory_bytes=int(run.plan.submodel_bytes(job.kept)),
        budget_bytes=int(client.budget_bytes or 0), num_experts=sum(len(k) for k in job.kept), steps=steps,
        error=error,
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
    if updates:
        run.strategy.aggregate(run, plan, updates, replies)
    extra = run.strategy.after_round(run, plan, replies)
    rr = RoundRecord(
        round=plan.round, stage=plan.stage, sampled=list(plan.sampled), clients=records,
        wall_time_s=time.perf_counter() - t0, bytes_down_base=sum(r.bytes_down_base for r in records),
        bytes_down=sum(r.bytes_down for r in records), bytes_up=sum(r.bytes_up for r in records),
        actions=_jsonable(extra.get("actions", [])),
        theta={int(k): float(v) for k, v in extra.get("theta", {}).items()},
        skipped={int(k): str(v) for k, v in plan.skipped.items()},
    )
    run.rounds.append(rr)
    with (run.out / "rounds.jsonl").open("a") as f:
        f.write(json.dumps(rr.to_json()) + "\n")
    return rr


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


# -- client half --------------------------------------------------------------------------
@dataclass
class NodeState:
    """What a client node builds once from the experiment config (as ``Run.__init__`` does)."""

    cfg: ExperimentConfig
    base: nn.Module
    family: MoEFamily
    ctx: ClientContext
    clients: dict[int, ClientData]
    trainables: Trainables


def build_node_state(cfg: ExperimentConfig) -> NodeState:
    """Load the base model and the federation's data like ``Run.__init__`` (no budgets, no global state).

    A node holds every client's partition only in this emulated set-up; it serves the
    ones its ``partition-id`` selects.
    """
    seed_everything(cfg.seed)
    base, family, tokenizer = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    fed = build_federation(cfg)
    ctx = ClientContext(cfg, family, model_kind(family.name), tokenizer, pick_device(cfg.engine.device), fed.tasks)
    t = cfg.train
    trainables = Trainables(family, t.finetune, t.lora_r, t.lora_alpha, t.lora_dropout, {}, UnitLayout())
    return NodeState(cfg, base, family, ctx, {c.client_id: c for c in fed.clients}, trainables)


def measure_fn(cfg: ExperimentConfig) -> Callable[[Callable[[], Any]], tuple[Any, int]]:
    """``measure(fn) -> (result, peak_bytes)`` as ``Run._measure`` does."""

    def measure(fn: Callable[[], Any]) -> tuple[Any, int]:
        if not cfg.engine.measure_memory:
            return fn(), 0
        from fedmoe.moe.memory import measure_peak

        return measure_peak(fn)

    return measure


def client_turn(node: NodeState, cid: int, kept: list[list[int]], download: dict[str, torch.Tensor], seed: int,
                extra_down: dict[str, torch.Tensor] | None = None,
                measure: Callable[[Callable[[], Any]], tuple[Any, int]] | None = None,
                fault: str | None = None) -> ClientReply:
    """Client half: extract the sub-MoE from the node's base model and run :func:`run_client`
    (with the node's ``engine.client_timeout_s`` and, for drills, an injected ``fault``)."""
    client = node.clients[cid]
    sub = extract(node.base, kept, node.family)
    cplan = ClientPlan(extra_down=extra_down) if extra_down else None
    reply, _ = run_client(node.ctx, client, sub, node.trainables, to_bytes(download), seed,
                          measure or measure_fn(node.cfg), cplan, Deadline(node.cfg.engine.client_timeout_s), fault)
    return reply
