"""The in-process run: rounds planned by a strategy, final evaluation, outputs.

Outputs in ``out_dir``: ``config.toml`` (fully resolved), ``rounds.jsonl`` (one
:class:`~fedmoe.engine.records.RoundRecord` per round), ``summary.json``,
``expert_map.json``, the global trainable tensors (``global_trainable.safetensors``) and
``predictions.jsonl`` (the final evaluation, one row per client test example: ``client``,
``id``, ``task``, ``prediction``, ``reference``, ``score``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.config import ExperimentConfig, dump_toml
from fedmoe.data.settings import build_federation
from fedmoe.engine.budget import MemoryPlan, client_batch_shapes, plan_memory
from fedmoe.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedmoe.engine.client import ClientContext, evaluate_client
from fedmoe.engine.faults import parse_faults
from fedmoe.engine.fingerprint import model_fingerprint
from fedmoe.engine.node import prepare_measurement
from fedmoe.engine.payload import payload_size, save_tensors_file
from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.engine.strategies import get_strategy
from fedmoe.engine.strategies.base import ClientInfo, NewGlobal, RoundPlan, SetupInput
from fedmoe.engine.templates import TemplateCache
from fedmoe.engine.trainables import Trainables
from fedmoe.engine.turn import InProcess, finish_turn, notify, play_round, prepare_turn
from fedmoe.errors import RunStopped
from fedmoe.moe.lora import LoraSpec
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import extract, layout_of
from fedmoe.train.batching import model_kind
from fedmoe.train.loop import pick_device, seed_everything

PREDICTIONS = "predictions.jsonl"


class Run:
    """State of one in-process experiment (server side + simulated clients)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, progress: Any = None) -> None:
        self.strategy = get_strategy(cfg.algorithm)
        self.cfg, self.out, self.progress = cfg, out_dir, progress
        seed_everything(cfg.seed)
        prepare_measurement(cfg)
        self.base, self.family, self.tokenizer = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.fed = build_federation(cfg)
        self.clients = {c.client_id: c for c in self.fed.clients}
        self.kind = model_kind(self.family.name)
        self.device = pick_device(cfg.engine.device)
        self.ctx = ClientContext(cfg, self.family, self.kind, self.tokenizer, self.device, self.fed.tasks)
        self.plan: MemoryPlan = plan_memory(self.base, self.family, cfg, sorted(self.clients),
                                            client_batch_shapes(cfg, self.fed, self.kind, self.tokenizer))
        for c in self.fed.clients:
            c.budget_bytes = int(self.plan.table.budgets[c.client_id])
        self.use_model(self.base)
        self.rounds: list[RoundRecord] = []
        self.latest_p: dict[int, np.ndarray] = {}  # client → p of its latest participation
        self.p_snapshots: dict[str, dict[str, list]] = {}  # "after_stage1" / "end" → task → mean p
        self.faults = parse_faults(cfg.engine.inject_faults)  # tests and drills only
        self.predictions: list[dict] = []  # final evaluation, one row per test example
        #: structure of the model as loaded, before the strategy may replace it (what nodes load)
        self.loaded_structure = model_fingerprint(self.base)
        new = self.strategy.setup(self.setup_input())
        if new is not None:
            self.install(new)

    def setup_input(self) -> SetupInput:
        """What the strategy's setup reads: its config section, the federation section, the
        LoRA spec, the seed, the memory plan, the clients, and the loaded model."""
        cfg, section = self.cfg, self.strategy.config_section
        clients = {c.client_id: ClientInfo(c.task, len(c.train)) for c in sorted(self.fed.clients,
                                                                                  key=lambda c: c.client_id)}
        return SetupInput(getattr(cfg, section) if section else None, cfg.federation, cfg.train.finetune,
                          LoraSpec.of(cfg.train), cfg.seed, self.plan, clients, self.base, self.family,
                          self.trainables)

    def install(self, new: NewGlobal) -> None:
        """Install the global state a strategy's setup returned."""
        if new.model is not None:
            self.use_model(new.model, new.plan, new.trainables)
        else:
            self.trainables = new.trainables

    def use_model(self, model: Any, plan: MemoryPlan | None = None, trainables: Trainables | None = None) -> None:
        """Make ``model`` the global model: every field that depends on it is rebuilt here
        (frozen base, trainable state — ``trainables``, else fresh and seeded as usual —, layout,
        client caches, and the memory plan when given)."""
        for p in model.parameters():
            p.requires_grad_(False)
        t = self.cfg.train
        self.base = model
        self.trainables = trainables or Trainables.create(model, self.family, t.finetune, LoraSpec.of(t),
                                                          self.cfg.seed)
        self.base_layout = layout_of(model, self.family)
        self.cache: dict[int, set] = {}  # client → base units (and "dense") it already holds
        self.templates = TemplateCache(model, self.family)  # the server's wrapped sub-MoEs
        if plan is not None:
            self.plan = plan

    # -- one client ------------------------------------------------------------------
    def _base_bytes(self, cid: int, kept: list[list[int]]) -> int:
        """Serialised size of the base weights this client does not hold yet (sent once, in
        ``engine.wire_dtype``), computed from tensor metadata; tied tensors count once
        (:func:`payload_size`). Expert slices are counted by shape (nothing copied)."""
        have = self.cache.setdefault(cid, set())
        state, layout = self.base.state_dict(), self.base_layout
        tensors: dict[str, Any] = {}
        if "dense" not in have:
            tensors.update({k: state[k] for k in layout.dense_keys})
            have.add("dense")
        for i, ids in enumerate(kept):
            for g in ids:
                if (i, g) not in have:
                    for n, s in enumerate(layout.experts[(i, g)] + layout.routers[(i, g)]):
                        tensors[f"{s.key}#{g}#{n}"] = _slice_meta(s, state)
                    have.add((i, g))
        return payload_size(tensors, wire_dtype=self.cfg.engine.wire_dtype)

    def _client(self, cid: int, kept: list[list[int]], stage: int, rnd: int):
        """One client's turn in-process (:mod:`fedmoe.engine.turn`): ``(record, update, reply)``;
        a failed or rejected turn has ``error`` set, no update and no reply."""
        transport = InProcess(self)
        job = prepare_turn(self, cid, kept, stage, rnd, transport.local)
        outcome = transport.turn(self, job)
        record, update = finish_turn(self, job, outcome, transport)
        return record, update, (outcome.reply if update is not None else None)

    def _log_fault(self, rnd: int, cid: int, exc: BaseException) -> None:
        """Keep the full traceback of a rejected turn (``rounds.jsonl`` has the one-line reason)."""
        import traceback

        with (self.out / "client_errors.log").open("a") as f:
            f.write(f"--- round {rnd} client {cid}\n")
            f.write("".join(traceback.format_exception(exc)))

    def _measure(self, fn: Any) -> tuple[Any, int]:
        if not self.cfg.engine.measure_memory:
            return fn(), 0
        from fedmoe.moe.memory import measure_client_turn

        return measure_client_turn(fn, self.device)

    def p_by_task(self) -> dict[str, list]:
        """Mean activation probabilities per task over clients' latest reports (Figure 1)."""
        out: dict[str, list] = {}
        for task in sorted({c.task for c in self.fed.clients}):
            ps = [p for cid, p in self.latest_p.items() if self.clients[cid].task == task]
            if ps:
                out[task] = np.mean(ps, axis=0).tolist()
        return out

    def round(self, plan: RoundPlan) -> RoundRecord:
        """One round with the in-process transport (clients run here, one after another)."""
        return play_round(self, plan, InProcess(self))

    def finish_round(self, plan: RoundPlan, records: list[ClientRecord], updates: list, replies: dict,
                     t0: float) -> RoundRecord:
        """Tail of a round, shared by both engines: aggregate the surviving updates (none: the
        global model stays as it was), let the strategy adjust structure, log the round.

        ``records`` holds every sampled client (failed ones with ``error``); ``updates`` and
        ``replies`` only the successful ones, in ``plan.sampled`` order.
        """
        for rec in records:
            rec.judge_budget()
        if updates:
            self.trainables.state = self.strategy.aggregate(self.trainables, plan, updates, replies)
        extra = self.strategy.after_round(self, plan, replies)
        rr = RoundRecord(
            round=plan.round, stage=plan.stage, sampled=list(plan.sampled), clients=records,
            wall_time_s=time.perf_counter() - t0, bytes_down_base=sum(r.bytes_down_base for r in records),
            bytes_down=sum(r.bytes_down for r in records), bytes_up=sum(r.bytes_up for r in records),
            actions=_jsonable(extra.get("actions", [])), theta={int(k): float(v) for k, v in extra.get("theta", {}).items()},
            skipped={int(k): str(v) for k, v in plan.skipped.items()},
        )
        self.rounds.append(rr)
        with (self.out / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(rr.to_json()) + "\n")
        notify(self.progress, "round_done", rr)
        return rr

    # -- final evaluation --------------------------------------------------------------
    def final_scores(self) -> dict[str, dict[str, float]]:
        """Example-weighted mean test scores per task, each client on its own sub-MoE; the
        per-example rows go to ``self.predictions`` (``predictions.jsonl``)."""
        rows = []
        self.predictions = []
        sets = self.strategy.final_sets(self)
        notify(self.progress, "evaluating", len(sets))
        for cid, kept in sets.items():
            client = self.clients[cid]
            sub = extract(self.base, kept, self.family)
            trainables = self.strategy.client_trainables(self, cid, None)
            rows.append((client.task, len(client.test),
                         evaluate_client(self.ctx, client, sub, trainables, predictions=self.predictions)))
            notify(self.progress, "evaluated", cid)
        return combine_scores(rows)


def _slice_meta(s: Any, state: dict[str, Any]) -> Any:
    """A ``meta`` tensor shaped like ``s.read(state)`` (a whole tensor is returned as is)."""
    t = state[s.key]
    if s.dim is None:
        return t
    shape = list(t.shape)
    shape[s.dim] = len(s.index)
    return t.new_empty(shape, device="meta")


def combine_scores(rows: list[tuple[str, int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per task, the mean of the clients' scores weighted by their test examples;
    ``rows`` = ``(task, num_test_examples, scores)`` in client order."""
    per_task: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for task, n, scores in rows:
        per_task.setdefault(task, []).append((n, scores))
    out = {}
    for task, pairs in sorted(per_task.items()):
        n = sum(w for w, _ in pairs)
        out[task] = {k: sum(w * s[k] for w, s in pairs) / n for k in pairs[0][1]}
    return out


def empty_streak(rounds: list[RoundRecord]) -> int:
    """Consecutive rounds at the end of ``rounds`` in which clients were sampled and none succeeded."""
    n = 0
    for rr in reversed(rounds):
        if not rr.clients or any(not c.error for c in rr.clients):
            break
        n += 1
    return n


def check_empty_rounds(run: Run) -> None:
    """Stop the run with :class:`RunStopped` after ``engine.max_empty_rounds`` empty rounds in a row."""
    limit = run.cfg.engine.max_empty_rounds
    n = empty_streak(run.rounds)
    if limit and n >= limit:
        last = run.rounds[-1].clients[0].error
        raise RunStopped(
            f"Stopped after {n} consecutive rounds in which no client reply survived (last error: {last}).",
            f"see {run.out / 'rounds.jsonl'} and client_errors.log; fix the cause and continue with "
            f"`fedmoe run --resume {run.out}`, or raise engine.max_empty_rounds (0 = never stop).")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: Any = None,
                   resume: bool = False) -> dict[str, Any]:
    """Run an experiment in-process and write the outputs; returns the summary.

    With ``resume``, continue from the last complete checkpoint in ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = latest_checkpoint(out) if resume else None  # a bad LATEST fails before anything loads
    run = Run(cfg, out, progress)
    start = 0
    total = run.strategy.num_rounds()
    if resume and ckpt is None:
        from fedmoe.engine.checkpoint import CheckpointError

        raise CheckpointError(f"Run directory {out} has no checkpoint to resume from.",
                              f"start it again: `fedmoe run {out / 'config.toml'} --out {out} --overwrite`.")
    if ckpt is not None:  # checked in full (config, checksums, contents) even when the run has finished
        start = load_checkpoint(run, ckpt) + 1
    finished = _finished_summary(out) if resume else None
    if finished is not None and finished.get("rounds", -1) >= total:
        return finished  # resuming a finished run (with its own config) changes nothing
    notify(progress, "start", total, start)
    (out / "rounds.jsonl").write_text("".join(json.dumps(rr.to_json()) + "\n" for rr in run.rounds))
    (out / "config.toml").write_text(dump_toml(cfg))
    for rnd in range(start, total):
        run.round(run.strategy.plan(run, rnd))
        if cfg.engine.checkpoint_every and (rnd + 1) % cfg.engine.checkpoint_every == 0:
            save_checkpoint(run, rnd)
        check_empty_rounds(run)
    return write_outputs(run, t0)


def _finished_summary(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def write_outputs(run: Run, t0: float, scores: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Tail of ``run_experiment``: final evaluation, ``summary.json``, expert map, global tensors.

    ``scores``: final scores computed elsewhere (on the clients' nodes, for strategies whose
    clients keep personal state the server does not have); None: :meth:`Run.final_scores`.
    """
    cfg, out = run.cfg, run.out
    scores = run.final_scores() if scores is None else scores
    clients = [c for rr in run.rounds for c in rr.clients if not c.error]
    peaks = [c.peak_memory_bytes for c in clients] or [0]
    summary: dict[str, Any] = {
        "algorithm": cfg.algorithm, "model": cfg.model.name, "setting": run.fed.preset, "seed": cfg.seed,
        "rounds": len(run.rounds), "scores": scores,
        "bytes_down_base": sum(rr.bytes_down_base for rr in run.rounds),
        "bytes_down": sum(rr.bytes_down for rr in run.rounds),
        "bytes_up": sum(rr.bytes_up for rr in run.rounds),
        "peak_memory_max": max(peaks), "peak_memory_mean": float(np.mean(peaks)),
        "experts_start": {}, "experts_end": run.strategy.expert_counts(run),
    }
    extras = getattr(run.strategy, "summary_extras", None)
    if extras:
        summary.update(extras())
    summary["failed_client_turns"] = sum(1 for rr in run.rounds for c in rr.clients if c.error)
    summary["over_budget_turns"] = sum(1 for rr in run.rounds for c in rr.clients if c.over_budget)
    summary["wall_time_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    if run.predictions:
        (out / PREDICTIONS).write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in run.predictions))
    (out / "expert_map.json").write_text(json.dumps(
        {str(k): v for k, v in run.strategy.final_sets(run).items()}, indent=1))
    run.p_snapshots["end"] = run.p_by_task()
    (out / "p_by_task.json").write_text(json.dumps(run.p_snapshots))
    save_tensors_file(run.trainables.state, out / "global_trainable.safetensors")
    return summary
