"""train.gradient_checkpointing: same gradients, a cheaper memory plan, and a run through `fedmoe run`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from fedmoe.moe.lora import apply_lora
from fedmoe.moe.memory.checkpointing import enable_gradient_checkpointing
from fedmoe.moe.memory.measure import make_batch
from fedmoe.moe.models import build_tiny
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_checkpointing_gives_the_same_loss_and_gradients(name):
    base = build_tiny(name)
    batch = make_batch(base, 2, 16)
    grads = []
    for ck in (False, True):
        m = copy.deepcopy(base)
        if ck:
            enable_gradient_checkpointing(m)
        torch.manual_seed(0)  # same LoRA init both times
        pm = apply_lora(m, 4, 8)
        pm.train()
        out = pm(**batch)
        out.loss.backward()
        grads.append((out.loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}))
        if ck:
            assert pm.get_base_model().is_activation_checkpointing
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-5)


def test_memory_plan_with_checkpointing_keeps_budgets_and_lowers_costs(shared_data, tmp_path):
    from fedmoe.config import load_config
    from fedmoe.engine.budget import plan_memory
    from fedmoe.moe.families import family_of
    from fedmoe.moe.memory.checkpointing import checkpointing_saving

    args = [f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", "data.max_seq_len=128"]
    model = build_tiny("tiny-mixtral")
    fam = family_of(model)
    off = plan_memory(model, fam, load_config(REPO / "configs" / "tiny.toml", args), list(range(6)))
    on = plan_memory(model, fam, load_config(REPO / "configs" / "tiny.toml", [*args, "train.gradient_checkpointing=true"]),
                     list(range(6)))
    assert on.table.budgets == off.table.budgets
    from fedmoe.moe.memory import SMOOTHED_CE_LOSS

    cfg = load_config(REPO / "configs" / "tiny.toml", args)  # priced at the run's target length, as plan_memory
    d_saving, e_saving = checkpointing_saving(model, 8, 128, "lora", 8, fam, factors=SMOOTHED_CE_LOSS,
                                              adam_impl="for-loop", target_len=cfg.data.max_target_len)
    # fused expert LoRA runs unmerged (no merged expert weight is held), so checkpointing saves
    # activations of the dense part; the expert units keep what they hold
    assert d_saving > 0 and (e_saving >= 0).all()
    from fedmoe.engine.budget import RUNTIME_SLACK

    assert off.table.dense_bytes - on.table.dense_bytes == pytest.approx(d_saving * RUNTIME_SLACK)
    assert (off.table.expert_bytes - on.table.expert_bytes) == pytest.approx(e_saving * RUNTIME_SLACK)
    assert off.full_bytes - on.full_bytes == pytest.approx((d_saving + e_saving.sum()) * RUNTIME_SLACK)
    kept = [[0, 1], [2, 3, 4]]
    assert on.submodel_bytes(kept) < off.submodel_bytes(kept)


def test_fedmoe_run_with_gradient_checkpointing_trains_as_without(shared_data, tmp_path):
    from fedmoe.cli import app

    losses = {}
    for ck in ("false", "true"):
        out = tmp_path / ck
        # FedAvg with budgets that fit the whole MoE either way: the same clients and models in both
        # runs (with tight budgets the cheaper plan changes which experts are kept, as it should);
        # 2 local steps: the load-balance hook must ignore the layers recomputed in backward
        sets = [f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", 'algorithm="fedavg"',
                "federation.rounds=2", "setting.budget_low=2.0", "setting.budget_high=3.0", "train.max_local_steps=2", "engine.measure_memory=false",
                f"train.gradient_checkpointing={ck}"]
        res = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                                       *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 0, res.output
        rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        assert all(not c.get("error") and c["steps"] == 2 for r in rounds for c in r["clients"]), rounds
        losses[ck] = [c["loss"] for r in rounds for c in r["clients"]]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)


def test_auto_checkpointing_goes_to_clients_it_buys_experts(shared_data, tmp_path):
    """train.gradient_checkpointing="auto" through `fedmoe run`: a stage-2 client trains with checkpointing
    exactly when that keeps it more experts than the same run without checkpointing keeps (oracle: the
    `false` run's expert counts); stage-1 turns (full MoE, memory-rich clients) never use it; budgets
    are the same; the choice is recorded per turn in rounds.jsonl."""
    from fedmoe.cli import app

    runs = {}
    for ck in ("false", "auto"):
        out = tmp_path / ck
        sets = [f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", "federation.rounds=1",
                "engine.measure_memory=false", f"train.gradient_checkpointing={ck}"]
        res = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                                       *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 0, res.output
        rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        assert all(not c["error"] for r in rounds for c in r["clients"])
        runs[ck] = {(r["round"], c["client_id"]): (r["stage"], c) for r in rounds for c in r["clients"]}
    assert runs["auto"].keys() == runs["false"].keys()
    gained = kept_plain = 0
    for key, (stage, c) in runs["auto"].items():
        plain = runs["false"][key][1]
        assert c["budget_bytes"] == plain["budget_bytes"]  # budgets stay the devices' memory
        assert not plain["gradient_checkpointing"]
        if stage == 1:
            assert not c["gradient_checkpointing"] and c["num_experts"] == plain["num_experts"]
            continue
        assert c["gradient_checkpointing"] == (c["num_experts"] > plain["num_experts"]), (c, plain)
        assert c["num_experts"] >= plain["num_experts"]
        assert c["predicted_memory_bytes"] <= c["budget_bytes"]
        gained += c["gradient_checkpointing"]
        kept_plain += not c["gradient_checkpointing"]
    assert gained and kept_plain  # this setting has both kinds of client (tiny.toml's budgets 0.3–1.5)


def test_hfedmoe_auto_checkpointing_raises_c_k(shared_data, tmp_path):
    """HFedMoE honours train.gradient_checkpointing="auto": a client trains with checkpointing exactly
    when its C_k under the checkpointed costs is larger than the C_k the same run gives it without
    (oracle: the `false` run's C_k); budgets are unchanged; the turn fits its budget."""
    from fedmoe.cli import app

    runs = {}
    for ck in ("false", "auto"):
        out = tmp_path / ck
        sets = [f'data.data_dir="{shared_data}"', "data.max_examples_per_task=36", 'algorithm="hfedmoe"',
                "federation.rounds=1", "engine.measure_memory=false", f"train.gradient_checkpointing={ck}"]
        res = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                                       *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "summary.json").read_text())
        turns = {c["client_id"]: c for line in (out / "rounds.jsonl").read_text().splitlines()
                 for c in json.loads(line)["clients"]}
        runs[ck] = ({int(k): v for k, v in summary["hfedmoe_budgets"].items()}, turns)
    (c_plain, plain), (c_auto, auto) = runs["false"], runs["auto"]
    assert c_auto.keys() == c_plain.keys() and auto.keys() == plain.keys()
    assert all(c_auto[k] >= c_plain[k] for k in c_plain)
    assert any(c_auto[k] > c_plain[k] for k in c_plain) and any(c_auto[k] == c_plain[k] for k in c_plain)
    for cid, c in auto.items():
        assert not plain[cid]["gradient_checkpointing"] and not c["error"]
        assert c["budget_bytes"] == plain[cid]["budget_bytes"]
        assert c["gradient_checkpointing"] == (c_auto[cid] > c_plain[cid]), (cid, c_auto, c_plain)
        assert c["num_experts"] >= plain[cid]["num_experts"]
        assert c["predicted_memory_bytes"] <= c["budget_bytes"]
    assert any(c["gradient_checkpointing"] for c in auto.values())


def _client_loop_loss(model, data):
    """The client loop's loss (fedmoe.train.loop): smoothed CE on shifted logits, output held through backward."""
    from fedmoe.train.loop import smoothed_ce

    out = model(**data)
    logits, labels = out.logits, data["labels"]
    return smoothed_ce(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), 0.1), out


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_checkpointed_prediction_is_within_10_percent_of_the_measured_peak():
    """Steps with checkpointing on (client-loop loss, zero_grad(set_to_none=True), for-loop AdamW),
    measured in fresh processes, against the table minus checkpointing_saving: LoRA and full FT."""
    from functools import partial

    from fedmoe.moe.memory import SMOOTHED_CE_LOSS, measure_in_subprocess, training_table
    from fedmoe.moe.memory.checkpointing import build_checkpointed, checkpointing_saving

    over = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=8192,
                num_attention_heads=8, num_key_value_heads=4, num_local_experts=8)
    b, s = 4, 256
    model = build_tiny("tiny-mixtral", **over)
    batch = make_batch(model, b, s)
    jobs, predicted = [], []
    for ft in ("lora", "full"):
        jobs.append(dict(model_factory=partial(build_checkpointed, "tiny-mixtral", **over), batch=batch, finetune=ft,
                         lora_r=8, loss_fn=_client_loop_loss, set_to_none=True, adam_impl="for-loop",
                         warmup=partial(build_tiny, "tiny-mixtral")))
        kw = dict(factors=SMOOTHED_CE_LOSS, adam_impl="for-loop")
        d, e = checkpointing_saving(model, b, s, ft, 8, **kw)
        predicted.append(training_table(model, b, s, ft, 8, **kw).total() - d - float(e.sum()))
    measured = measure_in_subprocess(jobs, num_threads=1)
    ratios = [p / m.peak_bytes for p, m in zip(predicted, measured, strict=True)]
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios
