"""`fedmoe export` round trips: what plain transformers / peft load equals fedmoe's own model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fedmoe.cli import app
from tests.conftest import REPO

TOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    out = tmp_path_factory.mktemp("exp") / "run"
    sets = [f'data.data_dir="{SHARED_DATA}"', "data.max_examples_per_task=36", "fedmoe.stage1_rounds=1",
            "federation.rounds=1", "train.max_local_steps=2", "engine.measure_memory=false", "train.lr=0.02"]
    res = CliRunner().invoke(app, ["run", str(REPO / "configs" / "tiny.toml"), "--out", str(out),
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    return out


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))


def test_global_adapter_loads_with_plain_peft_and_keeps_routers(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedmoe.export import load_result
    from fedmoe.moe.lora import apply_lora, load_trainable_state

    res = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    # plain user code, nothing from fedmoe
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "x" / "adapter").eval()
    ids = _ids(base.config.vocab_size)
    got = model(input_ids=ids).logits
    # fedmoe's own global model: the base wrapped as in training, the run's global tensors loaded
    run = load_result(run_dir).run
    t = run.cfg.train
    ours = apply_lora(copy.deepcopy(run.base), t.lora_r, t.lora_alpha, t.lora_dropout, run.family)
    load_trainable_state(ours, run.trainables.state)
    want = ours.eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() <= TOL
    # the routers the federation trained travel in the adapter and differ from the base's
    with safe_open(str(tmp_path / "x" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        gates = [k for k in f.keys() if k.endswith("mlp.gate.weight")]
        assert len(gates) == base.config.num_hidden_layers
        g0 = f.get_tensor(gates[0])
    assert not torch.equal(g0, run.base.model.layers[0].mlp.gate.weight)
    without = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "base")(input_ids=ids).logits
    assert (without - want).abs().max().item() > 100 * TOL  # the comparison above can fail


def test_personalised_client_round_trip(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedmoe.engine.client import evaluate_client  # noqa: F401  (the path mirrored below)
    from fedmoe.export import load_result
    from fedmoe.moe.slicing import extract, load_sub_moe

    sets = json.loads((run_dir / "expert_map.json").read_text())
    cid = min(sets, key=lambda c: sum(len(k) for k in sets[c]))  # a client with a real sub-MoE
    res = CliRunner().invoke(app, ["export", str(run_dir), "--client", cid, "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    loaded = load_sub_moe(tmp_path / "c").model  # the documented one call
    assert loaded.__class__.__module__.startswith("transformers.")
    # fedmoe's evaluation model of this client (as evaluate_client builds it), LoRA unmerged
    run = load_result(run_dir).run
    kept = sets[cid]
    assert sum(len(k) for k in kept) < sum(b.num_experts for b in run.family.blocks(run.base))
    sub = extract(run.base, kept, run.family)
    tr = run.strategy.client_trainables(run, int(cid), None)
    model = tr.wrap(sub)
    tr.load(model, tr.for_client(model, sub.expert_map, run.clients[int(cid)].task))
    ids = _ids(run.base.config.vocab_size)
    want = model.eval()(input_ids=ids).logits
    assert (loaded(input_ids=ids).logits - want).abs().max().item() <= TOL
    out = loaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    if len({len(k) for k in kept}) == 1:  # equal counts per layer: plain from_pretrained too
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
        assert (plain(input_ids=ids).logits - want).abs().max().item() <= TOL


def test_export_refuses_unknown_client_and_non_run_folder(run_dir, tmp_path):
    res = CliRunner().invoke(app, ["export", str(run_dir), "--client", "99", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "Client 99 is not in this run" in " ".join(res.output.split())
    assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "is not a finished run folder" in " ".join(res.output.split())
