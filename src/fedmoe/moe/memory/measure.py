"""Measuring real peaks: VmHWM / CUDA allocator peaks, training-step measurements, subprocesses."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import inspect
import math
import os
import resource
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn

from fedmoe.moe.memory.shapes import _lm_vocab
from fedmoe.moe.memory.units import AdamImpl, Finetune, T

# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


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


def _status_kib(field_name: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def measure_peak(fn: Callable[[], T], device: str | torch.device | None = "auto") -> tuple[T, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the peak memory *above* what was in use
    just before ``fn`` started.

    * CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated − memory_allocated``
      before — tensor bytes from the caching allocator (not its reserved-but-free blocks).
    * CPU (Linux): write ``5`` to ``/proc/self/clear_refs`` to reset the VmHWM high-water mark
      to the current RSS, run ``fn``, and return ``VmHWM − VmRSS(before)``. This is resident
      memory, so it includes allocator overheads (malloc headers, alignment, heap fragmentation)
      and anything else the process touches meanwhile (lazily imported modules, thread stacks);
      free heap memory is trimmed first (:func:`release_free_memory`).
    * CPU without ``/proc`` (or no permission to reset it): ``resource.getrusage``'s peak RSS,
      which cannot be reset — the result is ``max(0, ru_maxrss after − ru_maxrss before)``, the
      growth of the process's all-time peak, so it is **less precise**: 0 when ``fn`` stays
      below an earlier peak of the process, and it counts from that peak, not from the memory
      in use before ``fn`` (use a fresh process).
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, max(0, torch.cuda.max_memory_allocated(dev) - before)
    release_free_memory()
    if _reset_hwm():
        before = _status_kib("VmRSS")
        if before is not None:
            result = fn()
            hwm = _status_kib("VmHWM") or before
            return result, max(0, hwm - before) * 1024
    before_max = _ru_maxrss_bytes()
    result = fn()
    return result, max(0, _ru_maxrss_bytes() - before_max)


_MMAP_SET: list[bool] = []


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.numel() == 0:
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure_client_turn(fn: Callable[[], T], device: str | torch.device | None = "auto") -> tuple[T, int]:
    """``(fn(), peak_bytes)`` for one client turn, on the basis client budgets ``M_k`` are stated in
    (docs/memory.md): the memory the turn adds to its process at its peak.

    * CPU: large allocations are served by their own mappings (:func:`use_mmap_for_large_allocations`,
      set once for the process), so freed tensors leave RSS at once and the VmHWM peak follows
      the live tensors plus allocator and runtime overheads; then :func:`measure_peak`.
    * CUDA: ``torch.cuda.empty_cache()``, then the peak of ``max_memory_reserved`` above the
      reserved bytes before — what the caching allocator took from the device, its free-block
      slack included (allocated bytes alone would miss it).
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, max(0, torch.cuda.max_memory_reserved(dev) - before)
    prepare_process(dev)
    return measure_peak(fn, dev)


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


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes, Linux: KiB


@dataclass(frozen=True)
class StepMeasurement:
    """Measured peak of building a model and training it (see :func:`measure_training_step`)."""

    peak_bytes: int
    weight_bytes: int  #: parameters + buffers of the (wrapped) model
    trainable_bytes: int
    trainable_elements: int
    loss: float
    device: str


def make_batch(
    model: nn.Module, batch_size: int, seq_len: int, seed: int = 0, target_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Random token ids for memory measurements: ``input_ids`` + ``labels`` for causal and
    encoder-decoder LMs (``out.loss``); ``input_ids`` only for models without an LM head
    (train those with a ``loss_fn``)."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch_size, seq_len), generator=g)
    if getattr(model.config, "is_encoder_decoder", False):
        tgt = torch.randint(2, vocab, (batch_size, target_len or seq_len), generator=g)
        return {"input_ids": ids, "labels": tgt}
    if _lm_vocab(model) == 0:
        return {"input_ids": ids}
    return {"input_ids": ids, "labels": ids.clone()}


#: ``loss_fn(model, batch)`` → the loss, or ``(loss, *held)``: whatever else it returns (e.g. the
#: model's output) stays alive through backward, as a training loop holds its outputs
LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]


def _forward_kwargs(model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if getattr(base.config, "use_cache", None) is not None and "use_cache" in params:
        data = dict(data, use_cache=False)  # no KV cache while training
    return data


def _train_steps(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    finetune: Finetune,
    lora_r: int,
    lora_alpha: int,
    steps: int,
    lr: float,
    dev: torch.device,
    set_to_none: bool,
    adam_impl: AdamImpl,
    loss_fn: LossFn | None,
) -> StepMeasurement:
    from fedmoe.moe.lora import apply_lora

    model = model_factory().to(dev)
    model.train()
    if finetune == "lora":
        model = apply_lora(model, r=lora_r, alpha=lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw: dict[str, Any] = {"fused": True} if adam_impl == "fused" else {"foreach": adam_impl == "foreach"}
    opt = torch.optim.AdamW(params, lr=lr, **opt_kw)
    data = _forward_kwargs(model, {k: v.to(dev) for k, v in batch.items()})
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        if loss_fn is not None:
            out = loss_fn(model, data)
            loss = out[0] if isinstance(out, tuple) else out
        else:
            out = model(**data)  # held through backward, as a training loop holds its outputs
            loss = out.loss
        loss.backward()
        del out
        opt.step()
    seen: set[int] = set()
    weights = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            weights += t.numel() * t.element_size()
    return StepMeasurement(
        peak_bytes=0, weight_bytes=weights, trainable_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable_elements=sum(p.numel() for p in params), loss=float(loss.detach()), device=str(dev),
    )


def measure_training_step(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    *,
    finetune: Finetune = "full",
    lora_r: int = 8,
    lora_alpha: int = 16,
    steps: int = 2,
    lr: float = 1e-4,
    device: str | torch.device | None = "auto",
    set_to_none: bool = False,
    adam_impl: AdamImpl = "fused",
    warmup: bool | Callable[[], nn.Module] = True,
    loss_fn: LossFn | None = None,
) -> StepMeasurement:
    """Peak memory of materialising ``model_factory()`` and training it, from a baseline taken
    *before* the model exists (so weights count), to compare with :func:`estimate_for_model`.

    One run: build the model (on ``device``), wrap it with LoRA if asked
    (:func:`fedmoe.moe.lora.apply_lora`), create AdamW, then ``steps`` times
    ``zero_grad(set_to_none)`` → forward on ``batch`` → ``out.loss`` (or ``loss_fn(model, batch)``,
    see :data:`LossFn`) → backward → ``step``. The default ``steps=2`` with ``set_to_none=False`` measures the
    *steady-state* step the formula describes: the first step allocates gradients and optimiser
    state, the second runs forward/backward with both allocated.

    ``warmup`` runs the same thing once, unmeasured, beforehand (``True``), or a cheaper one on
    the model a given factory builds (e.g. the family's ``tiny-`` preset) with a 2×8 batch, so
    lazy imports, kernel and thread-pool initialisation are not counted; ``False``: none.
    ``adam_impl="fused"`` falls back to the for-loop AdamW where no fused kernel exists.
    """
    dev = _resolve_device(device)
    impl: AdamImpl = adam_impl if adam_impl != "fused" or dev.type in ("cuda", "cpu") else "for-loop"

    def run(factory: Callable[[], nn.Module], data: Mapping[str, torch.Tensor]) -> StepMeasurement:
        return _train_steps(factory, data, finetune, lora_r, lora_alpha, steps, lr, dev, set_to_none, impl, loss_fn)

    if warmup is True:
        run(model_factory, batch)
    elif callable(warmup):
        small = warmup()
        run(warmup, make_batch(small, 2, 8))
        del small
    release_free_memory()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result, peak = measure_peak(lambda: run(model_factory, batch), dev)
    return replace(result, peak_bytes=peak)


def _subprocess_jobs(jobs: list[dict[str, Any]], num_threads: int | None) -> list[StepMeasurement]:
    use_mmap_for_large_allocations()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    out = []
    for job in jobs:
        job = dict(job)
        factory = job.pop("model_factory")
        batch = job.pop("batch")
        out.append(measure_training_step(factory, batch, **job))
        release_free_memory()
    return out


def measure_in_subprocess(
    jobs: list[dict[str, Any]],
    *,
    num_threads: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900.0,
) -> list[StepMeasurement]:
    """Run :func:`measure_training_step` for each job (its keyword arguments, including
    ``model_factory`` and ``batch``) one after another in one fresh ``spawn``-ed process.

    A fresh process starts with a clean VmHWM and holds no memory of earlier work; there, large
    allocations get their own mappings (:func:`use_mmap_for_large_allocations`) so freed tensors
    leave RSS at once, and every measurement resets the high-water mark, so jobs do not pollute
    each other. Factories must be picklable (a module-level function, or a ``functools.partial``
    of one such as ``partial(build_tiny, "tiny-mixtral", hidden_size=256)``); as with any ``spawn``,
    a calling script must be a file (not stdin) and guard its entry point. ``env``: extra
    environment variables of the child, e.g. ``{"MKL_DISABLE_FAST_MM": "1"}`` to stop MKL from
    caching GEMM buffers (module docstring, "Measuring").
    """
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            future = pool.submit(_subprocess_jobs, list(jobs), num_threads)
            return future.result(timeout=timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_training_step_subprocess(
    model_factory: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    *,
    num_threads: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900.0,
    **kwargs: Any,
) -> StepMeasurement:
    """:func:`measure_training_step` in a fresh process (see :func:`measure_in_subprocess`)."""
    job = dict(kwargs, model_factory=model_factory, batch=dict(batch))
    return measure_in_subprocess([job], num_threads=num_threads, env=env, timeout=timeout)[0]


def ratio(predicted: float, measured: float) -> float:
    """``predicted / measured`` (``inf`` when nothing was measured)."""
    return predicted / measured if measured else math.inf
