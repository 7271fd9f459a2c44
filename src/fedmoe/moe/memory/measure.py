"""Measuring real peaks: VmHWM / CUDA allocator peaks, training-step measurements, subprocesses."""

from __future__ import annotations

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

from fedmoe.moe.memory.process import (  # noqa: F401 (re-exported: the process set-up lives there)
    MMAP_THRESHOLD_BYTES,
    _resolve_device,
    prepare_process,
    rehearse_once,
    release_free_memory,
    use_mmap_for_large_allocations,
    warm_up_training,
)
from fedmoe.moe.memory.shapes import _lm_vocab
from fedmoe.moe.memory.units import AdamImpl, Finetune, T

# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


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
