"""The in-process FedMoE run: stage 1, stage 2, final evaluation, outputs.

Outputs in ``out_dir``: ``config.toml`` (fully resolved), ``rounds.jsonl`` (one
:class:`~fedmoe.engine.records.RoundRecord` per round), ``summary.json``,
``expert_map.json``, and the global weights (``global_trainable.safetensors``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.algorithms import fedmoe as algo
from fedmoe.config import ExperimentConfig, dump_toml
from fedmoe.core.aggregation import modular_aggregate
from fedmoe.data.settings import build_federation
from fedmoe.engine.budget import MemoryPlan, plan_memory
from fedmoe.engine.client import ClientContext, run_client
from fedmoe.engine.payload import from_bytes, to_bytes
from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import ConfigError
from fedmoe.moe.models import load_model
from fedmoe.moe.slicing import extract
from fedmoe.train.batching import model_kind
from fedmoe.train.evaluate import evaluate
from fedmoe.train.loop import pick_device, seed_everything


class Run:
    """State of one in-process experiment (server side + simulated clients)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, progress: Any = None) -> None:
        if cfg.algorithm != "fedmoe":
            raise ConfigError(f"Algorithm `{cfg.algorithm}` is not available in this version.",
                              "use --set algorithm=fedmoe.")
        self.cfg, self.out, self.progress = cfg, out_dir, progress
        seed_everything(cfg.seed)
        self.base, self.family, self.tokenizer = load_model(cfg.model.name, cfg.seed, cfg.model.dtype)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.fed = build_federation(cfg)
        self.kind = model_kind(self.family.name)
        self.device = pick_device(cfg.engine.device)
        self.ctx = ClientContext(cfg, self.family, self.kind, self.tokenizer, self.device, self.fed.tasks)
        t = cfg.train
        self.trainables = Trainables.create(self.base, self.family, t.finetune, t.lora_r, t.lora_alpha,
                                            t.lora_dropout, cfg.seed)
        self.plan: MemoryPlan = plan_memory(self.base, self.family, cfg, [c.client_id for c in self.fed.clients])
        for c in self.fed.clients:
            c.budget_bytes = self.plan.table.budgets[c.client_id]
        self.state = algo.FedMoEServerState()
        self.cache: dict[int, set] = {}  # client → base units (and "dense") it holds
        self.rounds: list[RoundRecord] = []
        self.clients = {c.client_id: c for c in self.fed.clients}

    # -- one client ------------------------------------------------------------------
    def _base_bytes(self, cid: int, kept: list[list[int]]) -> int:
        have = self.cache.setdefault(cid, set())
        tensors: dict[str, Any] = {}
        state = self.base.state_dict()
        from fedmoe.moe.slicing import layout_of

        layout = layout_of(self.base, self.family)
        if "dense" not in have:
            tensors.update({k: state[k] for k in layout.dense_keys})
            have.add("dense")
        for i, ids in enumerate(kept):
            for g in ids:
                if (i, g) not in have:
                    for n, s in enumerate(layout.experts[(i, g)] + layout.routers[(i, g)]):
                        tensors[f"{s.key}#{g}#{n}"] = s.read(state)
                    have.add((i, g))
        return len(to_bytes(tensors))

    def _client(self, cid: int, kept: list[list[int]], stage: int, rnd: int):
        client = self.clients[cid]
        sub = extract(self.base, kept, self.family)
        base_bytes = self._base_bytes(cid, kept)
        wrapped = self.trainables.wrap(extract(self.base, kept, self.family))
        download = to_bytes(self.trainables.for_client(wrapped, sub.expert_map, client.task))
        seed = self.cfg.seed * 100_003 + rnd * 1_009 + cid
        reply, model = run_client(self.ctx, client, sub, self.trainables, download, seed, self._measure)
        state = from_bytes(reply.upload)
        update = self.trainables.to_update(cid, len(client.train), model, sub.expert_map, state, client.task)
        record = ClientRecord(
            client_id=cid, task=client.task, stage=stage, loss=reply.loss, score=reply.score,
            num_examples=len(client.train), bytes_down_base=base_bytes, bytes_down=len(download),
            bytes_up=len(reply.upload), peak_memory_bytes=reply.peak_memory_bytes,
            predicted_memory_bytes=int(self.plan.submodel_bytes(kept)), budget_bytes=int(client.budget_bytes or 0),
            num_experts=sum(len(k) for k in kept), steps=reply.steps,
        )
        return record, update, reply

    def _round(self, rnd: int, stage: int, sampled: list[int], sets: dict[int, list[list[int]]]):
        t0 = time.perf_counter()
        records, updates, replies = [], [], {}
        for cid in sampled:
            rec, upd, reply = self._client(cid, sets[cid], stage, rnd)
            records.append(rec)
            updates.append(upd)
            replies[cid] = reply
            if self.progress:
                self.progress(rnd, stage, cid, rec)
        self.trainables.state = modular_aggregate(self.trainables.state, self.trainables.layout, updates)
        rr = RoundRecord(round=rnd, stage=stage, sampled=list(sampled), clients=records,
                         wall_time_s=time.perf_counter() - t0,
                         bytes_down_base=sum(r.bytes_down_base for r in records),
                         bytes_down=sum(r.bytes_down for r in records), bytes_up=sum(r.bytes_up for r in records))
        return rr, replies

    def _log(self, rr: RoundRecord) -> None:
        self.rounds.append(rr)
        with (self.out / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(rr.to_json()) + "\n")

    def _measure(self, fn: Any) -> tuple[Any, int]:
        if not self.cfg.engine.measure_memory:
            return fn(), 0
        from fedmoe.moe.memory import measure_peak

        return measure_peak(fn)

    # -- stages ----------------------------------------------------------------------
    def stage1(self) -> None:
        cfg, fc = self.cfg, self.cfg.fedmoe
        full = [list(range(n)) for n in self.plan.num_experts]
        info = {c.client_id: (c.task, len(c.train)) for c in self.fed.clients}
        if not fc.stage1:  # ablation "w/o stage 1": random sets under the same budget rule
            rng = np.random.default_rng(cfg.seed)
            p = {cid: np.zeros_like(self.plan.table.expert_bytes) for cid in info}
            self.state = algo.initial_expert_sets(self.state, p, self.plan.table, alpha=fc.alpha, tol=fc.theta_tol,
                                                  exclude_unfit=fc.exclude_unfit, random_init=rng)
            return
        sufficient = [cid for cid in sorted(info) if self.plan.table.budgets[cid] >= self.plan.full_bytes]
        if not sufficient:
            raise ConfigError(
                "No client's memory budget holds the full MoE for stage 1 "
                f"(needs {self.plan.full_bytes / 2**20:.1f} MiB; largest budget "
                f"{max(self.plan.table.budgets.values()) / 2**20:.1f} MiB).",
                "raise setting.budget_high above 1.0, or run the ablation with --set fedmoe.stage1=false.",
            )
        reports: dict[int, tuple[str, int, np.ndarray]] = {}
        rng = np.random.default_rng(cfg.seed + 1)
        per_round = min(cfg.setting.clients_per_round, len(sufficient))
        for r in range(fc.stage1_rounds):
            sampled = sorted(rng.choice(sufficient, size=per_round, replace=False).tolist())
            rr, replies = self._round(r, 1, sampled, {cid: full for cid in sampled})
            for cid, rep in replies.items():
                reports[cid] = (info[cid][0], info[cid][1], rep.p)
            self._log(rr)
        p = algo.predict_p(reports, info)
        self.state = algo.initial_expert_sets(self.state, p, self.plan.table, alpha=fc.alpha, tol=fc.theta_tol,
                                              exclude_unfit=fc.exclude_unfit, reported=reports.keys())

    def stage2(self) -> None:
        fc = self.cfg.fedmoe
        rng = np.random.default_rng(self.cfg.seed + 2)
        for r in range(fc.rounds):
            rnd = fc.stage1_rounds * int(fc.stage1) + r
            sampled = [c for c in self.fed.sample_clients(rnd, rng) if c in self.state.expert_sets]
            skipped = {c: self.state.excluded.get(c, "") for c in self.fed.sample_clients(rnd, rng) if c in self.state.excluded}
            rr, replies = self._round(rnd, 2, sampled, self.state.expert_sets)
            results = [algo.ClientResult(cid, len(self.clients[cid].train), rep.score, rep.p)
                       for cid, rep in replies.items()]
            self.state, events = algo.after_round(self.state, results, self.plan.table, patience=fc.patience,
                                                  top_k=fc.top_k_similar, stage2_adjust=fc.stage2_adjust)
            rr.actions = _jsonable(events)
            rr.theta = {int(k): float(v) for k, v in self.state.theta.items() if k in sampled}
            rr.skipped = skipped
            self._log(rr)

    # -- final evaluation --------------------------------------------------------------
    def final_scores(self) -> dict[str, dict[str, float]]:
        per_task: dict[str, list[tuple[int, dict[str, float]]]] = {}
        for cid, kept in sorted(self.state.expert_sets.items()):
            client = self.clients[cid]
            sub = extract(self.base, kept, self.family)
            model = self.trainables.wrap(sub).to(self.device)
            self.trainables.load(model, self.trainables.for_client(model, sub.expert_map, client.task))
            scores = evaluate(model, self.kind, self.fed.tasks[client.task], list(client.test), self.tokenizer,
                              self.cfg.data, self.device, self.cfg.train.eval_batch_size)
            per_task.setdefault(client.task, []).append((len(client.test), scores))
        out = {}
        for task, rows in per_task.items():
            n = sum(w for w, _ in rows)
            out[task] = {k: sum(w * s[k] for w, s in rows) / n for k in rows[0][1]}
        return out


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


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: Any = None) -> dict[str, Any]:
    """Run FedMoE in-process and write the outputs; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").write_text("")
    (out / "config.toml").write_text(dump_toml(cfg))
    t0 = time.perf_counter()
    run = Run(cfg, out, progress)
    start_counts = None
    run.stage1()
    start_counts = algo.expert_count_stats(run.state)
    run.stage2()
    scores = run.final_scores()
    end_counts = algo.expert_count_stats(run.state)
    clients = [c for rr in run.rounds for c in rr.clients]
    peaks = [c.peak_memory_bytes for c in clients] or [0]
    summary = {
        "algorithm": cfg.algorithm,
        "model": cfg.model.name,
        "setting": run.fed.preset,
        "seed": cfg.seed,
        "rounds": len(run.rounds),
        "scores": scores,
        "bytes_down_base": sum(rr.bytes_down_base for rr in run.rounds),
        "bytes_down": sum(rr.bytes_down for rr in run.rounds),
        "bytes_up": sum(rr.bytes_up for rr in run.rounds),
        "peak_memory_max": max(peaks),
        "peak_memory_mean": float(np.mean(peaks)),
        "experts_start": start_counts,
        "experts_end": end_counts,
        "excluded": {str(k): v for k, v in run.state.excluded.items()},
        "frozen": sorted(int(c) for c in run.state.frozen),
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "expert_map.json").write_text(json.dumps(
        {str(k): v for k, v in sorted(run.state.expert_sets.items())}, indent=1))
    run.trainables.write_back(run.base)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in run.trainables.state.items()}, str(out / "global_trainable.safetensors"))
    return summary


__all__ = ["Run", "asdict", "run_experiment"]
