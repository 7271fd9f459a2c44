"""What training a (sub-)MoE costs in memory, and how to measure it (docs/algorithms.md §1.1 step 3).

FedMoE's θ search prices a submodel as ``mem(dense part) + Σ mem(kept experts)`` and compares
it with a client's budget. ``mem`` is what *training* the submodel costs — weights, gradients
and optimiser state of what is trained, and the activations of one batch — not just weights.
This module states that cost as a formula, splits it per unit so that it is additive, and
measures real peaks to check it (tests/moe/test_memory.py, benchmarks/memory/).

The formula (one training step, at its peak)
--------------------------------------------
::

    mem = W_frozen + W_train + G + O + A

    W_frozen  weights that are not trained: every base weight under LoRA, nothing under full FT
    W_train   trained tensors: every weight (full FT), or the LoRA adapters + router weights +
              task heads (LoRA); adapters are fp32 (peft's default ``autocast_adapter_dtype``)
    G       = W_train                        one gradient per trained element, same dtype
    O       = n_states · s · n_train         AdamW: n_states = 2 (exp_avg, exp_avg_sq); s = bytes per
                                             state element — the trained tensor's dtype by default,
                                             as torch's AdamW; pass 4 for fp32 master states
            + t · W_train                    optimiser-step temporaries: t = 0 for the fused AdamW and
                                             the for-loop one (one tensor at a time, neglected), t = 1
                                             for the multi-tensor ``foreach`` AdamW (torch's default on
                                             CUDA: one temporary list as large as the trained tensors)
    A       = activations kept for backward + the backward working set at the peak, for a batch of
              B sequences of S tokens (N = B·S), see below.

All five terms are live together in the *steady-state* step: from the second step on the
optimiser state exists during forward/backward, and with ``zero_grad(set_to_none=False)``
gradients stay allocated between steps; the peak is then at the start of the backward pass.
With ``set_to_none=True`` (``fedmoe.train.loop``) gradients only appear while activations are
being freed, so the true peak is lower — by up to ``G`` (≈ W under full FT, ≈ nothing under
LoRA): the formula is an upper bound there.

Activations ``A``
-----------------
Counted per token from the configuration (:class:`ModelShape`), in bytes; ``a`` = activation
dtype bytes (the parameter dtype), ``4`` where the model computes in fp32 regardless. Each count
is a tensor that the native ``transformers`` module keeps for backward (read off
``torch.autograd.graph.saved_tensors_hooks``, checked per family in the tests); the factors are
in :class:`ActivationFactors`:

================== =============================================================== =====================
term               bytes per token (per layer unless noted)                        factors
================== =============================================================== =====================
norms              RMSNorm ``H·(4·norm_fp32 + a·norm_act)`` (fp32 input, normalised, norm_fp32 = 1,
                   output); LayerNorm ``2·a·H + 8`` (input, output, mean/rstd)       norm_act = 2 (1 LoRA)
attention          ``a·attn_q·(q + o) + a·attn_kv·(k + v)/2``, + ``4·n_heads``       attn_q = 1, attn_kv = 2
                   (log-sum-exp) for fused SDPA kernels
attention scores   materialised (eager, or SDPA with dropout): ``n_heads·S_kv·4``    scores = 1
                   per query, + mask and dropped copy (``2a``) with dropout
q/k norms, MLA     norms on q/k (Qwen3, OLMoE), latent norms and copies (DeepSeek-V3)
router             ``4·router·E_kept`` (fp32 probabilities) — per kept expert         router = 1
routed experts     ``top_k · (a·(exp_h·H + exp_i·I) + 28)`` (28: sort/gather         exp_h = 2,
                   indices, routing weight) + ``12·top_k`` (top-k ids and weights)   exp_i = 4 SwiGLU,
                                                                                   1 ReLU, 2 GELU
shared/dense MLP   ``a·mlp·I`` (+ ``a·(H + 1)`` for Qwen2-MoE's gated shared expert) mlp = 4 (3 if frozen)
dropout            ``a·H`` per residual dropout (CPU keeps a float mask)
LoRA linear        ``a·r`` per adapted linear (its ``lora_A`` output), + ``4·H`` per
                   adapted attention linear when ``a ≠ 4`` (peft's fp32 input cast)
logits, loss       once, ``V·(a + 4·logits)`` (returned logits, log-softmax), + the   logits = 1,
                   loss's extras ``4·V·loss_extra``, + per *supervised* token         see presets
                   ``4·V·loss_supervised``
================== =============================================================== =====================

plus the **backward working set** at the peak, the largest of: the loss gradients
``4·loss_grads·V`` per output token (log-softmax and logits gradients) or
``4·loss_supervised_grads·V`` per supervised token (a masking loss's gradients on its rows),
or the loss's forward transient ``a·shift_copy·V`` per output token (a shifted logits copy,
freed before backward), one materialised
attention's score gradients, one MoE layer's expert-activation gradients. LoRA on fused
experts is computed unmerged (:mod:`fedmoe.moe.expert_lora`): no merged weight ``W + B·A`` is
kept (``lora_merge · W_expert`` per kept expert applied only to peft's merged path, which
:func:`fedmoe.moe.lora.apply_lora` no longer takes); each adapted expert matrix keeps its
``r``-wide ``lora_A`` output per routed token, as per-module experts do.

The loss terms depend on the loss implementation: :data:`HF_LOSS` is ``transformers``' own
cross-entropy (``out.loss``); :data:`SMOOTHED_CE_LOSS` is the project's client loop
(``fedmoe.train.loop``): its label-smoothed cross-entropy on shifted logits copies the logits
(causal LMs; a forward transient), keeps its supervised rows' log-probabilities and works on
them in backward, and the model's own loss runs alongside (the loop passes ``labels``) — counted
from the live tensors of a client-loop step (docs/memory.md, Calibration).

Calibration and accuracy (benchmarks/memory/results.md): the kept-tensor counts match autograd's
saved tensors to 0.998–1.000 for the decoder-only families under full FT (1.01–1.02 under LoRA,
whose first norm keeps less) and within 2.5 % for Switch, DeepSeek-V3 and BERT-MoE
(tests/moe/test_memory.py checks ±8 %). Against measured peaks of the steady-state step (CPU
VmHWM, 7 families, full FT and LoRA): predicted/measured = 0.94–1.02; 0.99–1.02 with MKL's
GEMM-buffer cache off — MKL keeps its packing buffers resident after a GEMM (10–25 MiB here, shows
under full FT), which no tensor accounts for. The project's client loop (:data:`SMOOTHED_CE_LOSS`,
``set_to_none=True``, for-loop AdamW): LoRA 1.01–1.02, full FT 1.05–1.17 (the upper bound above).
Approximations: bf16/fp16 use ``a`` throughout except where fp32 is structural; dropout masks are
counted in ``a`` (CPU keeps float masks, CUDA 1-byte ones); fused SDPA kernels keep no scores.
Not modelled: transient weight gradients of one layer under full FT (a fused expert stack, the
LM head) — they occur after the loss working set is freed and are smaller in these models.

Additive split (the θ search needs ``mem = mem(dense) + Σ_kept mem(expert)``)
----------------------------------------------------------------------------
* **expert (i, j)**: its weight slices and its router rows (+ their gradients and AdamW state
  under full FT); under LoRA its adapter factors (weights, gradients, state), the gradients and
  state of its router rows and its merged weight (fused experts); plus its column of router
  probabilities, ``4·N`` bytes.
* **dense part**: everything else — including the routed experts' activations. Those scale
  with the number of (token, expert) pairs, ``N·top_k`` per MoE layer, not with how many
  experts are kept (the tokens are shared among whichever experts are kept), so they are
  charged once per layer to the dense part with the full model's ``top_k`` — an upper bound
  when a layer keeps fewer than ``top_k`` experts (top-k is clipped). Charging them per
  expert would need each expert's load: a uniform ``top_k/E_kept`` share is not additive (it
  depends on the kept count) and the worst case (every token on every kept expert) overstates
  by ``E_kept/top_k``.

:func:`training_table` gives that split for a concrete model as a :class:`MemoryTable`;
``table.submodel_bytes(kept)`` prices any submodel without building it and equals
:func:`estimate_for_model` of the extracted sub-MoE exactly (when every layer keeps at least
``top_k`` experts). :func:`unit_training_bytes` is the same split in the form
``fedmoe.engine.budget`` asks for.

Measuring
---------
:func:`measure_peak` measures the peak of a callable (CUDA: allocator peak; CPU: the process's
VmHWM high-water mark). :func:`measure_training_step` measures materialising a model and
training it for a steady-state step from a baseline taken *before* the model exists, so weights
are included; :func:`measure_in_subprocess` does so in a fresh process.
"""

# Layout: ``units`` (bytes per element, the additive table, parameter bytes per unit), ``shapes``
# (per-token activation factors and model shapes), ``formula`` (the training-memory model),
# ``table`` (its per-unit split on a concrete model: LoRA targets, the additive table), ``measure``
# (peaks of real steps), ``process`` (the measuring process's set-up). Everything public is
# re-exported here.
from fedmoe.moe.memory.formula import TrainingMemoryModel, memory_model_for, training_bytes
from fedmoe.moe.memory.measure import (
    LossFn,
    StepMeasurement,
    _forward_kwargs,  # noqa: F401 (tests)
    make_batch,
    measure_client_turn,
    measure_in_subprocess,
    measure_peak,
    measure_training_step,
    measure_training_step_subprocess,
    prepare_process,
    ratio,
    rehearse_once,
    release_free_memory,
    tensor_bytes,
    use_mmap_for_large_allocations,
)
from fedmoe.moe.memory.shapes import HF_LOSS, SMOOTHED_CE_LOSS, ActivationFactors, LayerSpec, ModelShape
from fedmoe.moe.memory.table import (
    estimate_for_model,
    memory_breakdown,
    side_expert_training_bytes,
    training_table,
    unit_training_bytes,
)
from fedmoe.moe.memory.units import (
    OPTIMIZER_TRANSIENT,
    ROUTER_TOPK_BYTES,
    ROUTING_INDEX_BYTES,
    AdamImpl,
    Finetune,
    MemoryTable,
    dtype_bytes,
    param_bytes_by_unit,
    submodel_training_bytes,
)

__all__ = [
    "HF_LOSS", "OPTIMIZER_TRANSIENT", "ROUTER_TOPK_BYTES", "ROUTING_INDEX_BYTES", "SMOOTHED_CE_LOSS",
    "ActivationFactors", "AdamImpl", "Finetune", "LayerSpec", "LossFn", "MemoryTable", "ModelShape",
    "StepMeasurement", "TrainingMemoryModel", "dtype_bytes", "estimate_for_model", "make_batch", "measure_client_turn", "measure_in_subprocess", "prepare_process",
    "measure_peak", "measure_training_step", "measure_training_step_subprocess", "memory_breakdown",
    "memory_model_for", "param_bytes_by_unit", "ratio", "rehearse_once", "release_free_memory", "side_expert_training_bytes",
    "submodel_training_bytes",
    "tensor_bytes", "training_bytes", "training_table", "unit_training_bytes", "use_mmap_for_large_allocations",
]
