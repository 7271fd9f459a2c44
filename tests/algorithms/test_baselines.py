"""Baselines (docs/algorithms.md §2): FedAvg, FedProx, SCAFFOLD, randomMoE — exact numbers on hand-made examples."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from fedmoe.algorithms import ALGORITHM_NAMES, algorithm_spec, fedavg, fedprox, random_moe, scaffold
from fedmoe.algorithms.fedmoe import MemoryTable
from fedmoe.core.search import set_bytes
from fedmoe.errors import BudgetError


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_registry_has_the_baselines():
    for name in ("fedavg", "fedprox", "scaffold", "random_moe"):
        assert name in ALGORITHM_NAMES
    assert importlib.import_module(algorithm_spec("scaffold").server) is scaffold
    assert importlib.import_module(algorithm_spec("random_moe").server) is random_moe


# -- FedAvg ---------------------------------------------------------------------------------
def test_fedavg_weighted_average_per_key():
    glob = {"a": t(0, 0), "b": t(5), "c": t(7, 7)}
    ups = [fedavg.ClientWeights(0, 1, {"a": t(1, 2), "b": t(1)}), fedavg.ClientWeights(1, 3, {"a": t(5, 6)})]
    state = fedavg.aggregate(fedavg.FedAvgServerState(glob), ups)
    assert state.round == 1
    assert torch.equal(state.weights["a"], t(4, 5))  # (1·[1,2] + 3·[5,6]) / 4
    assert torch.equal(state.weights["b"], t(1))  # one sender (a task head): its copy
    assert state.weights["c"] is glob["c"]  # nobody sent it: unchanged
    assert torch.equal(glob["a"], t(0, 0))  # input untouched


def test_fedavg_rejects_unknown_keys_and_shapes():
    glob = {"a": t(0, 0)}
    with pytest.raises(ValueError, match="absent"):
        fedavg.average(glob, [fedavg.ClientWeights(3, 1, {"z": t(1)})])
    with pytest.raises(ValueError, match="Client 4 sent `a` with shape"):
        fedavg.average(glob, [fedavg.ClientWeights(4, 1, {"a": t(1)})])


# -- FedProx ----------------------------------------------------------------------------------
def test_proximal_term_value_and_gradient():
    w = t(1.0, 2.0).requires_grad_(True)
    anchor = {"w": t(0.0, 1.0)}
    term = fedprox.proximal_term({"w": w}, anchor, mu=0.5)
    assert term.item() == 0.5  # 0.25 · (1² + 1²)
    term.backward()
    assert torch.equal(w.grad, t(0.5, 0.5))  # μ (w − w_global)
    assert torch.equal(fedprox.proximal_gradient({"w": w}, anchor, 0.5)["w"], t(0.5, 0.5))


def test_fedprox_local_gradient_includes_mu_times_drift():
    """Local loss F(w) = Σ x·w plus the hook: ∇ = x + μ (w − w_global), w_global snapshotted at step 0."""
    x = t(3.0, -1.0)
    w = torch.nn.Parameter(t(1.0, 1.0))
    hook = fedprox.ProximalTerm(mu=0.25)
    named = {"w": w}
    opt = torch.optim.SGD([w], lr=0.5)
    grads = []
    for _ in range(2):
        loss = (x * w).sum() + hook(named)
        opt.zero_grad()
        loss.backward()
        grads.append(w.grad.clone())
        opt.step()
    assert torch.equal(hook.anchor["w"], t(1.0, 1.0))
    assert torch.equal(grads[0], x)  # w = w_global at step 0: no proximal pull yet
    # after one step w = [1, 1] − 0.5·[3, −1] = [−0.5, 1.5]; ∇ = x + 0.25·([−0.5, 1.5] − [1, 1])
    assert torch.equal(grads[1], t(3.0 - 0.375, -1.0 + 0.125))


def test_fedprox_mu_zero_adds_exactly_nothing():
    w = torch.nn.Parameter(t(0.3, -0.7))
    hook = fedprox.ProximalTerm(mu=0.0, keys={"w"})
    hook({"w": w})
    with torch.no_grad():
        w.add_(t(0.1, 0.2))
    loss = (w * t(2.0, 3.0)).sum()
    total = loss + hook({"w": w})
    assert total.item() == loss.item()
    total.backward()
    assert torch.equal(w.grad, t(2.0, 3.0))
    with pytest.raises(ValueError):
        fedprox.ProximalTerm(mu=-1.0)


# -- SCAFFOLD ---------------------------------------------------------------------------------
def test_scaffold_corrected_gradient():
    assert torch.equal(scaffold.corrected_gradient(t(1, 1), t(0.5, 0), t(0.25, 0.25)), t(0.75, 1.25))


def test_scaffold_client_variate_update_option_ii():
    # c_k⁺ = c_k − c + (w_g − w_k)/(K η) with K = 2, η = 0.25: (w_g − w_k)/0.5 = [1, −2]
    new, delta = scaffold.client_variate_update({"w": t(1, 0)}, {"w": t(0.5, 0.5)}, {"w": t(1, 1)},
                                                {"w": t(0.5, 2)}, steps=2, lr=0.25)
    assert torch.equal(new["w"], t(1.5, -2.5))
    assert torch.equal(delta["w"], t(0.5, -2.5))
    # no local step: unchanged, Δc = 0; a key missing from c_k counts as c_k = 0
    new, delta = scaffold.client_variate_update({}, {"w": t(0.5, 0.5)}, {}, {}, steps=0, lr=0.25)
    assert torch.equal(new["w"], t(0, 0)) and torch.equal(delta["w"], t(0, 0))


def test_scaffold_server_update():
    w = {"w": t(1, 1), "h": t(9)}
    state = scaffold.ScaffoldServerState({"w": t(0.5, 0.5), "h": t(0)}, {"w": 4, "h": 2})
    ups = [scaffold.ScaffoldUpload(0, 1, {"w": t(2, 0)}, {"w": t(1, 2)}),
           scaffold.ScaffoldUpload(1, 3, {"w": t(0, 4)}, {"w": t(3, -2)})]
    new_w, new_state = scaffold.server_update(w, state, ups)
    # w + (1/4)(w_0 − w) + (3/4)(w_1 − w) = [1, 1] + [0.25 − 0.75, −0.25 + 2.25]
    assert torch.equal(new_w["w"], t(0.5, 3.0))
    # c + (|S|/N)·mean Δc = [0.5, 0.5] + (2/4)·([4, 0]/2)
    assert torch.equal(new_state.c["w"], t(1.5, 0.5))
    assert new_w["h"] is w["h"] and torch.equal(new_state.c["h"], t(0))  # nobody sent them
    assert new_state.round == 1 and torch.equal(state.c["w"], t(0.5, 0.5))  # input untouched
    half, _ = scaffold.server_update(w, state, ups, server_lr=0.5)
    assert torch.equal(half["w"], t(0.75, 2.0))


def test_scaffold_server_variate_stays_mean_of_client_variates():
    gen = torch.Generator().manual_seed(0)
    n_clients = 5
    state = scaffold.init_server_state({"w": torch.zeros(3)}, n_clients)
    c_k = {k: {"w": torch.zeros(3)} for k in range(n_clients)}
    w = {"w": torch.zeros(3)}
    for rnd in range(4):
        ups = []
        for k in (rnd % n_clients, (rnd + 2) % n_clients):
            w_k = {"w": w["w"] + torch.randn(3, generator=gen)}
            c_k[k], delta = scaffold.client_variate_update(c_k[k], state.c, w, w_k, steps=3, lr=0.1)
            ups.append(scaffold.ScaffoldUpload(k, 10 + k, w_k, delta))
        w, state = scaffold.server_update(w, state, ups)
        mean = sum(c["w"] for c in c_k.values()) / n_clients
        torch.testing.assert_close(state.c["w"], mean)


def test_scaffold_client_hook_corrects_gradients_and_reports_variates():
    p = torch.nn.Parameter(t(1.0, 1.0))
    q = torch.nn.Parameter(t(0.0))  # no gradient from the loss: gets c − c_k as its gradient
    client = scaffold.ScaffoldClient({"p": t(0.25, 0.25), "q": t(1.0)}, {"p": t(0.5, 0.0)})
    named = {"p": p, "q": q}
    opt = torch.optim.SGD([p, q], lr=0.5)
    (p * t(1.0, 1.0)).sum().backward()
    client.before_step(named)
    assert torch.equal(p.grad, t(0.75, 1.25)) and torch.equal(q.grad, t(1.0))
    opt.step()  # p = [1 − 0.375, 1 − 0.625], q = −0.5
    new, delta = client.finish(steps=1, lr=0.5)
    # c_k⁺ = c_k − c + (w_g − w_k)/(1·0.5) = corrected gradient − c + c_k … = g (plain SGD, one step)
    assert torch.equal(new["p"], t(1.0, 1.0)) and torch.equal(new["q"], t(0.0))
    assert torch.equal(delta["p"], t(0.5, 1.0)) and torch.equal(delta["q"], t(0.0))


def test_scaffold_client_leaves_non_parameters_alone():
    """A key of ``c`` that the loop does not train (a buffer of a full-fine-tuning state): Δc = 0."""
    p = torch.nn.Parameter(t(1.0))
    client = scaffold.ScaffoldClient({"p": t(0.5), "buf": t(2.0)}, {"buf": t(3.0)})
    p.grad = t(1.0)
    client.before_step({"p": p})
    assert torch.equal(p.grad, t(1.5))
    with torch.no_grad():
        p.sub_(t(0.25))
    new, delta = client.finish(steps=1, lr=0.5)
    assert torch.equal(new["buf"], t(3.0)) and torch.equal(delta["buf"], t(0.0))
    assert torch.equal(new["p"], t(0.0)) and torch.equal(delta["p"], t(0.0))  # 0 − 0.5 + 0.25/0.5


# -- randomMoE ------------------------------------------------------------------------------
def _table() -> MemoryTable:
    eb = np.full((3, 8), 10.0)
    eb[1] = 7.0
    return MemoryTable(100.0, eb, {0: 160.0, 1: 200.0, 2: 260.0, 3: 300.0})


def test_random_moe_sets_respect_budgets_and_differ_across_seeds():
    table, alpha = _table(), 0.9
    runs = [random_moe.initial_sets(table, np.random.default_rng(seed), alpha=alpha) for seed in (0, 1)]
    for state in runs:
        assert sorted(state.expert_sets) == [0, 1, 2, 3] and not state.excluded
        for cid, sets in state.expert_sets.items():
            assert all(len(layer) >= 1 for layer in sets)
            d = table.dense_bytes  # the cap: α's share of the budget above the dense part
            assert set_bytes(sets, table.expert_bytes, d) <= d + alpha * (table.budgets[cid] - d)
    assert runs[0].expert_sets != runs[1].expert_sets
    again = random_moe.initial_sets(table, np.random.default_rng(0), alpha=alpha)
    assert again.expert_sets == runs[0].expert_sets  # deterministic given the generator


def test_random_moe_unfit_client_fails_loudly_or_is_excluded():
    table = _table()
    table.budgets[9] = 110.0  # dense 100 + one expert per layer (27) > 100 + 0.9·(110 − 100) = 109
    with pytest.raises(BudgetError, match="Client 9"):
        random_moe.initial_sets(table, np.random.default_rng(0))
    state = random_moe.initial_sets(table, np.random.default_rng(0), exclude_unfit=True)
    assert 9 in state.excluded and 9 not in state.expert_sets
