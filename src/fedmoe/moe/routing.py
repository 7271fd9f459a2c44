"""Routing statistics: the paper's activation probabilities p_{i,j} (docs/algorithms.md §0).

Forward hooks on every router count, per MoE layer i and expert j, the tokens routed to
j — each of a token's top-k choices counts once — and the router probability mass. Then
``p[i, j] = n_{i,j} / (k_i · N_i)``, so each row sums to 1.

Only real tokens count. Each MoE layer belongs to a *stack* (the decoder-only model's body,
or the encoder / the decoder of an encoder-decoder model, or BERT-MoE's encoder): the
highest submodule above it whose ``forward`` takes ``input_ids`` and ``attention_mask``. A
pre-forward hook on every stack reads that forward's own ``attention_mask`` (the last ``q``
columns for ``q`` new tokens after a KV cache) and the routers inside use it, so encoder and
decoder masks never mix. During generation (a stack's forward with a non-empty cache) a
sequence stops counting once ``eos_token_id`` has been fed back to the model: the steps
``generate`` still runs for finished sequences of a batch are not counted, so p does not
depend on the evaluation batch size.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.moe.families import MoEFamily, family_of


def _stack_path(model: nn.Module, block_path: str) -> str:
    """The highest proper ancestor of ``block_path`` whose forward takes ``input_ids`` and
    ``attention_mask``; ``""`` (the model itself) when there is none."""
    parts = block_path.split(".")
    for n in range(1, len(parts)):
        path = ".".join(parts[:n])
        params = inspect.signature(model.get_submodule(path).forward).parameters
        if "input_ids" in params and "attention_mask" in params:
            return path
    return ""


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


class RealTokens:
    """Which routed tokens are real, per MoE layer, for the forwards that run while installed.

    A pre-forward hook on every stack (see the module docstring) keeps the token mask of that
    stack's current forward: its own ``attention_mask`` (the last ``q`` columns for ``q`` new
    tokens), all ones when it gets none, and — during generation — rows whose sequence has
    already fed back ``eos`` switched off. :meth:`mask` gives the mask of layer ``i``'s stack.
    Used by :class:`RoutingStats` and by HFedMoE's / FLEx's passes in :mod:`fedmoe.moe.graft`.
    """

    def __init__(self, model: nn.Module, blocks: list[Any], eos: list[int]) -> None:
        self.model = model
        self.eos = eos
        self.stacks = {info.index: _stack_path(model, info.path) for info in blocks}
        self._masks: dict[str, torch.Tensor | None] = {}  # stack → token mask of its current forward
        self._finished: dict[str, torch.Tensor] = {}  # stack → rows whose generation has ended

    def install(self) -> list[Any]:
        """Register the stack hooks; returns their handles (the caller removes them)."""
        handles = []
        for path in sorted(set(self.stacks.values())):
            stack = self.model.get_submodule(path) if path else self.model
            handles.append(stack.register_forward_pre_hook(self._stack_hook(path, stack), with_kwargs=True))
        return handles

    def clear(self) -> None:
        self._masks.clear()
        self._finished.clear()

    def mask(self, layer: int) -> torch.Tensor | None:
        """The current token mask of layer ``layer``'s stack (``[B, q]`` bool), None if unknown."""
        return self._masks.get(self.stacks[layer])

    def select(self, layer: int, n_tokens: int) -> torch.Tensor | None:
        """:meth:`mask` flattened, checked to cover ``n_tokens`` routed tokens; None if unknown."""
        mask = self.mask(layer)
        if mask is None:
            return None
        if mask.numel() != n_tokens:
            raise RuntimeError(
                f"layer {layer} routed {n_tokens} tokens but its stack `{self.stacks[layer] or 'model'}` "
                f"had {mask.numel()}; cannot tell real tokens from padding.")
        return mask.reshape(-1)

    def _stack_hook(self, path: str, stack: nn.Module):
        sig = inspect.signature(stack.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            try:
                bound = dict(sig.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                bound = dict(kwargs)
            bound.update(bound.pop("kwargs", {}) or {})
            self._masks[path] = self._stack_mask(path, bound)

        return hook

    def _stack_mask(self, path: str, kw: dict[str, Any]) -> torch.Tensor | None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        shape_of = ids if isinstance(ids, torch.Tensor) else embeds
        if not isinstance(shape_of, torch.Tensor) or shape_of.dim() < 2:
            return None
        b, q = shape_of.shape[:2]
        am = kw.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] == b and am.shape[1] >= q:
            mask = am[:, am.shape[1] - q:].bool()
        else:
            mask = torch.ones(b, q, dtype=torch.bool, device=shape_of.device)
        if _past_length(kw) == 0:  # a fresh forward (training, scoring, a generation's prefill)
            self._finished[path] = torch.zeros(b, dtype=torch.bool, device=mask.device)
        elif isinstance(ids, torch.Tensor) and self.eos:
            done = self._finished.get(path)
            if done is None or done.shape[0] != b:
                done = torch.zeros(b, dtype=torch.bool, device=mask.device)
            eos = torch.tensor(self.eos, device=ids.device)
            done = done | torch.isin(ids, eos).any(dim=1).to(done.device)
            self._finished[path] = done
            mask = mask & ~done[:, None]
        return mask


def eos_ids(model: nn.Module, eos_token_id: int | list[int] | None = None) -> list[int]:
    """``eos_token_id`` as a list (default: the model's generation config's; [] if none)."""
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    return [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))


class RoutingStats:
    """Context manager that collects routing counts over any number of forward passes.

    ``eos_token_id``: the id that ends a generated sequence (default: the model's generation
    config's); ``token_masks`` (legacy, optional): masks to use for forwards of a stack that
    gets no ``attention_mask``, matched by size.
    """

    def __init__(self, model: nn.Module, family: MoEFamily | None = None,
                 eos_token_id: int | list[int] | None = None) -> None:
        self.model = model
        self.family = family or family_of(model)
        self.blocks = self.family.blocks(model)
        n_max = max(b.num_experts for b in self.blocks)
        self.counts = np.zeros((len(self.blocks), n_max), dtype=np.float64)
        self.mass = np.zeros_like(self.counts)
        self.tokens = np.zeros(len(self.blocks), dtype=np.float64)
        self.token_masks: list[torch.Tensor] = []
        self.eos = eos_ids(model, eos_token_id)
        self.real = RealTokens(model, self.blocks, self.eos)
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingStats:
        self._handles.extend(self.real.install())
        for info in self.blocks:
            router = self.family.router(self.model.get_submodule(info.path))
            self._handles.append(router.register_forward_hook(self._hook(info.index, info.num_experts, info.top_k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.real.clear()

    def _legacy_mask(self, n_tokens: int) -> torch.Tensor | None:
        for m in self.token_masks:
            if m.numel() == n_tokens:
                return m.reshape(-1).bool()
        return None

    def _hook(self, layer: int, n_exp: int, top_k: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            with torch.no_grad():
                choices, probs = self.family.route_choices(out, top_k)
                mask = self.real.mask(layer)
                if mask is None or mask.numel() != probs.shape[0]:
                    if mask is not None and not self.token_masks:
                        self.real.select(layer, probs.shape[0])  # raises: cannot tell real tokens from padding
                    mask = self._legacy_mask(probs.shape[0])
                if mask is not None:
                    mask = mask.reshape(-1).to(probs.device)
                    choices, probs = choices[mask], probs[mask]
                counts = torch.bincount(choices.reshape(-1), minlength=n_exp)[:n_exp]
                self.counts[layer, :n_exp] += counts.double().cpu().numpy()
                self.mass[layer, :n_exp] += probs.double().sum(0).cpu().numpy()
                self.tokens[layer] += probs.shape[0]

        return hook

    def p(self) -> np.ndarray:
        """Activation probabilities, layers × experts; each row sums to 1 (0-rows if unseen)."""
        tot = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, tot, out=np.zeros_like(self.counts), where=tot > 0)

    def mean_prob(self) -> np.ndarray:
        """Mean router probability of each expert over the tokens seen (HFedMoE's u_c(e))."""
        return np.divide(self.mass, self.tokens[:, None], out=np.zeros_like(self.mass), where=self.tokens[:, None] > 0)


def activation_probabilities(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], family: MoEFamily | None = None
) -> np.ndarray:
    """``p`` over a data loader of model-input dicts (``attention_mask`` excludes padding)."""
    model.eval()
    with RoutingStats(model, family) as stats, torch.no_grad():
        for batch in batches:
            model(**batch)
    return stats.p()
