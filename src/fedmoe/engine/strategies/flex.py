"""FLEx on the engine: one personalised side expert per client and MoE layer (docs/algorithms.md §4).

The pure steps live in :mod:`fedmoe.algorithms.flex` (shared/personal split, FedAvg of the
shared tensors, server bookkeeping) and :mod:`fedmoe.moe.graft` (choosing e*, grafting).

* **What trains and travels.** Every client holds the pretrained MoE, frozen (experts and routers
  included): the whole MoE with ``flex.num_experts = 0`` (default, as published; budgets are not
  enforced), or, with ``-1``, the largest smaller MoE whose price plus the side experts fits every
  client's budget (the first n experts of every layer, as the baselines'; a client that fits none
  stops the run or, with ``federation.exclude_unfit``, is left out); LoRA adapters on attention only (plus task heads, if the family has
  them) are the *shared* tensors: they go down and up every round and are FedAvg'd with the
  |D_c| weights (:func:`fedmoe.algorithms.flex.aggregate`). The grafted side experts and side
  gates are *personal*: trained in full, never sent; the server's global trainable state holds
  no side tensor. The full MoE's base weights cross the wire once (counted in
  ``bytes_down_base``), as for every algorithm.
* **First participation (§4.1–4.2).** With the global shared tensors loaded, the client picks
  e* per MoE layer on its train split (first ``flex.max_choice_examples``; 0 = all) with
  :func:`~fedmoe.moe.graft.choose_personal_experts`, grafts copies of them with
  :func:`~fedmoe.moe.graft.graft_side_experts` (gate bias ``flex.gate_bias``), and sends e* up
  once (an ``int64`` tensor, counted in that turn's ``bytes_up``) for the server's bookkeeping
  (:func:`~fedmoe.algorithms.flex.record_choice`).
* **Personal state (§4.3)** lives on the client: ``<out>/clients/<cid>/side-r<round>.safetensors``
  in-process, ``<node state dir>/run-<run id>/client-<cid>/side-r<round>.safetensors`` on a
  Flower node (client kind ``flex``; docs/deploy.md)
  (side tensors; e* and the round in the metadata), written at the end of each turn and restored
  at the start of the next one — a turn in round r restores the newest file of a round < r, so a
  run resumed from a checkpoint replays exactly; after saving, files older than the restored one
  (and stale ones from rounds ≥ r of an interrupted run) are removed. With
  ``engine.checkpoint_every`` > 1 a client taking part twice between checkpoints can lose the
  file a replay would need (it then restores an older one).
* **Rounds.** ``federation.rounds`` rounds recorded as stage 2, sampled like the baselines (clients
  left out as unfit are skipped). Each client's ``predicted_memory_bytes`` is the held MoE's price
  plus its side experts' weights, gradients and optimiser state
  (:meth:`FlexStrategy.extra_training_bytes`), reported against its budget; with
  ``flex.num_experts = 0`` nothing keeps it below the budget (the paper's FLEx has none).
* **Final evaluation.** Each client on the MoE it holds with the final shared tensors and its own
  side experts (a client that never took part chooses e* then and uses the untrained copies);
  on Flower the nodes run it (only they hold the side experts) and send the scores back.
* ``train.finetune`` must be ``lora``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fedmoe.algorithms import flex as algo
from fedmoe.core.aggregation import ClientUpdate
from fedmoe.core.layout import UnitLayout
from fedmoe.data.settings import ClientData
from fedmoe.engine.budget import RUNTIME_SLACK
from fedmoe.engine.client import ClientContext, ClientPlan, ClientReply
from fedmoe.engine.node_plans import ExtraUp, NodeTurn, register_client_kind, register_node_plan
from fedmoe.engine.strategies.base import NewGlobal, RoundPlan, SetupInput, Strategy
from fedmoe.engine.strategies.baselines import resolve_num_experts, restricted_plan, unfit_clients
from fedmoe.engine.strategies.hfedmoe import client_batches
from fedmoe.engine.trainables import HEAD_TASKS, Trainables, _other_heads
from fedmoe.errors import ConfigError, DataNotice
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.graft import choose_personal_experts, graft_side_experts, mark_side_trainable, side_parameters
from fedmoe.moe.lora import HEAD_PATTERNS, LoraSpec, load_trainable_state, trainable_state
from fedmoe.moe.memory import side_expert_training_bytes
from fedmoe.moe.slicing import ExpertMap, SubMoE, extract
from fedmoe.train.loop import LocalHooks, forward_context

if TYPE_CHECKING:
    from fedmoe.engine.protocols import RunView as Run

#: stage number of the rounds in ``rounds.jsonl`` (federated training, as the baselines)
STAGE = 2
#: key of the e* tensor a client sends on its first participation
CHOICE_KEY = "flex.personal_experts"
#: node plan that sends e* (first participation) and the client kind nodes build
CHOICE_PLAN = "flex-choice"
CLIENT_KIND = "flex"
_PEFT_PREFIX = "base_model.model."


def attention_lora(model: nn.Module, lora: LoraSpec, family: MoEFamily) -> nn.Module:
    """LoRA on the attention projections only; task heads trainable; everything else (experts, routers) frozen."""
    attn = "|".join(re.escape(n) for n in family.attention_modules)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=rf".*\.({attn})$", bias="none")
    routers = {id(p) for b in family.blocks(model) for p in family.router(model.get_submodule(b.path)).parameters()}
    pm = get_peft_model(model, cfg)
    for name, p in pm.base_model.model.named_parameters():  # Switch's router is `router.classifier`: not a head
        if id(p) not in routers and any(f"{h}." in name or name.startswith(h) for h in HEAD_PATTERNS):
            p.requires_grad_(True)
    return pm


def _inner(model: nn.Module) -> nn.Module:
    return model.base_model.model if hasattr(model, "base_model") else model


class FlexTrainables(Trainables):
    """Server view: the global state is the shared tensors only (attention LoRA + heads), all dense."""

    @classmethod
    def create_shared(cls, base: nn.Module, family: MoEFamily, lora: LoraSpec, seed: int) -> FlexTrainables:
        torch.manual_seed(seed)
        pm = attention_lora(copy.deepcopy(base), lora, family)
        state = {k: v.clone() for k, v in trainable_state(pm).items()}
        if any(algo.is_personal(k) for k in state):
            raise ConfigError("The model already has side-expert tensors.", "start FLEx from a pretrained MoE.")
        return cls(family, "lora", lora, state, UnitLayout(dense_keys=list(state)))

    def wrap(self, sub: SubMoE) -> nn.Module:
        return attention_lora(sub.model, self.lora, self.family)

    def client_layout(self, model: nn.Module, expert_map: ExpertMap) -> UnitLayout:
        return UnitLayout(dense_keys=[k for k in trainable_state(model) if not algo.is_personal(k)])

    def upload_state(self, model: nn.Module, task: str) -> dict[str, torch.Tensor]:
        shared, _ = algo.split_state(trainable_state(model))
        return {k: v for k, v in shared.items() if not _other_heads(k, task)}


class FlexClientTrainables(FlexTrainables):
    """One client's view: grafts its side experts when loading, keeps them on its own disk."""

    def bind(self, ctx: ClientContext, client: ClientData, folder: Path, rnd: int | None, gate_bias: float,
             max_examples: int) -> FlexClientTrainables:
        self.ctx, self.client, self.folder, self.rnd = ctx, client, folder, rnd
        self.gate_bias, self.max_examples = gate_bias, max_examples
        self.restored: int | None = None  #: round of the personal file restored this turn
        return self

    # -- personal files --------------------------------------------------------------------
    def _files(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        return sorted((int(p.stem.split("-r", 1)[1]), p) for p in self.folder.glob("side-r*.safetensors"))

    def saved(self) -> tuple[int, list[int], dict[str, torch.Tensor]] | None:
        """``(round, e*, side tensors)`` of the newest personal file before this turn's round, if any."""
        files = [(r, p) for r, p in self._files() if self.rnd is None or r < self.rnd]
        if not files:
            return None
        r, path = files[-1]
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return r, [int(e) for e in json.loads(meta["personal_experts"])], tensors

    def _save(self, chosen: list[int], personal: dict[str, torch.Tensor]) -> None:
        rnd = -1 if self.rnd is None else self.rnd
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"side-r{rnd:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in personal.items()}, str(tmp),
                  metadata={"personal_experts": json.dumps(chosen), "round": str(rnd), "client_id": str(self.client.client_id)})
        os.replace(tmp, path)
        for r, p in self._files():  # the restored file is the only older one a replay of this round needs
            if r not in (rnd, self.restored):
                p.unlink(missing_ok=True)

    # -- client side -----------------------------------------------------------------------
    def load(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Shared tensors from the server, then e* + side experts (restored, or chosen and grafted now)."""
        if side_parameters(model):
            raise ConfigError("FLEx: the model is already grafted.", "load into a freshly wrapped model.")
        load_trainable_state(model, state, allow_missing=tuple(f"{t}_head." for t in HEAD_TASKS))
        inner = _inner(model)
        saved = self.saved()
        if saved is None:
            with forward_context(self.ctx.device):
                chosen = choose_personal_experts(inner, self.family, client_batches(self.ctx, self.client,
                                                                                    self.max_examples))
        else:
            self.restored, chosen, personal = saved
        graft_side_experts(inner, self.family, chosen, gate_bias=self.gate_bias, freeze_block=True)
        mark_side_trainable(model)
        if saved is not None:
            params = {(n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n): p
                      for n, p in side_parameters(model).items()}
            if set(params) != set(personal):
                raise ConfigError(f"FLEx: client {self.client.client_id}'s personal file does not match its model.",
                                  f"delete {self.folder} to start its side experts afresh.")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(personal[k])
        self.chosen = list(chosen)

    def keep_personal(self, model: nn.Module) -> None:
        """Write e* and the trained side experts / gates to the client's folder."""
        _, personal = algo.split_state(trainable_state(model))
        self._save(self.chosen, personal)


def chosen_experts(model: nn.Module, family: MoEFamily) -> list[int]:
    """e* per MoE layer of a grafted (wrapped) model."""
    inner = _inner(model)
    return [int(inner.get_submodule(b.path).side_expert.source_expert) for b in family.blocks(inner)]


@register_node_plan(CHOICE_PLAN)
def choice_plan(turn: NodeTurn) -> tuple[LocalHooks, ExtraUp | None]:
    """Send e* up after the first turn (an ``int64`` tensor under :data:`CHOICE_KEY`)."""

    def extra_up(model: nn.Module, extra_down: dict[str, torch.Tensor], res: Any) -> dict[str, torch.Tensor]:
        return {CHOICE_KEY: torch.tensor(chosen_experts(model, turn.family), dtype=torch.int64)}

    return LocalHooks(), extra_up


@register_client_kind(CLIENT_KIND)
def node_trainables(ctx: ClientContext, client: ClientData, folder: Path, rnd: int | None) -> Trainables:
    """A node's FLEx client: attention LoRA + its side experts kept in ``folder`` (the node's
    state folder of this client). The global state is not needed on a client: the shared
    tensors arrive with each request."""
    t, f = ctx.cfg.train, ctx.cfg.flex
    tr = FlexClientTrainables(ctx.family, "lora", LoraSpec.of(t), {}, UnitLayout())
    return tr.bind(ctx, client, folder, rnd, f.gate_bias, f.max_choice_examples)


class FlexStrategy(Strategy):
    """FLEx (2025) on the in-process engine; see the module docstring."""

    client_kind = CLIENT_KIND
    config_section = "flex"

    def setup(self, inp: SetupInput) -> NewGlobal:
        if inp.finetune != "lora":
            raise ConfigError(f"FLEx trains attention LoRA + side experts; train.finetune = {inp.finetune!r}.",
                              "set train.finetune=lora.")
        if inp.section.max_choice_examples < 0:
            raise ConfigError(f"flex.max_choice_examples = {inp.section.max_choice_examples} is negative.",
                              "use 0 (the whole train split) or a positive count.")
        # the side experts' weights, gradients and optimiser state (their activations offset the frozen
        # experts' smaller ones: docs/memory.md "FLEx"), with the runtime slack every price carries
        self.side_bytes = RUNTIME_SLACK * float(side_expert_training_bytes(inp.model, inp.family).sum())
        counts = resolve_num_experts(inp.plan, inp.section.num_experts, self.side_bytes, key="flex.num_experts")
        model, plan = inp.model, inp.plan
        if counts != list(plan.num_experts):  # a smaller MoE every client fits, as the baselines hold
            model = extract(inp.model, [list(range(n)) for n in counts], inp.family).model
            for p in model.parameters():
                p.requires_grad_(False)
            plan = restricted_plan(plan, counts)
        self.excluded: dict[int, str] = {}
        if inp.section.num_experts:
            self.excluded = unfit_clients(self.name, plan, counts, sorted(inp.clients), inp.federation.exclude_unfit,
                                          self.side_bytes, key="flex.num_experts")
        else:
            price = {c: plan.table.full_bytes(c) + self.side_bytes for c in inp.clients}
            short = sorted(c for c in inp.clients if plan.table.budgets[c] < price[c])
            if short:  # said up front, not only counted in over_budget_turns afterwards
                warnings.warn(DataNotice(
                    f"FLEx does not enforce memory budgets with flex.num_experts = 0 (docs/algorithms.md §4.4): each "
                    f"client holds the whole MoE and trains a side expert per layer, priced "
                    f"{min(price[c] for c in short) / 2**20:.1f} MiB or more, above the budgets of {len(short)} of "
                    f"{len(inp.clients)} clients ({', '.join(map(str, short))}); their turns may measure above them "
                    "(over_budget in rounds.jsonl). flex.num_experts = -1 keeps them."), stacklevel=2)
        trainables = FlexTrainables.create_shared(model, inp.family, inp.lora, inp.seed)
        self.state = algo.init_state(trainables.state)
        self.full = [list(range(n)) for n in counts]
        self.rounds = inp.federation.rounds
        if model is inp.model:
            return NewGlobal(trainables)
        return NewGlobal(trainables, model, plan)

    def num_rounds(self) -> int:
        return self.rounds

    def plan(self, run: Run, rnd: int) -> RoundPlan:
        drawn = run.fed.sample_clients(rnd, self.round_rng(run, rnd))
        sampled = [c for c in drawn if c not in self.excluded]
        skipped = {c: self.excluded[c] for c in drawn if c in self.excluded}
        return RoundPlan(rnd, STAGE, sampled, {c: self.full for c in sampled}, skipped)

    def client_folder(self, run: Run, cid: int) -> Path:
        return run.out / "clients" / f"{cid}"

    def client_trainables(self, run: Run, cid: int, rnd: int | None) -> Trainables:
        g = run.trainables
        tr = FlexClientTrainables(g.family, g.finetune, g.lora, g.state, g.layout)
        return tr.bind(run.ctx, run.clients[cid], self.client_folder(run, cid), rnd, run.cfg.flex.gate_bias,
                       run.cfg.flex.max_choice_examples)

    def extra_training_bytes(self, cid: int) -> float:
        """The side experts (and gates) a FLEx turn trains in full, beyond the frozen MoE's price."""
        return self.side_bytes

    def client_plan(self, run: Run, cid: int, kept: list[list[int]]) -> ClientPlan | None:
        """First participation: the client reports e* (node plan ``flex-choice``)."""
        return None if cid in self.state.personal_experts else ClientPlan(node_plan=CHOICE_PLAN)

    def aggregate(self, current: Trainables, plan: RoundPlan, updates: list[ClientUpdate],
                  replies: dict[int, ClientReply]) -> dict[str, torch.Tensor]:
        state = self.state
        for u in updates:
            extra = replies[u.client_id].extra or {}
            if CHOICE_KEY in extra:
                state = algo.record_choice(state, u.client_id, [int(e) for e in extra[CHOICE_KEY].tolist()])
        self.state = algo.aggregate(state, updates)
        return dict(self.state.shared)

    def final_sets(self, run: Run) -> dict[int, list[list[int]]]:
        return {cid: self.full for cid in sorted(run.clients) if cid not in self.excluded}

    def summary_extras(self) -> dict[str, Any]:
        n = float(sum(len(s) for s in self.full))
        return {"experts_start": {"mean": n, "min": n, "max": n}, "flex_num_experts": [len(s) for s in self.full],
                "excluded": {str(k): v for k, v in self.excluded.items()},
                "flex_personal_experts": {str(k): v for k, v in sorted(self.state.personal_experts.items())}}

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state["state"]
