"""Client memory budgets and the additive training-memory table used by the θ search.

Each client's budget is ``M_k = mem(dense) + u_k · Σ_j mem(expert j)`` with ``u_k`` drawn
uniformly in ``[setting.budget_low, setting.budget_high]`` (seeded), in training bytes under
the configured fine-tuning mode (docs/algorithms.md §5.3: every client fits the dense part plus
some experts; only clients with ``u_k ≥ 1`` fit the whole MoE). Budgets are drawn on the
costs at the run's longest batch (``train.batch_size`` rows of ``data.max_seq_len`` tokens).

A client is *priced* at its own largest batch (:func:`client_batch_shape`: its longest example
as batching builds it, at most ``batch_size`` rows): short-text clients (AG News) cost less
than the run-wide worst case. A client is "sufficient" for stage 1 when M_k ≥ the full MoE's
cost at its own batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from fedmoe.algorithms.fedmoe import MemoryTable
from fedmoe.config import ExperimentConfig
from fedmoe.data.partition import draw_budgets
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.memory.clipping import TopKClip, topk_clip
from fedmoe.moe.slicing import layout_of


def _unit_training_bytes(model: nn.Module, family: MoEFamily, batch_size: int, seq_len: int, finetune: str,
                         lora_r: int, target_len: int | None = None) -> tuple[float, np.ndarray]:
    """Additive training bytes: weights + (grad + 2 AdamW states) of what trains + activations.

    Uses :func:`fedmoe.moe.memory.unit_training_bytes` when available.
    """
    try:
        from fedmoe.moe import memory

        return memory.unit_training_bytes(model, family, batch_size=batch_size, seq_len=seq_len,
                                          finetune=finetune, lora_r=lora_r, target_len=target_len)
    except (ImportError, AttributeError):
        pass
    state = model.state_dict()
    layout = layout_of(model, family)
    blocks = family.blocks(model)
    experts = np.zeros((len(blocks), max(b.num_experts for b in blocks)))
    train_mult = 4.0 if finetune == "full" else 1.0  # weights (+ grads + 2 Adam states)
    for (i, j), slices in layout.experts.items():
        w = sum(s.read(state).numel() * s.read(state).element_size() for s in slices)
        experts[i, j] = w * train_mult if finetune == "full" else w * (1 + 3 * min(1.0, 2 * lora_r / 64))
    dense = sum(state[k].numel() * state[k].element_size() for k in layout.dense_keys) * train_mult
    hidden = getattr(model.config, "hidden_size", getattr(model.config, "d_model", 0))
    dense += 4 * batch_size * seq_len * hidden * 24 * len(blocks)
    return float(dense), experts


#: factor on the formula's training bytes for what a real client turn adds beyond the tensors it
#: counts (allocator and runtime overhead, validation): measured / formula of the larger client
#: turns (minilm-moe-4e/-8e, smollm2-moe-4e, tiny families at 16 × 128) centres near 0.98, so 1.02
#: (benchmarks/memory/client_turns.md, docs/memory.md "Calibration"). Budgets and prices scale
#: together, so the θ search picks the same experts (checked on the stand-in grid's plans).
RUNTIME_SLACK = 1.02
#: fixed bytes a turn adds whatever its size (small turns: tiny families at 8 × 64 measure
#: +1.5–3.5 MiB above their tensors: small-allocation heap, Python and autograd objects),
#: calibrated at 2 MiB. In every price (with the dense part) and every budget; the searches' safety
#: factors α apply to the share above the dense part (:func:`fedmoe.core.search.search_cap`), so the
#: experts they pick do not depend on it; docs/memory.md.
RUNTIME_FIXED_BYTES = 2.0 * 2**20


def _checkpointing_saving(model: nn.Module, family: MoEFamily, cfg: ExperimentConfig,
                          shape: BatchShape | None = None) -> tuple[float, np.ndarray]:
    """Dense-part and per-expert bytes that ``train.gradient_checkpointing`` saves (same loss/optimiser as
    :func:`fedmoe.moe.memory.unit_training_bytes` assumes), at ``shape`` (default: the run's longest batch)."""
    import torch

    from fedmoe.moe.memory import SMOOTHED_CE_LOSS
    from fedmoe.moe.memory.checkpointing import checkpointing_saving

    shape = shape or BatchShape.of_config(cfg)
    return checkpointing_saving(model, shape.rows, shape.seq_len, cfg.train.finetune, cfg.train.lora_r, family,
                                factors=SMOOTHED_CE_LOSS, target_len=shape.target_len,
                                adam_impl="foreach" if torch.cuda.is_available() else "for-loop")


@dataclass(frozen=True)
class BatchShape:
    """The largest training batch a client's turn builds: ``rows`` sequences of ``seq_len`` tokens
    (``target_len``: decoder tokens of encoder-decoder models; ignored by the others)."""

    rows: int
    seq_len: int
    target_len: int

    @staticmethod
    def of_config(cfg: ExperimentConfig) -> BatchShape:
        """The run-wide worst case: ``train.batch_size`` rows at ``data.max_seq_len`` / ``max_target_len``."""
        return BatchShape(cfg.train.batch_size, cfg.data.max_seq_len, cfg.data.max_target_len)


def client_batch_shape(cfg: ExperimentConfig, kind: str, task: Any, tokenizer: Any, train: Sequence[Any],
                       chunk: int = 64) -> BatchShape:
    """A client's largest training batch, from its own training examples: the longest one as
    :func:`fedmoe.train.batching.collate` builds it (same formatting, truncation and special
    tokens; a batch is padded to its longest row, so no batch is longer), at
    ``min(train.batch_size, len(train))`` rows. Never above :meth:`BatchShape.of_config`.

    Validation examples are not counted: validation runs without gradients, so its batches hold
    no activations for backward and stay far below a training step's peak.
    """
    from fedmoe.train.batching import collate

    worst = BatchShape.of_config(cfg)
    examples = list(train)
    if not examples:
        return worst
    seq = target = 1
    for i in range(0, len(examples), chunk):
        batch = collate(kind, task, examples[i : i + chunk], tokenizer, cfg.data.max_seq_len, cfg.data.max_target_len)
        seq = max(seq, int(batch["input_ids"].shape[1]))
        if kind == "seq2seq":
            target = max(target, int(batch["labels"].shape[1]))
    rows = min(cfg.train.batch_size, len(examples))
    return BatchShape(rows, min(seq, worst.seq_len),
                      min(target, worst.target_len) if kind == "seq2seq" else worst.target_len)


def client_batch_shapes(cfg: ExperimentConfig, fed: Any, kind: str, tokenizer: Any) -> dict[int, BatchShape]:
    """:func:`client_batch_shape` of every client of ``fed`` (a built federation)."""
    return {c.client_id: client_batch_shape(cfg, kind, fed.tasks[c.task], tokenizer, c.train) for c in fed.clients}


@dataclass
class MemoryPlan:
    table: MemoryTable
    full_bytes: float  #: training bytes of the full MoE at the run's longest batch (the budgets' scale)
    num_experts: list[int]
    #: what layers keeping fewer than top_k experts save (run-wide, and per client at its own batch);
    #: None when every client trains with gradient checkpointing (its price stays the additive bound)
    clip: TopKClip | None = None
    clips: dict[int, TopKClip] = field(default_factory=dict)

    def submodel_bytes(self, kept: list[list[int]], checkpointing: bool = False, client: int | None = None) -> float:
        """Training bytes of a sub-MoE, with the checkpointed costs when ``checkpointing`` and the
        plan has them (``train.gradient_checkpointing = "auto"``), at ``client``'s own batch shape
        when given (the run's longest batch otherwise). Layers keeping fewer than ``top_k`` experts
        route to fewer (:mod:`fedmoe.moe.memory.clipping`): that saving is taken off here, while
        the θ search prices with the additive table alone (an upper bound of this)."""
        dense, eb = self.table.costs(checkpointing, client)
        price = dense + sum(float(eb[i, j]) for i, ids in enumerate(kept) for j in ids)
        clip = self.clips.get(client, self.clip) if client is not None else self.clip
        if clip is not None and not checkpointing:
            price -= RUNTIME_SLACK * clip.bytes_saved([len(ids) for ids in kept])
        return price

    def client_full_bytes(self, client: int) -> float:
        """Training bytes of the full MoE at ``client``'s own batch shape (stage 1's fit test)."""
        return self.table.full_bytes(client)


def _clip(model: nn.Module, family: MoEFamily, cfg: ExperimentConfig, shape: BatchShape) -> TopKClip:
    import torch

    from fedmoe.moe.memory import SMOOTHED_CE_LOSS, memory_model_for

    mm = memory_model_for(model, shape.rows, shape.seq_len, cfg.train.finetune, cfg.train.lora_r, family,
                          factors=SMOOTHED_CE_LOSS, target_len=shape.target_len,
                          adam_impl="foreach" if torch.cuda.is_available() else "for-loop")
    return topk_clip(mm)


def _costs(model: nn.Module, family: MoEFamily, cfg: ExperimentConfig,
           shape: BatchShape) -> tuple[tuple[float, np.ndarray], tuple[float, np.ndarray] | None]:
    """``(plain costs, checkpointed costs or None)`` at ``shape``, runtime slack included."""
    dense, experts = _unit_training_bytes(
        model, family, batch_size=shape.rows, seq_len=shape.seq_len,
        finetune=cfg.train.finetune, lora_r=cfg.train.lora_r,
        target_len=shape.target_len,  # encoder-decoder targets (decoder tokens); ignored otherwise
    )
    dense = float(dense) * RUNTIME_SLACK + RUNTIME_FIXED_BYTES  # the fixed share rides with the dense part
    experts = np.asarray(experts, dtype=np.float64) * RUNTIME_SLACK
    checkpointed = None
    if cfg.train.gradient_checkpointing in (True, "auto"):  # budgets are the devices' memory; the costs drop
        d_saving, e_saving = _checkpointing_saving(model, family, cfg, shape)
        checkpointed = (float(dense - d_saving * RUNTIME_SLACK), experts - e_saving[:, :experts.shape[1]] * RUNTIME_SLACK)
    return (dense, experts), checkpointed


def plan_memory(model: nn.Module, family: MoEFamily, cfg: ExperimentConfig, client_ids: list[int],
                shapes: dict[int, BatchShape] | None = None) -> MemoryPlan:
    """Budgets (drawn on the costs at the run's longest batch, :meth:`BatchShape.of_config`) and
    costs: run-wide at that batch, and per client at ``shapes[cid]`` (:func:`client_batch_shapes`)
    for the clients it names."""
    (dense, experts), checkpointed = _costs(model, family, cfg, BatchShape.of_config(cfg))
    s = cfg.setting
    total_experts = float(experts.sum())
    budgets = draw_budgets(len(client_ids), dense + s.budget_low * total_experts,
                           dense + s.budget_high * total_experts, cfg.seed)
    own: dict[BatchShape, tuple[tuple[float, np.ndarray], tuple[float, np.ndarray] | None]] = {}
    for shape in sorted(set((shapes or {}).values()), key=lambda b: (b.rows, b.seq_len, b.target_len)):
        own[shape] = _costs(model, family, cfg, shape)
    per_client = {cid: own[shapes[cid]][0] for cid in client_ids if shapes and cid in shapes}
    per_client_ckpt = {cid: own[shapes[cid]][1] for cid in per_client if own[shapes[cid]][1] is not None}
    if cfg.train.gradient_checkpointing is True:  # everyone trains with it
        (dense, experts), checkpointed = checkpointed, None
        per_client, per_client_ckpt = per_client_ckpt, {}
    # "auto": the plain costs stay the table's; the search gives a client the checkpointed ones
    # when they buy it experts (fedmoe.algorithms.fedmoe.initial_expert_sets)
    table = MemoryTable(float(dense), experts, {cid: float(b) for cid, b in zip(client_ids, budgets, strict=True)},
                        checkpointed, per_client, per_client_ckpt, RUNTIME_FIXED_BYTES)  # type: ignore[arg-type]
    clip, clips = None, {}
    if cfg.train.gradient_checkpointing is not True:
        clip = _clip(model, family, cfg, BatchShape.of_config(cfg))
        by_shape = {shape: _clip(model, family, cfg, shape) for shape in set((shapes or {}).values())}
        clips = {cid: by_shape[shapes[cid]] for cid in per_client if shapes}
    return MemoryPlan(table, table.full_bytes(), [b.num_experts for b in family.blocks(model)], clip, clips)


def attach_budgets(cfg: ExperimentConfig, fed: Any) -> float:
    """Give every client the memory budget the run would give it (same model, same draw), from
    a weight-free (meta-device) copy of ``model.name``; returns the full MoE's training bytes."""
    from fedmoe.moe.meta import load_shapes

    model, family = load_shapes(cfg.model.name, cfg.model.dtype)
    plan = plan_memory(model, family, cfg, sorted(c.client_id for c in fed.clients))
    for c in fed.clients:
        c.budget_bytes = int(plan.table.budgets[c.client_id])
    return plan.full_bytes
