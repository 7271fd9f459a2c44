"""Training-memory model (docs/algorithms.md §1.1 step 3): exact per-unit weights, additivity of
the training cost, saved-activation counts, and the ±20 % acceptance against measured peaks."""

from __future__ import annotations

import sys
from functools import partial

import numpy as np
import pytest
import torch

from fedmoe.errors import ModelError
from fedmoe.moe import memory as M
from fedmoe.moe.families import family_of
from fedmoe.moe.lora import apply_lora
from fedmoe.moe.models import build_tiny, tiny_names
from fedmoe.moe.slicing import extract, layout_of
from tests.moe.helpers import random_kept

MiB = 2**20


def _model_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _kept_at_least_top_k(model: torch.nn.Module, seed: int) -> list[list[int]]:
    """Random expert sets keeping at least top-k experts per layer (so top-k is not clipped)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for info in family_of(model).blocks(model):
        n = int(torch.randint(info.top_k, info.num_experts + 1, (1,), generator=g))
        out.append(sorted(torch.randperm(info.num_experts, generator=g)[:n].tolist()))
    return out


# -- weights per unit ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", tiny_names())
def test_param_bytes_by_unit_sums_to_the_model_bytes_exactly(name):
    model = build_tiny(name)
    family = family_of(model)
    table = M.param_bytes_by_unit(model, family)
    assert table.total() == _model_bytes(model)
    # independently, through the aggregation layout: experts own their slices and router rows
    state = model.state_dict()
    layout = layout_of(model, family)
    for (i, j), slices in layout.experts.items():
        expected = sum(s.read(state).numel() * s.read(state).element_size() for s in slices + layout.routers[(i, j)])
        assert table.expert_bytes[i, j] == expected
    for i, n in enumerate(table.num_experts):
        assert len(set(table.expert_bytes[i, :n].tolist())) == 1  # experts of a layer are alike
    assert table.dense_bytes > 0


@pytest.mark.parametrize("name", tiny_names())
def test_sub_moe_weights_are_dense_plus_kept_experts(name):
    model = build_tiny(name)
    family = family_of(model)
    kept = random_kept(family, model, seed=3)
    full = M.param_bytes_by_unit(model, family)
    sub = extract(model, kept)
    part = M.param_bytes_by_unit(sub.model, family)
    assert part.dense_bytes == full.dense_bytes
    for i, ids in enumerate(kept):
        for local, g in enumerate(ids):
            assert part.expert_bytes[i, local] == full.expert_bytes[i, g]
    assert full.submodel_bytes(kept) == part.total() == _model_bytes(sub.model)


# -- the training formula -------------------------------------------------------------------------
@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("name", tiny_names())
def test_training_estimate_is_dense_plus_kept_experts_exactly(name, finetune):
    model = build_tiny(name)
    kept = _kept_at_least_top_k(model, seed=5)
    table = M.training_table(model, 2, 16, finetune, lora_r=4)
    assert table.total() == M.estimate_for_model(model, 2, 16, finetune, lora_r=4)
    sub = extract(model, kept)
    assert table.submodel_bytes(kept) == M.estimate_for_model(sub.model, 2, 16, finetune, lora_r=4)
    assert M.submodel_training_bytes(table.dense_bytes, [table.expert_bytes[i, j] for i, ids in enumerate(kept)
                                                         for j in ids]) == table.submodel_bytes(kept)
    # training costs more than holding the weights, for every unit
    weights = M.param_bytes_by_unit(model)
    assert table.dense_bytes > weights.dense_bytes
    assert (table.expert_bytes >= weights.expert_bytes).all()
    if finetune == "full":  # weights + gradients + two AdamW states at least
        assert (table.expert_bytes >= 4 * weights.expert_bytes).all()


@pytest.mark.parametrize("name", tiny_names())
def test_trained_elements_match_what_peft_and_full_training_train(name):
    model = build_tiny(name)
    lora = M.memory_breakdown(model, 2, 16, "lora", lora_r=4)
    pm = apply_lora(build_tiny(name), r=4, alpha=8)
    assert lora["trained_elements"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    full = M.memory_breakdown(model, 2, 16, "full")
    assert full["trained_elements"] == sum(p.numel() for p in model.parameters())
    for bd in (lora, full):
        parts = bd["weights"] + bd["trained"] + bd["adapters"] + bd["activations"]
        assert abs(parts - bd["total"]) <= len(M.param_bytes_by_unit(model).expert_bytes.ravel()) + 1


def test_formula_terms_by_hand():
    """``W_frozen + W_train + G + O + A`` with AdamW's two states, in the trained dtype or fp32."""
    assert M.training_bytes(frozen_param_bytes=100, trainable_param_bytes=40, trainable_elements=10,
                            activation_bytes=7) == 100 + 40 + 40 + 2 * 4 * 10 + 7
    # bf16 trained tensors with fp32 AdamW states; foreach AdamW adds one trained-size temporary
    assert M.training_bytes(frozen_param_bytes=0, trainable_param_bytes=20, trainable_elements=10, activation_bytes=0,
                            state_bytes=4, optimizer_transient=1.0) == 20 + 20 + 80 + 20


def test_estimate_grows_with_batch_sequence_and_rank():
    model = build_tiny("tiny-mixtral")
    base = M.estimate_for_model(model, 2, 32, "lora", 4)
    assert M.estimate_for_model(model, 4, 32, "lora", 4) > base
    assert M.estimate_for_model(model, 2, 64, "lora", 4) > base
    assert M.estimate_for_model(model, 2, 32, "lora", 16) > base
    assert M.estimate_for_model(model, 2, 32, "full") > base
    # the project's label-smoothed loss keeps more logits-sized tensors than HF's cross-entropy
    assert M.estimate_for_model(model, 2, 32, "lora", 4, factors=M.SMOOTHED_CE_LOSS) > base


def test_unit_training_bytes_is_the_engine_interface():
    model = build_tiny("tiny-qwen2-moe")
    family = family_of(model)
    dense, experts = M.unit_training_bytes(model, family, batch_size=2, seq_len=16, finetune="lora", lora_r=4)
    assert isinstance(dense, float) and experts.dtype == np.float64
    table = M.training_table(model, 2, 16, "lora", 4, family, factors=M.SMOOTHED_CE_LOSS,
                             adam_impl="foreach" if torch.cuda.is_available() else "for-loop")
    assert dense == table.dense_bytes and np.array_equal(experts, table.expert_bytes)


def test_table_rejects_bad_sets_and_peft_models():
    model = build_tiny("tiny-mixtral")
    table = M.param_bytes_by_unit(model)
    with pytest.raises(ValueError):
        table.submodel_bytes([[0]])
    with pytest.raises(ValueError):
        table.submodel_bytes([[0], [99]])
    with pytest.raises(ModelError):
        M.param_bytes_by_unit(apply_lora(build_tiny("tiny-mixtral"), r=2, alpha=4))
    with pytest.raises(ValueError):
        M.estimate_for_model(model, 2, 16, "qlora")  # type: ignore[arg-type]


# -- activations kept for backward, against autograd's saved tensors --------------------------------
MIDSIZE = {
    "tiny-mixtral": dict(hidden_size=64, intermediate_size=128, vocab_size=512),
    "tiny-qwen2-moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                           shared_expert_intermediate_size=96, vocab_size=512),
    "tiny-qwen3-moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, head_dim=16, vocab_size=512),
    "tiny-olmoe": dict(hidden_size=64, intermediate_size=96, vocab_size=512),
    "tiny-deepseek-v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, vocab_size=512),
    "tiny-switch-transformers": dict(d_model=64, d_kv=16, d_ff=128, vocab_size=512),
    "tiny-bert-moe": dict(hidden_size=64, intermediate_size=128, vocab_size=512, max_position_embeddings=128),
}


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    kwargs = M._forward_kwargs(model, batch)
    if getattr(model.config, "model_type", "") == "bert_moe":
        kwargs = {"input_ids": batch["input_ids"], "task": "tc"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**kwargs)
    del out
    return sum(seen.values())


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("name", tiny_names())
def test_kept_activations_match_autograds_saved_tensors(name, finetune):
    overrides = MIDSIZE.get(name)
    if overrides is None:
        pytest.skip(f"no mid-size config for {name}")
    model = build_tiny(name, **overrides)
    model.train()
    batch = M.make_batch(model, 2, 32)
    bd = M.memory_breakdown(model, 2, 32, finetune, lora_r=4)
    # the formula's activations minus what autograd does not hold: the backward working set and
    # the logits the model returns
    predicted = bd["activations"] - bd["act_working_set"] - bd["act_logits"]
    trained = apply_lora(model, r=4, alpha=8) if finetune == "lora" else model
    saved = _saved_bytes(trained, batch)
    assert predicted == pytest.approx(saved, rel=0.08), (name, finetune, predicted / saved)


# -- measuring ---------------------------------------------------------------------------------------
linux_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM needs Linux /proc")


@linux_proc
def test_measure_peak_cpu_counts_a_transient_allocation():
    size = 64 * MiB

    def work() -> float:
        t = torch.ones(size // 4)
        return float(t[0])

    result, peak = M.measure_peak(work, device="cpu")
    assert result == 1.0
    assert 0.9 * size <= peak <= size + 16 * MiB


def test_measure_peak_without_proc_falls_back_to_getrusage(monkeypatch):
    from fedmoe.moe.memory import measure as MM

    monkeypatch.setattr(MM, "_reset_hwm", lambda: False)
    result, peak = M.measure_peak(lambda: 7, device="cpu")
    assert result == 7 and isinstance(peak, int) and peak >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_peak_cuda_counts_a_transient_allocation():
    size = 64 * MiB

    def work() -> None:
        t = torch.ones(size // 4, device="cuda")
        del t

    _, peak = M.measure_peak(work, device="cuda")
    assert size <= peak <= size + 4 * MiB


#: two Mixtral models from the real config class, of clearly different sizes (weights ~42 vs
#: ~134 MiB; one training step ~160–680 MiB), big enough that allocator noise is small
ACCEPTANCE = {
    "mixtral-H256": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=8192,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8),
    "mixtral-H512": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, vocab_size=8192,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8),
}
BATCH, SEQ, RANK = 2, 64, 8


@linux_proc
def test_estimate_is_within_20_percent_of_the_measured_peak():
    """One steady-state AdamW step (full fine-tune and LoRA) of each size, measured one after
    another in a fresh process (each measurement resets the high-water mark)."""
    jobs, cases = [], []
    for key, overrides in ACCEPTANCE.items():
        factory = partial(build_tiny, "tiny-mixtral", **overrides)
        model = factory()
        batch = M.make_batch(model, BATCH, SEQ)
        for ft in ("full", "lora"):
            jobs.append(dict(model_factory=factory, batch=batch, finetune=ft, lora_r=RANK, device="cpu",
                             warmup=partial(build_tiny, "tiny-mixtral")))
            cases.append((key, ft, M.estimate_for_model(model, BATCH, SEQ, ft, RANK)))
    measured = M.measure_in_subprocess(jobs)
    assert measured[2].weight_bytes > 2.5 * measured[0].weight_bytes  # clearly different sizes
    report = [(key, ft, round(predicted / MiB, 1), round(m.peak_bytes / MiB, 1), round(predicted / m.peak_bytes, 3))
              for (key, ft, predicted), m in zip(cases, measured, strict=True)]
    for key, ft, pred, meas, ratio in report:
        assert 0.8 <= ratio <= 1.2, f"{key} {ft}: predicted {pred} MiB, measured {meas} MiB ({ratio}); all: {report}"


def test_smoothed_ce_copies_are_charged_on_supervised_tokens_only():
    """Causal LMs supervise at most ``target_len`` tokens per row: the smoothed loss's kept rows
    (``loss_supervised``) and their backward gradients (``loss_supervised_grads``) shrink to
    those; transformers' own log-softmax stays on every token; the shifted logits copy is a
    forward transient, not on top of the backward working set."""
    from fedmoe.moe.memory import SMOOTHED_CE_LOSS, memory_model_for
    from fedmoe.moe.meta import load_shapes

    model, family = load_shapes("tiny-mixtral", "float32")
    b, s, t = 4, 32, 5
    full = memory_model_for(model, b, s, "lora", 8, family, factors=SMOOTHED_CE_LOSS)
    part = memory_model_for(model, b, s, "lora", 8, family, factors=SMOOTHED_CE_LOSS, target_len=t)
    assert (full.supervised_tokens(), part.supervised_tokens()) == (b * s, b * t)
    vocab, n = full.shape.vocab, b * s
    ft, pt = full.activation_terms(), part.activation_terms()
    assert ft["head"] - pt["head"] == (n - b * t) * vocab * 4 * 1.0
    assert ft["working_set"] == n * vocab * 4 * 3.0  # every token supervised: 3 row gradients > 2 full-size
    assert pt["working_set"] == n * vocab * 4 * 2.0  # few supervised: the two full-size gradients
    assert {k: v for k, v in ft.items() if k not in ("head", "working_set")} == \
        {k: v for k, v in pt.items() if k not in ("head", "working_set")}


@pytest.mark.parametrize(("kind", "target"), [("causal", None), ("causal", 5), ("seq2seq", None)])
def test_smoothed_ce_live_bytes_match_its_factors(kind: str, target: int | None) -> None:
    """The client loop's loss (``fedmoe.train.loop.task_loss``) on a leaf logits tensor: the peak
    of the tensors it creates (forward and backward, counted per storage as torch allocates and
    frees them) is the log-softmax ``4·V·logits`` per token + the kept supervised rows
    ``4·V·loss_supervised`` + the larger backward working set ``max(4·V·loss_grads per token,
    4·V·loss_supervised_grads per supervised token)`` + the leaf's gradient — without the
    shifted copy (``a·V·shift_copy``, freed before backward) — up to per-token index/mask bytes."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from fedmoe.moe.memory import SMOOTHED_CE_LOSS as f
    from fedmoe.train.loop import task_loss

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.cur = self.peak = 0

        def _free(self, key: int, n: int) -> None:
            if self.live.pop(key, None) is not None:
                self.cur -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key, n = st.data_ptr(), st.nbytes()
                    if n and key not in self.live:
                        self.live[key] = n
                        self.cur += n
                        weakref.finalize(st, self._free, key, n)
                        self.peak = max(self.peak, self.cur)
            return out

    b, s, v = 4, 33, 64
    torch.manual_seed(0)
    logits = torch.randn(b, s, v, requires_grad=True)
    labels = torch.randint(0, v, (b, s))
    if target:
        labels[:, : s - target] = -100
    with Live() as live:
        task_loss(kind, type("Out", (), {"logits": logits})(), {"labels": labels}, 0.1).backward()
    n = b * (s - 1) if kind == "causal" else b * s  # tokens the loss sees (causal: shifted)
    sup = int((labels[:, 1:] != -100).sum()) if kind == "causal" else n
    expected = (4 * v * n * f.logits + 4 * v * sup * f.loss_supervised
                + max(4 * v * n * f.loss_grads, 4 * v * sup * f.loss_supervised_grads) + logits.numel() * 4)
    assert expected <= live.peak <= expected + 24 * n, (live.peak, expected)
    assert live.peak < expected + 4 * v * n * f.shift_copy  # the shifted copy is not on top


def test_bf16_lora_charges_peft_fp32_input_cast_per_adapted_attention_linear():
    """Under bf16, peft casts each adapted linear's input to the fp32 adapters and keeps it:
    ``4·H`` bytes per token, layer and adapted attention linear, nothing when dtypes match."""
    from fedmoe.moe.memory import SMOOTHED_CE_LOSS, memory_model_for
    from fedmoe.moe.meta import load_shapes

    model, family = load_shapes("tiny-mixtral", "float32")
    b, s, linears = 2, 24, 4.0
    kw = dict(factors=SMOOTHED_CE_LOSS, act_bytes=2)
    cast = memory_model_for(model, b, s, "lora", 8, family, adapter_bytes=4, **kw).activation_terms(linears)
    same = memory_model_for(model, b, s, "lora", 8, family, adapter_bytes=2, **kw).activation_terms(linears)
    sh = memory_model_for(model, b, s, "lora", 8, family, **kw).shape
    assert cast["lora"] - same["lora"] == len(sh.layers) * b * s * 4 * sh.hidden * linears
    assert {k: v for k, v in cast.items() if k != "lora"} == {k: v for k, v in same.items() if k != "lora"}
