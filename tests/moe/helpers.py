"""Reference behaviour for slicing tests: the full model with dropped experts masked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.moe.families import MoEFamily


def model_inputs(family: MoEFamily, seed: int = 0, batch: int = 2, seq: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 250, (batch, seq), generator=g)
    if family.name == "switch_transformers":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, 250, (batch, 5), generator=g)}
    return {"input_ids": ids}


@contextlib.contextmanager
def dropped_logits_masked(model: nn.Module, family: MoEFamily, kept: list[list[int]]) -> Iterator[None]:
    """Run the *full* model with router logits of dropped experts set to −inf.

    Each router computes its logits with one ``F.linear`` call; inside the router's
    forward we wrap ``F.linear`` so that the columns of dropped experts become −inf.
    This is the reference the sub-MoE must reproduce (issue acceptance criterion).
    """
    handles = []
    real_linear = F.linear
    for info, ids in zip(family.blocks(model), kept, strict=True):
        block = model.get_submodule(info.path)
        router = family.router(block)
        # the module whose forward computes the logits (Switch: router.classifier lives
        # inside router; others: the gate itself)
        owner = block.get_submodule(family.router_attr.rsplit(".", 1)[0]) if "." in family.router_attr else router
        dropped = torch.tensor([j for j in range(info.num_experts) if j not in ids], dtype=torch.long)

        def masked_linear(x, w, b=None, _dropped=dropped, _n=info.num_experts):
            out = real_linear(x, w, b)
            if w.shape[0] == _n and len(_dropped):
                out = out.index_fill(-1, _dropped.to(out.device), float("-inf"))
            return out

        def pre(mod, args, _ml=masked_linear):
            F.linear = _ml

        def post(mod, args, out):
            F.linear = real_linear

        handles.append(owner.register_forward_pre_hook(pre))
        handles.append(owner.register_forward_hook(post))
    try:
        yield
    finally:
        F.linear = real_linear
        for h in handles:
            h.remove()


def random_kept(family: MoEFamily, model: nn.Module, seed: int) -> list[list[int]]:
    """Random subsets: layer 0 keeps one expert, layer 1 keeps all, others random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for info in family.blocks(model):
        n = info.num_experts
        if info.index == 0:
            out.append([int(torch.randint(n, (1,), generator=g))])
        elif info.index == 1:
            out.append(list(range(n)))
        else:
            k = int(torch.randint(1, n + 1, (1,), generator=g))
            out.append(sorted(torch.randperm(n, generator=g)[:k].tolist()))
    return out
