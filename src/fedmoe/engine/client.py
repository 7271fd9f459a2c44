"""One client's turn in a round: receive bytes, train, validate, send bytes back.

Everything the client gets and returns crosses as serialised safetensors bytes; the
in-process engine builds the client's base sub-MoE by extraction (bit-identical to what
it would deserialise from the one-time base payload, whose bytes are counted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmoe.data.settings import ClientData
from fedmoe.engine.faults import Deadline, InjectedFault, corrupt_fields, corrupt_upload
from fedmoe.engine.node_plans import ClientStore, NodeTurn, SlotStore, build_node_plan
from fedmoe.engine.payload import from_bytes, from_wire, to_bytes, to_wire
from fedmoe.engine.protocols import ClientContext
from fedmoe.engine.trainables import Trainables
from fedmoe.moe.memory import rehearse_once, tensor_bytes
from fedmoe.moe.routing import RoutingStats
from fedmoe.moe.slicing import ExpertMap, SubMoE
from fedmoe.train.evaluate import evaluate, evaluate_with_predictions
from fedmoe.train.loop import LocalHooks, LocalResult, local_train


@dataclass
class ClientPlan:
    """Algorithm-specific extras for one client's turn.

    ``extra_down``: tensors sent besides the trainable state (e.g. SCAFFOLD's variates);
    ``node_plan``: name of the algorithm's client code (:mod:`fedmoe.engine.node_plans`), built
    on the client from local state and ``store`` — the form that also runs on a Flower node;
    ``hooks(extra_down)``: local-loop hooks; ``extra_up(model, extra_down, result)``:
    tensors sent back besides the trainable state (closures: in-process only). All extras
    cross as bytes and count.
    ``setup_down_bytes`` / ``setup_up_bytes`` / ``setup_base_bytes``: sizes of messages the
    strategy already exchanged with this client for this turn before it (e.g. HFedMoE's
    expert-selection pass), serialised and measured by the strategy; added to the turn's record.
    """

    extra_down: dict[str, torch.Tensor] | None = None
    hooks: Any = None
    extra_up: Any = None
    node_plan: str = ""
    #: the client's own store for ``node_plan`` (local; never sent)
    store: ClientStore | None = None
    setup_down_bytes: int = 0
    setup_up_bytes: int = 0
    setup_base_bytes: int = 0


@dataclass
class ClientReply:
    upload: bytes
    loss: float
    score: float
    p: np.ndarray  #: [L, E_global], 0 for experts not held
    steps: int
    peak_memory_bytes: int
    extra: dict[str, torch.Tensor] | None = None
    extra_down_bytes: int = 0
    extra_up_bytes: int = 0


def global_p(stats: RoutingStats, expert_map: ExpertMap) -> np.ndarray:
    local = stats.p()
    out = np.zeros((len(expert_map.kept), max(expert_map.global_num_experts)), dtype=np.float64)
    for i, ids in enumerate(expert_map.kept):
        out[i, ids] = local[i, : len(ids)]
    return out


def _eos_id(tok: Any) -> int:
    """The end-of-sequence id generation stops at (as :func:`fedmoe.train.evaluate.evaluate` uses)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return tok.eos_token_id if tok.eos_token_id is not None else pad


def main_metric(task: Any, scores: dict[str, float]) -> float:
    return float(scores.get(task.metric, 0.0))


_WARM: set[str] = set()


def warm_metric(task: Any, client: ClientData) -> None:
    """Score one reference against itself, once per task and process, before a turn is measured:
    a metric's one-time set-up (NLTK's Porter stemmer for ROUGE) belongs to the process,
    not to the first client turn that happens to validate with it (docs/memory.md)."""
    examples = client.val or client.train
    if task.name in _WARM or not examples:
        return
    ref = task.reference(examples[0])
    task.score([ref[0] if isinstance(ref, tuple) else ref], [ref])
    _WARM.add(task.name)


def run_client(ctx: ClientContext, client: ClientData, sub: SubMoE, trainables: Trainables, download: bytes,
               seed: int, measure: Any, plan: ClientPlan | None = None, deadline: Deadline | None = None,
               fault: str | None = None, checkpointing: bool | None = None) -> tuple[ClientReply, Any]:
    """Train ``sub`` (with the downloaded trainable tensors) on the client's data.

    ``measure(fn)`` runs ``fn`` and returns ``(result, peak_bytes)``. ``deadline`` is checked
    after every local step and after validation (:class:`~fedmoe.engine.faults.ClientTimeout`).
    ``fault`` (tests and drills only) makes this client misbehave as
    :data:`~fedmoe.engine.faults.FAULT_KINDS` describes.
    ``checkpointing``: train with gradient checkpointing (None: only if ``train.gradient_checkpointing``
    is ``true``; the server resolves ``"auto"`` per client, ``Strategy.uses_checkpointing``).
    Returns the reply and the trained model (for the caller's bookkeeping).
    """
    task = ctx.tasks[client.task]
    plan = plan or ClientPlan()
    deadline = deadline or Deadline(0)
    extra_bytes = to_bytes(plan.extra_down or {})
    on = ctx.cfg.train.gradient_checkpointing is True if checkpointing is None else checkpointing
    train_cfg = dataclasses.replace(ctx.cfg.train, gradient_checkpointing=bool(on))

    def work():
        model = trainables.wrap(sub).to(ctx.device)
        state = from_wire(from_bytes(download), ctx.cfg.engine.wire_dtype)
        trainables.load(model, state)
        extra_down = from_bytes(extra_bytes)
        hooks: LocalHooks = plan.hooks(extra_down) if plan.hooks else LocalHooks()
        extra_up_fn = plan.extra_up
        if plan.node_plan:
            turn = NodeTurn(ctx.cfg, ctx.family, client.client_id, client.task, list(state), extra_down,
                            plan.store if plan.store is not None else SlotStore({}, client.client_id))
            hooks, extra_up_fn = build_node_plan(plan.node_plan, turn)
        hooks.after_step = lambda step: deadline.check()
        if fault == "timeout":
            deadline.hang()
        res: LocalResult = local_train(model, ctx.family, ctx.kind, task, list(client.train), ctx.tokenizer,
                                       train_cfg, ctx.cfg.data, ctx.device, seed, hooks)
        extra_up = extra_up_fn(model, extra_down, res) if extra_up_fn else None
        inner = model.base_model.model if hasattr(model, "peft_config") else model
        with RoutingStats(inner, ctx.family, eos_token_id=_eos_id(ctx.tokenizer)) as stats:
            scores = _validate(ctx, model, task, client, stats)
        deadline.check()
        if fault == "raise":
            raise InjectedFault(f"injected fault: the client raised after training (fault `{fault}`)")
        return model, res, scores, global_p(stats, sub.expert_map), extra_up

    # the sub-MoE's weights are part of the turn's memory (docs/memory.md); on CPU they already
    # exist when the measurement starts (on CUDA, `.to(device)` inside it counts them)
    held = tensor_bytes(sub.model) if ctx.device.type == "cpu" else 0
    warm_metric(task, client)
    if ctx.cfg.engine.measure_memory:
        rehearse_once(lambda: _rehearsal(ctx, client, sub, trainables, download, train_cfg, seed))
    (model, res, scores, p, extra_up), peak = measure(work)
    peak = peak + held if peak else 0
    trainables.keep_personal(model)
    state = {k: v.cpu() for k, v in trainables.upload_state(model, client.task).items()}
    if fault:
        state = corrupt_upload(state, fault)
    if fault in ("bad_p", "bad_extra"):
        p, extra_up = corrupt_fields(p, extra_up, fault)
    upload = to_bytes(to_wire(state, ctx.cfg.engine.wire_dtype))
    extra_up_bytes = to_bytes(extra_up or {})
    reply = ClientReply(upload, res.loss, main_metric(task, scores), p, res.steps, int(peak),
                        extra=from_bytes(extra_up_bytes), extra_down_bytes=len(extra_bytes))
    reply.extra_up_bytes = len(extra_up_bytes)
    return reply, model


def _rehearsal(ctx: ClientContext, client: ClientData, sub: SubMoE, trainables: Trainables, download: bytes,
               train_cfg: Any, seed: int) -> None:
    """One local step on a throwaway copy of ``sub``, on the client's longest examples (by text
    length): the first use of the math libraries at this model's shapes sets up buffers the process
    keeps (docs/memory.md) — process set-up, like :func:`warm_metric`, not the first turn's cost.

    On CPU the copy shares ``sub``'s frozen weight tensors (its modules are new, so LoRA wraps only
    the copy); a tensor the wrapped copy trains gets its own clone before the step, and every shared
    tensor's ``requires_grad`` is put back afterwards — so the rehearsal adds the step's training
    memory, not a second copy of the weights, and leaves ``sub`` exactly as it was
    (``tests/engine/test_memory_budget.py``: a run with measurement equals one without)."""
    import copy

    # on CUDA the copy is a full one: moving shared tensors to the device would move ``sub``'s too,
    # and the measured turn counts its own move of the weights
    shared = [*sub.model.parameters(), *sub.model.buffers()] if ctx.device.type == "cpu" else []
    flags = [t.requires_grad for t in shared]
    try:
        twin = dataclasses.replace(sub, model=copy.deepcopy(sub.model, {id(t): t for t in shared}))
        model = trainables.wrap(twin).to(ctx.device)
        ids = {id(t) for t in shared}
        _unshare_trained(model, ids)
        for t, flag in zip(shared, flags, strict=True):
            t.requires_grad_(flag)
        trainables.load(model, from_wire(from_bytes(download), ctx.cfg.engine.wire_dtype))
        _unshare_trained(model, ids)  # what load or a graft made trainable must not be shared either
        longest = sorted(client.train, key=lambda ex: len(repr(ex)), reverse=True)[: train_cfg.batch_size]
        one = dataclasses.replace(train_cfg, max_local_steps=1, local_epochs=1)
        local_train(model, ctx.family, ctx.kind, ctx.tasks[client.task], longest, ctx.tokenizer, one, ctx.cfg.data,
                    ctx.device, seed)
    finally:
        for t, flag in zip(shared, flags, strict=True):
            t.requires_grad_(flag)


def _unshare_trained(model: torch.nn.Module, shared_ids: set[int]) -> None:
    """Give every trainable parameter of ``model`` that is one of the shared tensors its own copy."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and id(p) in shared_ids:
                module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=True)


def evaluate_client(ctx: ClientContext, client: ClientData, sub: SubMoE, trainables: Trainables,
                    download: dict[str, torch.Tensor] | None = None, predictions: list | None = None) -> dict[str, float]:
    """A client's test scores on its sub-MoE with the given trainable tensors (the final
    evaluation; the same code in-process and on a node). ``download`` None: the tensors
    ``trainables`` holds for this client (:meth:`~fedmoe.engine.trainables.Trainables.for_client`).
    ``predictions``: a list that gets one row per test example (``client`` + the fields of
    :func:`~fedmoe.train.evaluate.evaluate_with_predictions`)."""
    model = trainables.wrap(sub).to(ctx.device)
    if download is None:
        download = trainables.for_client(model, sub.expert_map, client.task)
    trainables.load(model, download)
    scores, rows = evaluate_with_predictions(model, ctx.kind, ctx.tasks[client.task], list(client.test),
                                             ctx.tokenizer, ctx.cfg.data, ctx.device, ctx.cfg.train.eval_batch_size)
    if predictions is not None:
        predictions.extend({"client": client.client_id, **r} for r in rows)
    return scores


def _validate(ctx: ClientContext, model, task, client: ClientData, stats: RoutingStats) -> dict[str, float]:
    return evaluate(model, ctx.kind, task, list(client.val), ctx.tokenizer, ctx.cfg.data, ctx.device,
                    ctx.cfg.train.eval_batch_size)
