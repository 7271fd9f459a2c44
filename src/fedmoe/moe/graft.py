"""Model-side helpers of HFedMoE (docs/algorithms.md §3) and FLEx (§4), for every registered family.

HFedMoE:

* :func:`collect_router_stats` — one pass over a client's data → one
  :class:`~fedmoe.core.router_stats.RouterStats` per MoE layer (§3.2–3.4 inputs);
* :func:`mask_routing` — train on the active set only (§3.4): the sub-MoE of
  :func:`fedmoe.moe.slicing.extract`, whose routing is the full model's with the inactive
  experts' router logits at −inf (see that module), and whose inactive experts do not exist,
  hence receive no gradient.

FLEx:

* :func:`run_single_expert` — E_e(X), expert e alone (no routing weight);
* :func:`expert_distances` / :func:`choose_personal_experts` — §4.1,
  e* = argmin_e Σ_batches ‖MoE(X) − E_e(X)‖_F;
* :func:`graft_side_experts` — §4.2, y = MoE(x) + σ(w_side·x + b_side)·E_side(x).

MoE(X) is the sparse block's full output: for Qwen2-MoE and DeepSeek-V3 it includes the
shared expert(s), since that is what the layer outputs and what the side expert is added to.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.core.personal import SIDE_MARKERS, is_personal
from fedmoe.core.router_stats import RouterStats
from fedmoe.errors import ModelError
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.routing import RealTokens, eos_ids
from fedmoe.moe.slicing import SubMoE, extract, layout_of, merge

#: default b_side: σ(−4) ≈ 0.018, so the grafted model starts close to the pretrained one (choice)
DEFAULT_GATE_BIAS = -4.0
#: the label of a position without a target (torch's / transformers' ignore index, −100)
_IGNORE_INDEX = nn.CrossEntropyLoss().ignore_index


def _forward_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` as the model's forward gets it in these passes.

    A teacher-forced encoder-decoder batch (``labels``, no ``decoder_attention_mask``) gets
    ``decoder_attention_mask = labels != -100``: the decoder positions that predict a real
    label token (position t reads label t−1, shifted right). Those positions attend only to
    earlier ones (causal), so their outputs are unchanged; the mask tells the decoder stack's
    :class:`~fedmoe.moe.routing.RealTokens` which positions are padding.
    """
    labels = batch.get("labels")
    if (getattr(getattr(model, "config", None), "is_encoder_decoder", False) and isinstance(labels, torch.Tensor)
            and labels.dim() == 2 and "decoder_attention_mask" not in batch):
        return {**batch, "decoder_attention_mask": (labels != _IGNORE_INDEX).long()}
    return batch


@contextlib.contextmanager
def _real_tokens(model: nn.Module, family: MoEFamily) -> Iterator[RealTokens]:
    """Per-stack real-token masks (:class:`~fedmoe.moe.routing.RealTokens`) while the body runs."""
    real = RealTokens(model, family.blocks(model), eos_ids(model))
    handles = real.install()
    try:
        yield real
    finally:
        for h in handles:
            h.remove()
        real.clear()


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


# -- HFedMoE ---------------------------------------------------------------------------
def collect_router_stats(
    model: nn.Module, family: MoEFamily, batches: Iterable[dict[str, Any]]
) -> list[RouterStats]:
    """Router probabilities G [tokens, E] of every MoE layer over ``batches`` (model-input dicts).

    Rows are real tokens only: each stack's (encoder / decoder / body) own attention mask, as
    :class:`~fedmoe.moe.routing.RoutingStats` counts them (see :func:`_forward_inputs` for the
    decoder of a teacher-forced encoder-decoder batch). Probabilities are
    ``family.route_choices`` (softmax, or DeepSeek's normalised sigmoid), "used" = chosen in
    some token's top-k. Runs in eval mode without gradients.
    """
    blocks = family.blocks(model)
    stats = [RouterStats(b.num_experts) for b in blocks]
    real: RealTokens | None = None

    def make_hook(i: int, top_k: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            choices, probs = family.route_choices(out, top_k)
            mask = real.select(i, probs.shape[0]) if real is not None else None
            if mask is not None:
                mask = mask.to(probs.device)
                choices, probs = choices[mask], probs[mask]
            if probs.shape[0]:
                stats[i].add(probs.double().cpu().numpy(), choices.cpu().numpy())

        return hook

    handles = [family.router(model.get_submodule(b.path)).register_forward_hook(make_hook(b.index, b.top_k))
               for b in blocks]
    try:
        with _eval(model), _real_tokens(model, family) as real:
            for batch in batches:
                model(**_forward_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    return stats


@contextlib.contextmanager
def mask_routing(
    model: nn.Module, family: MoEFamily, active_sets: list[list[int]], *, write_back: bool = False
) -> Iterator[SubMoE]:
    """§3.4: yields the sub-MoE holding only ``active_sets[i]`` of each MoE layer i.

    Its top-k routing runs over the active experts only (k clipped to the set size) — the
    full model with the other experts' router logits at −inf — and the other experts receive
    no gradient because they are not there. ``write_back`` (choice, default False): on normal
    exit, write the sub-MoE's plain (non-peft) weights back into ``model`` at the global
    indices (:func:`fedmoe.moe.slicing.merge`); inactive experts stay bit-identical.
    """
    sub = extract(model, active_sets, family)
    yield sub
    if write_back:
        merge(model.state_dict(), layout_of(model, family), sub.model.state_dict(),
              layout_of(sub.model, family, sub.expert_map))


# -- FLEx: choosing the personalised expert (§4.1) ---------------------------------------
def run_single_expert(family: MoEFamily, block: nn.Module, e: int, X: torch.Tensor) -> torch.Tensor:
    """E_e(X): expert ``e`` of ``block`` alone on ``X [..., H]``, without a routing weight.

    Fused experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3: act(gate)·up then down over
    ``gate_up_proj``/``down_proj``; BERT-MoE: GELU(up + b)·down + b) run through the experts
    module's own forward with every token routed to ``e`` at weight 1, so the weight layout,
    activation and ``experts_implementation`` are exactly the model's. Per-module experts
    (SwitchTransformers) call ``experts.expert_<e>`` directly.
    """
    if not family.fused:
        return block.experts.get_submodule(family.per_expert_module.format(j=e))(X)
    flat = X.reshape(-1, X.shape[-1])
    idx = torch.full((flat.shape[0], 1), e, dtype=torch.long, device=X.device)
    ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=X.device)
    return block.experts(flat, idx, ones).reshape(X.shape)


def _block_io(args: tuple, kwargs: dict[str, Any], out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = args[0] if args else kwargs["hidden_states"]
    return x, (out[0] if isinstance(out, tuple) else out)


def expert_distances(model: nn.Module, family: MoEFamily, batches: Iterable[dict[str, Any]]) -> np.ndarray:
    """``d[i, e] = Σ_batches ‖MoE_i(X) − E_e(X)‖_F`` over ``batches`` (model-input dicts).

    X is what MoE block i receives on a batch (captured by a forward hook), restricted to
    real tokens (each stack's own attention mask, as :func:`collect_router_stats`), one Frobenius norm per block call. ``[L, E_max]``;
    entries of experts a layer lacks are +inf. Eval mode, no gradients.
    """
    blocks = family.blocks(model)
    d = np.full((len(blocks), max(b.num_experts for b in blocks)), np.inf)
    for b in blocks:
        d[b.index, : b.num_experts] = 0.0
    real: RealTokens | None = None

    def make_hook(i: int, n: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            x, y = _block_io(args, kwargs, out)
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            mask = real.select(i, x.shape[0]) if real is not None else None
            if mask is not None:
                mask = mask.to(x.device)
                x, y = x[mask], y[mask]
            for e in range(n):
                diff = (y - run_single_expert(family, module, e, x)).double()
                d[i, e] += float(torch.linalg.vector_norm(diff))

        return hook

    handles = [model.get_submodule(b.path).register_forward_hook(make_hook(b.index, b.num_experts), with_kwargs=True)
               for b in blocks]
    try:
        with _eval(model), _real_tokens(model, family) as real:
            for batch in batches:
                model(**_forward_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    return d


def choose_personal_experts(model: nn.Module, family: MoEFamily, batches: Iterable[dict[str, Any]]) -> list[int]:
    """§4.1: e* per MoE layer = argmin of :func:`expert_distances` (ties → lower expert id)."""
    return [int(np.argmin(row)) for row in expert_distances(model, family, batches)]


# -- FLEx: grafting (§4.2) ---------------------------------------------------------------
class SideExpert(nn.Module):
    """A trainable copy of one pretrained expert; ``forward(x [..., H]) = E_{e*}(x)``.

    Fused families hold a one-expert copy of the block's experts module (``inner``, its fused
    tensors sliced to row e*) run with every token routed to it at weight 1; per-module
    families hold a copy of ``experts.expert_<e*>``. ``inner`` is not named ``experts`` so
    :func:`fedmoe.moe.lora.apply_lora`'s targets do not match it (it is trained in full).
    """

    def __init__(self, family: MoEFamily, block: nn.Module, e: int) -> None:
        super().__init__()
        self.fused = family.fused
        self.source_expert = e
        if not self.fused:
            self.inner = copy.deepcopy(block.experts.get_submodule(family.per_expert_module.format(j=e)))
            return
        experts = block.experts
        memo: dict[int, Any] = {}
        if getattr(experts, "config", None) is not None:
            memo[id(experts.config)] = experts.config  # share, do not copy, the config
        for name in family.fused_expert_tensors:
            t = getattr(experts, name)
            memo[id(t)] = nn.Parameter(t.detach()[e : e + 1].clone())
        self.inner = copy.deepcopy(experts, memo)
        self.inner.num_experts = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.inner(x)
        flat = x.reshape(-1, x.shape[-1])
        idx = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=x.device)
        ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=x.device)
        return self.inner(flat, idx, ones).reshape(x.shape)


def _graft_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
    """y = MoE(x) + σ(w_side·x + b_side)·E_side(x) (§4.2), added after the block's forward."""
    x, y = _block_io(args, kwargs, out)
    gate = torch.sigmoid(module.side_gate(x.to(module.side_gate.weight.dtype)))
    y = y + (gate * module.side_expert(x)).to(y.dtype)
    return (y, *out[1:]) if isinstance(out, tuple) else y


def graft_side_experts(
    model: nn.Module, family: MoEFamily, chosen: Sequence[int], *, gate_bias: float = DEFAULT_GATE_BIAS,
    freeze_block: bool = True,
) -> nn.Module:
    """§4.2: graft a side expert (copy of e* = ``chosen[i]``) and a gate into every MoE block, in place.

    Each block gains ``side_expert`` (:class:`SideExpert`) and ``side_gate`` (``nn.Linear(H, 1)``:
    w_side initialised to 0, bias b_side = ``gate_bias``, choice, default −4 so σ ≈ 0.018; the
    bias is an addition to the spec's σ(w_side·x), which makes −∞ an exact "gate off", see
    :func:`set_side_gate_bias`), and a forward hook that adds σ(w·x + b)·E_side(x) to the block's
    output. The block is hooked rather than wrapped so every pretrained state-dict key, the
    family's block discovery, :func:`~fedmoe.moe.slicing.layout_of` and sub-MoE extraction are
    unchanged; new keys are ``<block>.side_expert.*`` / ``<block>.side_gate.*``
    (:data:`~fedmoe.core.personal.SIDE_MARKERS`). ``freeze_block``: the block's pretrained
    parameters (router, routed and shared experts) get ``requires_grad=False``; side tensors
    get ``True``. A jittering router (Mixtral training with ``router_jitter_noise``) jitters x
    in place, so the side expert then sees the jittered x too. Returns ``model``.
    """
    blocks = family.blocks(model)
    if len(chosen) != len(blocks):
        raise ModelError(f"{len(chosen)} personalised experts for {len(blocks)} MoE layers.",
                         "give one expert id per MoE layer (choose_personal_experts).")
    for info, e in zip(blocks, chosen, strict=True):
        block = model.get_submodule(info.path)
        if hasattr(block, "side_expert"):
            raise ModelError(f"MoE layer {info.index} ({info.path}) is already grafted.", "graft a fresh model.")
        if not 0 <= int(e) < info.num_experts:
            raise ModelError(f"MoE layer {info.index} has {info.num_experts} experts; e* = {e} is out of range.",
                             f"use ids in 0..{info.num_experts - 1}.")
        weight = family.router(block).weight
        gate = nn.Linear(weight.shape[1], 1, bias=True, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.fill_(gate_bias)
        block.side_expert = SideExpert(family, block, int(e))
        block.side_gate = gate
        block.register_forward_hook(_graft_hook, with_kwargs=True)
    if freeze_block:
        freeze_moe_blocks(model, family)
    mark_side_trainable(model)
    return model


def freeze_moe_blocks(model: nn.Module, family: MoEFamily) -> None:
    """§4.2–4.3: inside every MoE block only the side tensors train; the rest of the model is left as is.

    Call it after :func:`fedmoe.moe.lora.apply_lora` (which adds expert adapters and unfreezes
    the routers), on the peft model or its base: what then trains and travels is attention
    LoRA + task heads (shared) and the side tensors (personal).
    """
    for info in family.blocks(model):
        for name, p in model.get_submodule(info.path).named_parameters():
            p.requires_grad_(is_personal(name, SIDE_MARKERS))


def side_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The grafted side-expert and side-gate parameters, by name."""
    return {n: p for n, p in model.named_parameters() if is_personal(n, SIDE_MARKERS)}


def mark_side_trainable(model: nn.Module) -> None:
    """``requires_grad=True`` on every side tensor (call again after ``peft`` froze them)."""
    for p in side_parameters(model).values():
        p.requires_grad_(True)


def set_side_gate_bias(model: nn.Module, value: float) -> None:
    """Set b_side of every side gate; ``float("-inf")`` switches the side experts off exactly."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("side_gate") and isinstance(mod, nn.Linear):
                mod.bias.fill_(value)


__all__ = [
    "DEFAULT_GATE_BIAS", "SideExpert", "choose_personal_experts", "collect_router_stats", "expert_distances",
    "freeze_moe_blocks", "graft_side_experts", "mask_routing", "mark_side_trainable", "run_single_expert", "set_side_gate_bias",
    "side_parameters",
]
