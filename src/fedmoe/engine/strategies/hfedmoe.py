"""HFedMoE on the engine: budget-aware expert selection + sparsity-aware aggregation (docs/algorithms.md §3).

The pure steps live in :mod:`fedmoe.algorithms.hfedmoe` (C_k, importance, IB score,
selection, τ-filtered expert aggregation, importance-weighted gate aggregation) and
:mod:`fedmoe.moe.graft` (the routing pass); this module runs them on the engine.

* **Budgets (§3.1).** C_k = :func:`~fedmoe.algorithms.hfedmoe.compute_budget` of the client's
  memory budget M_k over the run's additive training-memory table (the same table and M_k as
  every other algorithm), with safety factor ``hfedmoe.alpha``. A client that cannot train one
  expert per layer stops the run with a :class:`~fedmoe.errors.BudgetError`, or is left out
  when ``federation.exclude_unfit`` (recorded in ``skipped`` / the summary's ``excluded``).
* **Gradient checkpointing.** With ``train.gradient_checkpointing = "auto"`` C_k is computed
  under the plain and the checkpointed cost tables; a client trains with checkpointing when that
  gives it a larger C_k (or it fits only there), as FedMoE's θ search does for expert sets.
* **Rounds.** ``federation.rounds`` rounds recorded as stage 2 (as the baselines), sampled with
  ``run.fed.sample_clients`` and the per-round generator, so a resumed run replays exactly.
* **Selection pass (§3.2–3.4), per sampled client, before its turn** — a *configure* message
  exchange, run by :meth:`HFedMoEStrategy.plan` (the plan must name every client's expert set):
  the server sends the global trainable tensors of the *whole* MoE (real bytes, counted as the
  turn's ``bytes_down``; the full MoE's base weights go once, counted in ``bytes_down_base``);
  the client runs its train split (first ``hfedmoe.max_score_examples``; 0 = all) through the
  global model without gradients, accumulates one :class:`~fedmoe.algorithms.hfedmoe.RouterStats`
  per MoE layer (:func:`~fedmoe.moe.graft.collect_router_stats`) and sends the sums back (real
  float64 bytes, counted in ``bytes_up``); the server computes s, I and the active sets
  (:func:`~fedmoe.algorithms.hfedmoe.configure`, λ = ``hfedmoe.lam``, β = ``hfedmoe.beta``).
  **(choice)** The pass is inference on the full MoE; only training is bounded by C_k. The
  protocol has two messages per direction (configure, then fit), so the sub-MoE's trainable
  tensors sent for training are also part of what the configure message carried.
* **Training (§3.4).** The client trains the sub-MoE of its active set (engine default:
  :func:`~fedmoe.moe.slicing.extract`, i.e. :func:`~fedmoe.moe.graft.mask_routing`: top-k routing
  over the active experts, the others absent hence without gradient), with the run's
  :class:`~fedmoe.engine.trainables.Trainables` (LoRA by default).
* **Aggregation (§3.5–3.6).** :func:`~fedmoe.algorithms.hfedmoe.aggregate` with the usage and
  importance of the selection pass, τ = ``hfedmoe.tau`` (< 0: 1/(2·E_i) per layer).
* **Final evaluation (choice).** Every client re-runs the selection on the final global model
  and is evaluated on that active set (a client's set is a function of the model and its data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmoe.algorithms import hfedmoe as algo
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.data.settings import ClientData
from fedmoe.engine.client import ClientContext, ClientPlan, ClientReply
from fedmoe.engine.payload import from_bytes, to_bytes
from fedmoe.engine.strategies.base import RoundPlan, SetupInput, Strategy
from fedmoe.engine.trainables import Trainables
from fedmoe.errors import BudgetError, ConfigError
from fedmoe.moe.graft import collect_router_stats
from fedmoe.moe.slicing import extract
from fedmoe.train.batching import collate, model_inputs
from fedmoe.train.loop import forward_context

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run

#: stage number of the rounds in ``rounds.jsonl`` (federated training, as the baselines)
STAGE = 2
_STAT_FIELDS = ("sum_g", "max_g", "sum_xlogx", "counts")


# -- client side of the selection pass -----------------------------------------------------
def client_batches(ctx: ClientContext, client: ClientData, max_examples: int = 0) -> list[dict[str, Any]]:
    """Model-input batches (``eval_batch_size`` rows, on ``ctx.device``) of the client's first
    ``max_examples`` training examples (0 = all), in order."""
    examples = list(client.train)
    if max_examples:
        examples = examples[:max_examples]
    task, bs = ctx.tasks[client.task], ctx.cfg.train.eval_batch_size
    return [model_inputs(collate(ctx.kind, task, examples[i : i + bs], ctx.tokenizer, ctx.cfg.data.max_seq_len,
                                 ctx.cfg.data.max_target_len), ctx.kind, ctx.device)
            for i in range(0, len(examples), bs)]


def stats_to_tensors(stats: list[algo.RouterStats]) -> dict[str, torch.Tensor]:
    """The sums of one routing pass per MoE layer, as float64 tensors (what the client sends)."""
    out: dict[str, torch.Tensor] = {}
    for i, st in enumerate(stats):
        out[f"{i}.rows"] = torch.tensor([float(st.rows)], dtype=torch.float64)
        for name in _STAT_FIELDS:
            out[f"{i}.{name}"] = torch.from_numpy(np.asarray(getattr(st, name), dtype=np.float64).copy())
    return out


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> list[algo.RouterStats]:
    """Inverse of :func:`stats_to_tensors` (exact: float64 both ways)."""
    layers = sorted({int(k.split(".", 1)[0]) for k in tensors})
    stats = []
    for i in layers:
        st = algo.RouterStats(int(tensors[f"{i}.sum_g"].numel()))
        st.rows = int(tensors[f"{i}.rows"].item())
        for name in _STAT_FIELDS:
            setattr(st, name, tensors[f"{i}.{name}"].numpy().astype(np.float64))
        stats.append(st)
    return stats


def routing_pass(model: nn.Module, run: Run, client: ClientData, max_examples: int) -> list[algo.RouterStats]:
    """§3.2–3.4 inputs: the router statistics of ``model`` (wrapped, on ``run.device``) on the client's data."""
    inner = model.base_model.model if hasattr(model, "base_model") else model
    batches = client_batches(run.ctx, client, max_examples)
    with forward_context(run.device):
        return collect_router_stats(inner, run.family, batches)


# -- strategy ------------------------------------------------------------------------------
class HFedMoEStrategy(Strategy):
    """HFedMoE (Fang et al. 2026) on the in-process engine; see the module docstring."""

    config_section = "hfedmoe"

    def setup(self, inp: SetupInput) -> None:
        hc, self.fed = inp.section, inp.federation
        if not 0.0 <= hc.lam <= 1.0:
            raise ConfigError(f"hfedmoe.lam = {hc.lam} is out of range.", "use a value in [0, 1].")
        if hc.beta < 0:
            raise ConfigError(f"hfedmoe.beta = {hc.beta} is out of range.", "use a value >= 0.")
        if not 0.0 < hc.alpha <= 1.0:
            raise ConfigError(f"hfedmoe.alpha = {hc.alpha} is out of range.", "use a value in (0, 1].")
        if hc.max_score_examples < 0:
            raise ConfigError(f"hfedmoe.max_score_examples = {hc.max_score_examples} is negative.",
                              "use 0 (the whole train split) or a positive count.")
        self.lam, self.beta, self.max_score = hc.lam, hc.beta, hc.max_score_examples
        self.tau: float | None = None if hc.tau < 0 else hc.tau
        self.full = [list(range(n)) for n in inp.plan.num_experts]
        self.state = algo.HFedMoEServerState()
        self.excluded: dict[int, str] = {}
        table = inp.plan.table
        #: clients that train with gradient checkpointing ("auto": it raised their C_k)
        self.checkpointing: set[int] = set()
        auto = table.checkpointed is not None  # the plan has checkpointed costs only under "auto"
        options = [False, True] if auto else [False]
        for cid in sorted(inp.clients):
            c_k: dict[bool, int] = {}
            errors: list[BudgetError] = []
            for ck in options:
                dense, eb = table.costs(ck, cid)  # priced at the client's own batch
                try:
                    c_k[ck] = algo.compute_budget(table.budgets[cid], dense, eb, alpha=hc.alpha, client_id=cid)
                except BudgetError as err:
                    errors.append(err)
            if not c_k:
                if not self.fed.exclude_unfit:
                    raise errors[0]
                self.excluded[cid] = errors[0].what
                continue
            ck = c_k.get(True, 0) > c_k.get(False, 0)  # ties keep the faster, non-checkpointed training
            self.state.budgets[cid] = c_k[ck]
            if ck:
                self.checkpointing.add(cid)
        if len(self.excluded) == len(inp.clients):
            raise BudgetError("No client can train one expert per MoE layer under HFedMoE.",
                              "raise setting.budget_low or hfedmoe.alpha.")
        #: round → client → the expert sets it trained that round
        self.trained: dict[int, dict[int, list[list[int]]]] = {}
        #: client → (configure bytes down, up, base) of its current turn
        self.setup_bytes: dict[int, tuple[int, int, int]] = {}
        self.last_info: dict[str, Any] = {}
        self._final: tuple[int, dict[int, list[list[int]]]] | None = None

    def num_rounds(self) -> int:
        return self.fed.rounds

    def uses_checkpointing(self, run: Run, cid: int, stage: int) -> bool:
        """``"auto"``: the clients whose C_k is larger under the checkpointed costs (:meth:`setup`)."""
        if run.cfg.train.gradient_checkpointing == "auto":
            return cid in self.checkpointing
        return super().uses_checkpointing(run, cid, stage)

    # -- selection pass -------------------------------------------------------------------
    def _scorer(self, run: Run) -> tuple[nn.Module, Any]:
        """The full MoE wrapped like a client's model (the global tensors are loaded per client)."""
        sub = extract(run.base, self.full, run.family)
        return run.trainables.wrap(sub).to(run.device), sub.expert_map

    def _select(self, run: Run, cid: int, scorer: nn.Module, expert_map: Any) -> tuple[algo.HFedMoEServerState, int, int]:
        """One client's configure exchange: global tensors down, routing sums up, active set chosen."""
        client = run.clients[cid]
        down = to_bytes(run.trainables.for_client(scorer, expert_map, client.task))
        run.trainables.load(scorer, from_bytes(down))  # client side: the global model it received
        up = to_bytes(stats_to_tensors(routing_pass(scorer, run, client, self.max_score)))
        state = algo.configure(self.state, cid, stats_from_tensors(from_bytes(up)), lam=self.lam, beta=self.beta)
        return state, len(down), len(up)

    def plan(self, run: Run, rnd: int) -> RoundPlan:
        drawn = run.fed.sample_clients(rnd, self.round_rng(run, rnd))
        sampled = [c for c in drawn if c not in self.excluded]
        skipped = {c: self.excluded[c] for c in drawn if c in self.excluded}
        self.setup_bytes = {}
        if sampled:
            scorer, expert_map = self._scorer(run)
            for cid in sampled:
                self.state, down, up = self._select(run, cid, scorer, expert_map)
                self.setup_bytes[cid] = (down, up, run._base_bytes(cid, self.full))
        sets = {c: [list(ids) for ids in self.state.active_sets[c]] for c in sampled}
        self.trained[rnd] = sets
        return RoundPlan(rnd, STAGE, sampled, sets, skipped)

    def client_plan(self, run: Run, cid: int, kept: list[list[int]]) -> ClientPlan | None:
        down, up, base = self.setup_bytes.get(cid, (0, 0, 0))
        return ClientPlan(setup_down_bytes=down, setup_up_bytes=up, setup_base_bytes=base)

    # -- aggregation ----------------------------------------------------------------------
    def aggregate(self, current: Trainables, plan: RoundPlan, updates: list[ClientUpdate],
                  replies: dict[int, ClientReply]) -> dict[str, torch.Tensor]:
        self.state, state, self.last_info = algo.aggregate(self.state, current.state, current.layout, updates,
                                                           tau=self.tau)
        return state

    def after_round(self, run: Run, plan: RoundPlan, replies: dict[int, ClientReply]) -> dict[str, Any]:
        actions: list[dict[str, Any]] = [
            {"kind": "select", "client_id": c, "C_k": self.state.budgets[c], "experts": plan.sets[c]}
            for c in plan.sampled
        ]
        if self.last_info:
            actions.append({"kind": "aggregate", "gate_weights": self.last_info.get("gate_weights", {}),
                            "experts_updated": len(self.last_info.get("expert_contributors", {}))})
        self.last_info = {}
        return {"actions": actions}

    # -- outputs --------------------------------------------------------------------------
    def final_sets(self, run: Run) -> dict[int, list[list[int]]]:
        """Every (non-excluded) client's active set under the current global model (cached per round count)."""
        if self._final is not None and self._final[0] == len(run.rounds):
            return dict(self._final[1])
        scorer, expert_map = self._scorer(run)
        state = self.state
        for cid in sorted(c for c in run.clients if c not in self.excluded):
            run.trainables.load(scorer, run.trainables.for_client(scorer, expert_map, run.clients[cid].task))
            state = algo.configure(state, cid, routing_pass(scorer, run, run.clients[cid], self.max_score),
                                   lam=self.lam, beta=self.beta)
        sets = {cid: [list(ids) for ids in state.active_sets[cid]]
                for cid in sorted(c for c in run.clients if c not in self.excluded)}
        self._final = (len(run.rounds), sets)
        return dict(sets)

    def summary_extras(self) -> dict[str, Any]:
        first: dict[int, int] = {}
        for rnd in sorted(self.trained):
            for cid, sets in self.trained[rnd].items():
                first.setdefault(cid, sum(len(s) for s in sets))
        counts = list(first.values())
        start = ({"mean": float(np.mean(counts)), "min": float(min(counts)), "max": float(max(counts))}
                 if counts else {})
        return {"experts_start": start, "excluded": {str(k): v for k, v in self.excluded.items()},
                "hfedmoe_budgets": {str(k): v for k, v in sorted(self.state.budgets.items())}}

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.trained = state["state"], state["trained"]
