"""FedMoE (and randomMoE) on the engine: stage 1, then Algorithm 1 (docs/algorithms.md §1, §2.4).

Stage 1 measures p on **every** memory-rich client (budget ≥ the full MoE + LoRA): it lasts
``max(fedmoe.stage1_rounds, ⌈n_rich / per_round⌉)`` rounds (``per_round`` =
``min(federation.clients_per_round, n_rich)``); each round takes memory-rich clients that have not
reported yet first — in the order the setting's sampler draws them, then the others in a seeded
order — and fills any remaining places with ones that have. While no client has reported p
(every stage-1 turn failed), further rounds stay in stage 1 (taking rounds from stage 2);
``engine.max_empty_rounds`` stops such a run with a one-line message and a checkpoint from
which ``fedmoe run --resume`` repeats stage 1.

``random_moe`` = random initial sets under the same budget rule, no recommendation; the
FedMoE ablations are the switches ``fedmoe.stage1`` and ``fedmoe.stage2_adjust``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedmoe.algorithms import fedmoe as algo
from fedmoe.engine.strategies.base import RoundPlan, SetupInput, Strategy
from fedmoe.errors import ConfigError, RunStopped

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run


class FedMoEStrategy(Strategy):
    config_section = "fedmoe"

    def setup(self, inp: SetupInput) -> None:
        self.state = algo.FedMoEServerState()
        self.fc, self.fed, self.seed, self.mem = inp.section, inp.federation, inp.seed, inp.plan
        self.random_init = self.name == "random_moe" or not self.fc.stage1
        self.adjust = self.name != "random_moe" and self.fc.stage2_adjust
        self.info = {cid: (c.task, c.num_train) for cid, c in inp.clients.items()}
        self.start_counts: dict[str, float] | None = None
        self.reports: dict[int, tuple[str, int, np.ndarray]] = {}
        unfit = algo.unfit_clients(self.mem.table, self.fc.alpha)
        if unfit and not self.fed.exclude_unfit:
            raise next(iter(unfit.values()))  # before stage 1: its result could not change this

    # -- rounds --------------------------------------------------------------------------
    def _stage1_rounds(self) -> int:
        if self.random_init:
            return 0
        n_rich = len(self._sufficient())
        per_round = max(1, min(self.fed.clients_per_round, n_rich))
        return max(self.fc.stage1_rounds, -(-n_rich // per_round))

    def num_rounds(self) -> int:
        return self._stage1_rounds() + self.fed.rounds

    def _sufficient(self) -> list[int]:
        table = self.mem.table  # each client's full MoE priced at its own batch (engine/budget.py)
        sufficient = [cid for cid in sorted(self.info) if table.budgets[cid] >= table.full_bytes(cid)]
        if not sufficient:
            short = max(self.info, key=lambda c: table.budgets[c] - table.full_bytes(c))
            raise ConfigError(
                "No client's memory budget holds the full MoE for stage 1 "
                f"(closest: client {short} needs {table.full_bytes(short) / 2**20:.1f} MiB, its budget is "
                f"{table.budgets[short] / 2**20:.1f} MiB).",
                "raise setting.budget_high above 1.0, or run the ablation with --set fedmoe.stage1=false.",
            )
        return sufficient

    def plan(self, run: Run, rnd: int) -> RoundPlan:
        r1 = self._stage1_rounds()
        if rnd < r1 or (not self.random_init and not self.reports):
            # stage 1: memory-rich clients fine-tune the full MoE with LoRA and report p
            sampled = self._stage1_sample(run, rnd)
            full = [list(range(n)) for n in self.mem.num_experts]
            return RoundPlan(rnd, 1, sampled, {cid: full for cid in sampled})
        if not self.state.expert_sets and not self.state.excluded:
            self._initial_sets()
        drawn = run.fed.sample_clients(rnd, self.round_rng(run, rnd))
        sampled = [c for c in drawn if c in self.state.expert_sets]
        skipped = {c: self.state.excluded[c] for c in drawn if c in self.state.excluded}
        return RoundPlan(rnd, 2, sampled, self.state.expert_sets, skipped)

    def _stage1_sample(self, run: Run, rnd: int) -> list[int]:
        """Memory-rich clients of a stage-1 round: unreported ones first (sampler's draw, then a
        seeded order), remaining places filled with reported ones (same order)."""
        rich = self._sufficient()
        per_round = min(self.fed.clients_per_round, len(rich))
        rng = self.round_rng(run, rnd)
        drawn = [c for c in run.fed.sample_clients(rnd, rng) if c in rich]
        rest = [int(c) for c in rng.permutation(rich) if c not in drawn]
        order = drawn + rest
        todo = [c for c in order if c not in self.reports] + [c for c in order if c in self.reports]
        return sorted(todo[:per_round])

    def _initial_sets(self) -> None:
        """Stage 1 steps 2–4: predict p for the others, θ search (or random sets)."""
        fc, table = self.fc, self.mem.table
        if self.random_init:
            p = {cid: np.zeros_like(table.expert_bytes) for cid in self.info}
            self.state = algo.initial_expert_sets(self.state, p, table, alpha=fc.alpha, tol=fc.theta_tol,
                                                  exclude_unfit=self.fed.exclude_unfit,
                                                  random_init=np.random.default_rng([self.seed, 7]))
        else:
            p = algo.predict_p(self.reports, self.info)
            self.state = algo.initial_expert_sets(self.state, p, table, alpha=fc.alpha, tol=fc.theta_tol,
                                                  exclude_unfit=self.fed.exclude_unfit, reported=self.reports.keys())
        self.start_counts = algo.expert_count_stats(self.state)

    def uses_checkpointing(self, run: Run, cid: int, stage: int) -> bool:
        """``"auto"``: stage-2 turns of clients whose initial search chose checkpointing (stage 1
        trains the full MoE on memory-rich clients, without it)."""
        if run.cfg.train.gradient_checkpointing == "auto":
            return stage == 2 and cid in self.state.checkpointing
        return super().uses_checkpointing(run, cid, stage)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reports": self.reports, "start_counts": self.start_counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.reports, self.start_counts = state["state"], state["reports"], state["start_counts"]

    def after_round(self, run: Run, plan: RoundPlan, replies) -> dict[str, Any]:
        if plan.stage == 1:
            for cid, rep in replies.items():
                self.reports[cid] = (self.info[cid][0], self.info[cid][1], rep.p)
            return {}
        fc = self.fc
        results = [algo.ClientResult(cid, self.info[cid][1], rep.score, rep.p) for cid, rep in replies.items()]
        self.state, events = algo.after_round(self.state, results, self.mem.table, patience=fc.patience,
                                              top_k=fc.top_k_similar, stage2_adjust=self.adjust)
        return {"actions": events, "theta": {c: self.state.theta[c] for c in plan.sampled if c in self.state.theta}}

    def final_sets(self, run: Run) -> dict[int, list[list[int]]]:
        if not self.random_init and not self.reports:
            raise RunStopped(
                "FedMoE's stage 1 never got a memory-rich client's p: every stage-1 turn failed.",
                f"see {run.out / 'rounds.jsonl'} and client_errors.log; fix the cause and continue with "
                f"`fedmoe run --resume {run.out}` (stage 1 is repeated).")
        return algo.final_expert_sets(self.state)

    def summary_extras(self) -> dict[str, Any]:
        return {
            "experts_start": self.start_counts or {},
            "excluded": {str(k): v for k, v in self.state.excluded.items()},
            "frozen": sorted(int(c) for c in self.state.frozen),
        }
