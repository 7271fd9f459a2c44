"""Dense-sharing baselines on the engine: FedAvg, FedProx, SCAFFOLD (docs/algorithms.md §2).

Every client trains the same global model with all of its experts; the server averages
everything (FedAvg, :mod:`fedmoe.algorithms.fedavg`), FedProx adds the proximal term to the
local loss (:mod:`fedmoe.algorithms.fedprox`), SCAFFOLD corrects local gradients with control
variates that travel both ways (:mod:`fedmoe.algorithms.scaffold`).

* **Global model.** ``baseline.num_experts`` = n > 0: the baselines' global MoE keeps the
  first n experts of every MoE layer (built once in :meth:`BaselineStrategy.setup` with
  :func:`fedmoe.moe.slicing.extract`; the paper runs FedProx/SCAFFOLD on an 8-expert MoE that
  fits every client while FedMoE/randomMoE use the 32-expert one). n = 0: the run's model
  itself. n = −1 (default): the largest n whose model fits every client's budget. Memory
  uses the run's additive table (:class:`fedmoe.engine.budget.MemoryPlan`) restricted to the
  kept experts, so a given sub-MoE costs the same bytes under every algorithm, and the
  clients keep their budgets ``M_k``; each client is priced at its own largest batch
  (:func:`fedmoe.engine.budget.client_batch_shape`).
* **Budgets.** A client whose budget cannot hold the model (``submodel_bytes(all experts) >
  M_k``) stops the run with a :class:`~fedmoe.errors.BudgetError` naming the client, the
  bytes needed and its budget — unless ``federation.exclude_unfit``: then it never takes part
  (recorded in the rounds' ``skipped`` and the summary's ``excluded``).
* **Rounds.** ``federation.rounds`` rounds (the same R as FedMoE's stage 2, so comparisons use
  the same number of federated rounds), numbered 0…R−1 and recorded as stage 2; round r
  samples ``run.fed.sample_clients(r, rng_r)`` with the per-round generator
  :meth:`~fedmoe.engine.strategies.base.Strategy.round_rng` (so a resumed run replays
  exactly); drawn clients that are excluded are skipped.
* **What travels** (docs/algorithms.md §1.3): the trainable tensors (LoRA adapters, router rows,
  heads) down and up every round, base weights once; SCAFFOLD adds ``c`` down and ``Δc_k`` up
  as :class:`~fedmoe.engine.client.ClientPlan` extras, both counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedmoe.algorithms import fedavg, scaffold
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.engine.budget import MemoryPlan
from fedmoe.engine.client import ClientPlan, ClientReply
from fedmoe.engine.node_plans import SlotStore
from fedmoe.engine.payload import from_bytes
from fedmoe.engine.strategies.base import NewGlobal, RoundPlan, SetupInput, Strategy
from fedmoe.engine.trainables import HEAD_TASKS, Trainables
from fedmoe.errors import BudgetError, ConfigError
from fedmoe.moe.slicing import extract

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run

#: stage number of the baselines' rounds in ``rounds.jsonl`` (federated training, like FedMoE's stage 2)
STAGE = 2


def resolve_num_experts(plan: MemoryPlan, requested: int, extra_bytes: float = 0.0, key: str = "baseline.num_experts") -> list[int]:
    """Experts per layer of the baselines' global model for ``baseline.num_experts = requested``.

    ``0`` → the model's own counts; ``n > 0`` → ``min(n, E_i)`` per layer; ``−1`` → the largest
    n (≥ 1) such that ``dense_k + Σ_i Σ_{j < min(n, E_i)} mem_k(i, j) + extra_bytes ≤ M_k`` for every
    client k (each priced at its own batch; ``extra_bytes``: what a turn trains beyond the model,
    FLEx's side experts), or 1 if none fits (the fit check then fails loudly or excludes).
    """
    counts = list(plan.num_experts)
    if requested == 0:
        return counts
    if requested > 0:
        return [min(requested, e) for e in counts]
    if requested != -1:
        raise ConfigError(f"{key} = {requested} is invalid.",
                          "use n > 0 experts per layer, 0 for the run's model, or -1 for the largest that fits.")
    for n in range(max(counts), 0, -1):
        kept = [list(range(min(n, e))) for e in counts]
        if all(plan.submodel_bytes(kept, client=cid) + extra_bytes <= m for cid, m in plan.table.budgets.items()):
            return [min(n, e) for e in counts]
    return [1] * len(counts)


def unfit_clients(name: str, plan: MemoryPlan, counts: list[int], clients: list[int], exclude: bool,
                  extra_bytes: float = 0.0, key: str = "baseline.num_experts") -> dict[int, str]:
    """Clients whose budget cannot hold the global model of ``counts`` experts per layer (plus
    ``extra_bytes``), each with its reason; raises :class:`~fedmoe.errors.BudgetError` for the first
    unless ``exclude`` (``federation.exclude_unfit``), and when no client is left."""
    sets = [list(range(n)) for n in counts]
    needs = {cid: plan.submodel_bytes(sets, client=cid) + extra_bytes for cid in clients}
    unfit = [(cid, plan.table.budgets[cid]) for cid in clients if needs[cid] > plan.table.budgets[cid]]
    excluded: dict[int, str] = {}
    for cid, budget in unfit:
        msg = (f"Client {cid} cannot hold the {name} global model ({sum(counts)} experts, "
               f"{counts} per layer): it needs {needs[cid]:.0f} training bytes, its budget is {budget:.0f} bytes.")
        if not exclude:
            others = f" ({len(unfit) - 1} more clients do not fit either)" if len(unfit) > 1 else ""
            raise BudgetError(msg + others, f"set {key} to fewer experts per layer (-1 = the largest that fits "
                              "every client), raise setting.budget_low, or set federation.exclude_unfit=true to "
                              "leave such clients out.")
        excluded[cid] = msg
    if len(excluded) == len(clients):
        raise BudgetError(f"No client can hold the {name} global model ({min(needs.values()):.0f} "
                          "training bytes or more).", f"set {key} to fewer experts per layer, or raise the budgets.")
    return excluded


def restricted_plan(plan: MemoryPlan, counts: list[int]) -> MemoryPlan:
    """``plan`` for the model keeping the first ``counts[i]`` experts of each layer: its table restricted
    (every client's own costs too, budgets unchanged) and its top-k clip kept, so a sub-MoE of that
    model costs what it costs under ``plan``."""
    table = plan.table.restrict(counts)
    return MemoryPlan(table, table.full_bytes(), list(counts), plan.clip, dict(plan.clips))


def global_model(inp: SetupInput, model: nn.Module, counts: list[int]) -> NewGlobal:
    """``model`` (the first ``counts[i]`` experts of each layer of the loaded model) as the
    run's new global model, for the engine to install (:meth:`fedmoe.engine.run.Run.install`).

    Its ``trainables``: fresh LoRA state with the run's seed, as the engine makes it for the
    loaded model; its ``plan``: the run's memory table restricted to the kept experts, with
    the clients' budgets unchanged.
    """
    for p in model.parameters():  # frozen before the adapters are made, as the engine does
        p.requires_grad_(False)
    trainables = Trainables.create(model, inp.family, inp.finetune, inp.lora, inp.seed)
    return NewGlobal(trainables, model, restricted_plan(inp.plan, counts))


def client_keys(state: dict[str, torch.Tensor], task: str) -> list[str]:
    """The trainable keys a client of ``task`` receives and sends: all but other tasks' heads
    (:meth:`fedmoe.engine.trainables.Trainables.for_client` / ``upload_state``)."""
    return [k for k in state if not any(f"{t}_head." in k for t in HEAD_TASKS if t != task)]


class BaselineStrategy(Strategy):
    """FedAvg: every client trains the whole global model; the server averages everything."""

    config_section = "baseline"

    def setup(self, inp: SetupInput) -> NewGlobal | None:
        self.section, self.fed = inp.section, inp.federation
        counts = resolve_num_experts(inp.plan, inp.section.num_experts)
        new, plan = None, inp.plan
        if counts != list(inp.plan.num_experts):
            sub = extract(inp.model, [list(range(n)) for n in counts], inp.family)
            new = global_model(inp, sub.model, counts)
            plan = new.plan
        self.num_experts = counts
        self.full_sets = [list(range(n)) for n in counts]
        self.excluded = unfit_clients(self.name, plan, counts, sorted(inp.clients), self.fed.exclude_unfit)
        self.members = [cid for cid in sorted(inp.clients) if cid not in self.excluded]
        self.tasks = {cid: c.task for cid, c in inp.clients.items()}
        return new

    # -- rounds ------------------------------------------------------------------------
    def num_rounds(self) -> int:
        return self.fed.rounds

    def plan(self, run: Run, rnd: int) -> RoundPlan:
        drawn = run.fed.sample_clients(rnd, self.round_rng(run, rnd))
        sampled = [c for c in drawn if c not in self.excluded]
        skipped = {c: self.excluded[c] for c in drawn if c in self.excluded}
        return RoundPlan(rnd, STAGE, sampled, {c: self.full_sets for c in sampled}, skipped)

    # -- aggregation -------------------------------------------------------------------
    def _uploads(self, updates: list[ClientUpdate], replies: dict[int, ClientReply]) -> list[fedavg.ClientWeights]:
        return [fedavg.ClientWeights(u.client_id, u.num_examples, from_bytes(replies[u.client_id].upload))
                for u in updates]

    def aggregate(self, current: Trainables, plan: RoundPlan, updates: list[ClientUpdate],
                  replies: dict[int, ClientReply]) -> dict[str, torch.Tensor]:
        return fedavg.average(current.state, self._uploads(updates, replies))

    def final_sets(self, run: Run) -> dict[int, list[list[int]]]:
        return {cid: self.full_sets for cid in self.members}

    def summary_extras(self) -> dict[str, Any]:
        n = sum(self.num_experts)
        return {
            "experts_start": {"mean": float(n), "min": float(n), "max": float(n)},
            "excluded": {str(k): v for k, v in self.excluded.items()},
            "baseline_num_experts": list(self.num_experts),
        }


class FedAvgStrategy(BaselineStrategy):
    """FedAvg (McMahan et al. 2017)."""


class FedProxStrategy(BaselineStrategy):
    """FedProx (Li et al. 2020): FedAvg + ``(μ/2)‖w − w_global‖²`` in the local loss, μ = ``baseline.fedprox_mu``."""

    def client_plan(self, run: Run, cid: int, kept: list[list[int]]) -> ClientPlan:
        """The proximal term is built on the client (node plan ``fedprox``) over the tensors it
        received — :func:`client_keys` of the global state — so it runs on Flower nodes too."""
        return ClientPlan(node_plan="fedprox")


class ScaffoldStrategy(BaselineStrategy):
    """SCAFFOLD (Karimireddy et al. 2020): control variates over the trainable tensors.

    Server state: ``c`` (and N per key, the number of clients holding that tensor). Client
    state: ``c_k`` lives on the client — in this in-process simulation it is kept in
    :attr:`client_variates`, written only by the client's own turn (node plan ``scaffold``,
    :mod:`fedmoe.engine.node_plans`) and read only when building that client's hooks; it never
    crosses the wire. On a Flower node it lives in the node's state directory.
    Down: ``w`` and ``c``; up: ``w_k`` and ``Δc_k``; both counted.
    """

    def setup(self, inp: SetupInput) -> NewGlobal | None:
        new = super().setup(inp)
        state = (new.trainables if new is not None else inp.trainables).state  # the global trainables
        holders: dict[str, int] = {}
        for cid in self.members:
            for k in client_keys(state, self.tasks[cid]):
                holders[k] = holders.get(k, 0) + 1
        template = {k: v for k, v in state.items() if k in holders}
        self.server = scaffold.init_server_state(template, holders)
        self.client_variates: dict[int, dict[str, torch.Tensor]] = {}  #: client-held c_k
        return new

    def client_plan(self, run: Run, cid: int, kept: list[list[int]]) -> ClientPlan:
        """``c`` goes down; the client's code is the node plan ``scaffold``, with ``c_k`` in
        :attr:`client_variates` (in-process; on a Flower node, in the node's store)."""
        down = {k: self.server.c[k] for k in client_keys(run.trainables.state, self.tasks[cid]) if k in self.server.c}
        return ClientPlan(extra_down=down, node_plan="scaffold", store=SlotStore(self.client_variates, cid))

    def aggregate(self, current: Trainables, plan: RoundPlan, updates: list[ClientUpdate],
                  replies: dict[int, ClientReply]) -> dict[str, torch.Tensor]:
        uploads = [scaffold.ScaffoldUpload(u.client_id, u.num_examples, u.weights, dict(replies[u.client_id].extra or {}))
                   for u in self._uploads(updates, replies)]
        state, self.server = scaffold.server_update(current.state, self.server, uploads,
                                                    server_lr=self.section.scaffold_server_lr)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server, "client_variates": self.client_variates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server, self.client_variates = state["server"], state["client_variates"]
