"""The measuring process's set-up: glibc's allocator (mmap threshold, trimming), a warm-up through
the training operations, and one rehearsal step before the first measured client turn
(docs/memory.md, "How a turn is measured"). Each runs once per process."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """``gc.collect()`` and glibc ``malloc_trim(0)``: give freed heap pages back to the OS so a
    following RSS baseline does not count memory the next allocation would reuse."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


#: glibc ``M_MMAP_THRESHOLD`` where memory is measured: one page. Requests of a page or more get
#: their own mapping, so freed tensors leave resident memory at once. At 64 KiB (the first setting)
#: a tiny model's small tensors still came from the heap, whose fragmentation the peak counted:
#: ``tiny-switch-transformers`` at 8 × 64 measured 11.6–12.7 MiB per turn for 9.7–11.2 MiB priced
#: (ratio 0.80–0.90); at 4 KiB price / measured 0.91–1.08, a ``minilm-moe-8e`` turn unchanged (± 0.6 MiB)
#: and no slower (benchmarks/memory/client_turns.md, docs/memory.md).
MMAP_THRESHOLD_BYTES = 1 << 12


def use_mmap_for_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, threshold)``: serve allocations of ``threshold`` or more with
    their own ``mmap``, returned to the OS on free. Without it glibc raises the threshold
    dynamically (up to 32 MiB) and freed tensors stay in the heap, so RSS peaks include heap
    fragmentation. :func:`prepare_process` sets it where memory is measured (it slows large
    allocations a little, so it is not set otherwise); returns False where unavailable."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_MMAP_SET: list[bool] = []


def prepare_process(device: str | torch.device | None = "auto") -> None:
    """Once per process, on CPU: large allocations served by their own mappings
    (:func:`use_mmap_for_large_allocations`) and :func:`warm_up_training`. Call it *before* the
    process's first large allocations (the engine does so when ``engine.measure_memory`` is on,
    before it loads the model): glibc serves a request from a free heap chunk that fits before it
    considers ``mmap``, so a heap that earlier work left fragmented (loading the model, HFedMoE's
    selection pass over the full MoE) would keep feeding training from freed, trimmed pages and the
    turn's peak would count that fragmentation (measured: an HFedMoE turn on the stand-in, 651 MiB
    above its baseline with the threshold set after the selection pass, 300 MiB with it set first).
    :func:`measure_client_turn` calls it too (a no-op after the first call)."""
    if _resolve_device(device).type == "cuda" or _MMAP_SET:
        return
    _MMAP_SET.append(use_mmap_for_large_allocations())
    warm_up_training()
    # what exists now (imported modules, classes, the warm-up's caches) lives as long as the process:
    # moved out of the collector's generations, so the full collection before every measured turn
    # (release_free_memory) does not walk it again (~0.23 s per turn after `transformers`' imports)
    gc.collect()
    gc.freeze()


_REHEARSED: list[bool] = []


def rehearse_once(fn: Callable[[], Any]) -> None:
    """Run ``fn`` the first time this is called in the process (later calls do nothing), with the
    random states of torch, NumPy and ``random`` restored afterwards, so that runs stay identical
    whether or not memory is measured. The engine passes one local step on a copy of the first
    turn's sub-MoE (:func:`fedmoe.engine.client.run_client`): the math libraries keep buffers from
    their first use at the model's shapes, which :func:`warm_up_training`'s small layers cannot set
    up (``tiny-mixtral`` from ``configs/tiny.toml``: the process's first turn measured 9.7 MiB, the
    later ones 7.0–7.9 MiB)."""
    import random

    import numpy as np

    if _REHEARSED:
        return
    _REHEARSED.append(True)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        fn()
    random.setstate(py_state)
    np.random.set_state(np_state)
    release_free_memory()


def warm_up_training() -> None:
    """One training step of a few tiny layers through the operations client training uses
    (embedding, norms, SDPA and materialised attention, activations, dropout, top-k routing with
    one-hot/where/index_add dispatch, bmm/einsum, log-softmax and cross-entropy with ignored
    labels, masked selection, clipping, AdamW, LR schedule), before the first measured turn of a
    process: the one-time set-up these pay on first use (autograd engine, kernels' and optimiser's
    first-call allocations) belongs to the process, not to whichever client turn runs first
    (docs/memory.md: on ``tiny-mixtral`` at 8 × 64 the first turn measured 19.3 MiB with the
    linear-only warm-up, 10.9 MiB with this one, later turns 8–9.5 MiB)."""
    import torch.nn.functional as F

    with torch.random.fork_rng(devices=[]):  # the layers' initialisation leaves the caller's RNG stream alone
        emb, lin, ln = nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        params = [*emb.parameters(), *lin.parameters(), *ln.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        x = ln(emb(torch.randint(0, 16, (2, 4))))
        q = lin(x).view(2, 4, 2, 4).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, q, q, is_causal=True) + torch.softmax(q @ q.transpose(-1, -2), -1) @ q
        h = att.transpose(1, 2).reshape(2, 4, 8)
        h = F.silu(h) * F.gelu(h) + F.relu(h)
        h = F.dropout(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), 0.1, training=True)
        logits = h @ emb.weight.t()
        weights, idx = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
        labels = torch.tensor([1, 2, -100, 3, 4, -100, 5, 6])
        loss = F.cross_entropy(logits.view(-1, 16), labels, ignore_index=-100)
        logp = torch.log_softmax(logits.float(), -1).view(-1, 16)[labels != -100]
        loss = loss + logp.masked_fill(~torch.isfinite(logp), 0.0).sum() * 1e-3 + (logits.gather(-1, idx) * weights).sum() * 1e-3
        flat = h.reshape(-1, 8)
        _, tok = torch.where(F.one_hot(idx[..., 0].reshape(-1), 16).permute(1, 0) > 0)  # (expert, token) pairs
        routed = torch.zeros_like(flat).index_add(0, tok, flat.index_select(0, tok) * 2.0)
        mixed = torch.bmm(flat.view(2, 4, 8), lin.weight.expand(2, 8, 8)) + torch.einsum("bsh,oh->bso", flat.view(2, 4, 8), lin.weight)
        ordered, _ = torch.sort(flat, -1)
        loss = loss + routed.sum() + mixed.sum() + ordered.cumsum(-1).clamp(-1, 1).sum() + torch.cat([flat, flat]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
