"""Modular aggregation (docs/algorithms.md §1.2 step 4): exact numbers + properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.core.aggregation import ClientUpdate, fedavg, modular_aggregate, normalised_weights, weighted_mean
from fedmoe.core.layout import TensorSlice, UnitLayout


def make_layout() -> UnitLayout:
    """Layer 0: fused experts (row j of ``l0.w``), layer 1: per-module experts."""
    lay = UnitLayout(dense_keys=["attn"])
    for j in range(4):
        lay.experts[(0, j)] = [TensorSlice("l0.w", 0, (j,))]
        lay.routers[(0, j)] = [TensorSlice("l0.router", 0, (j,))]
    for j in range(2):
        lay.experts[(1, j)] = [TensorSlice(f"l1.e{j}.w"), TensorSlice(f"l1.e{j}.b")]
        lay.routers[(1, j)] = [TensorSlice("l1.router", 0, (j,))]
    return lay


def make_global() -> dict[str, torch.Tensor]:
    return {
        "attn": torch.tensor([10.0, 20.0]),
        "l0.w": torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]),
        "l0.router": torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0], [4.0, 4.0, 4.0]]),
        "l1.e0.w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "l1.e0.b": torch.tensor([0.5, 0.5]),
        "l1.e1.w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]),
        "l1.e1.b": torch.tensor([0.25, 0.25]),
        "l1.router": torch.tensor([[9.0, 9.0, 9.0], [8.0, 8.0, 8.0]]),
    }


def row(*vals: float) -> torch.Tensor:
    return torch.tensor([list(vals)])


def make_updates() -> list[ClientUpdate]:
    # expert (0,0): client 1 only; (0,1): clients 1, 2, 3 (n = 1, 3, 4); (0,2): client 2; (0,3): nobody
    return [
        ClientUpdate(
            1, 1, dense={"attn": torch.tensor([1.0, 2.0])},
            experts={(0, 0): [row(1.0, 1.0)], (0, 1): [row(2.0, 2.0)]},
            routers={(0, 0): [row(0.0, 0.0, 1.0)], (0, 1): [row(2.0, 0.0, 0.0)]},
        ),
        ClientUpdate(
            2, 3, dense={"attn": torch.tensor([3.0, 4.0])},
            experts={(0, 1): [row(6.0, 6.0)], (0, 2): [row(4.0, 4.0)]},
            routers={(0, 1): [row(6.0, 0.0, 0.0)], (0, 2): [row(0.0, 4.0, 0.0)]},
        ),
        ClientUpdate(
            3, 4,
            experts={(0, 1): [row(10.0, 10.0)], (1, 0): [torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.tensor([7.0, 8.0])]},
            routers={(0, 1): [row(10.0, 0.0, 0.0)], (1, 0): [row(-9.0, -9.0, -9.0)]},
        ),
    ]


def test_experts_none_one_three_holders_exact() -> None:
    g = make_global()
    out = modular_aggregate(g, make_layout(), make_updates())
    expected = torch.tensor([[1.0, 1.0], [7.5, 7.5], [4.0, 4.0], [0.7, 0.8]])  # (1·2+3·6+4·10)/8 = 7.5
    assert torch.equal(out["l0.w"], expected)
    assert torch.equal(out["l0.w"][3], g["l0.w"][3])  # nobody held (0,3): bit-identical
    assert torch.equal(out["l1.e0.w"], torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))  # one holder: its copy
    assert torch.equal(out["l1.e0.b"], torch.tensor([7.0, 8.0]))
    assert out["l1.e1.w"] is g["l1.e1.w"] and out["l1.e1.b"] is g["l1.e1.b"]  # untouched: shared


def test_router_rows_same_rule_exact() -> None:
    g = make_global()
    out = modular_aggregate(g, make_layout(), make_updates())
    expected = torch.tensor([[0.0, 0.0, 1.0], [7.5, 0.0, 0.0], [0.0, 4.0, 0.0], [4.0, 4.0, 4.0]])
    assert torch.equal(out["l0.router"], expected)
    assert torch.equal(out["l1.router"], torch.tensor([[-9.0, -9.0, -9.0], [8.0, 8.0, 8.0]]))


def test_dense_fedavg_over_senders_only() -> None:
    out = modular_aggregate(make_global(), make_layout(), make_updates())
    assert torch.equal(out["attn"], torch.tensor([2.5, 3.5]))  # (1·[1,2] + 3·[3,4]) / 4; client 3 sent none


def test_inputs_not_mutated() -> None:
    g = make_global()
    snapshot = {k: v.clone() for k, v in g.items()}
    ups = make_updates()
    modular_aggregate(g, make_layout(), ups)
    assert all(torch.equal(g[k], snapshot[k]) for k in g)
    assert torch.equal(ups[0].experts[(0, 0)][0], row(1.0, 1.0))


def test_no_updates_returns_same_tensors() -> None:
    g = make_global()
    out = modular_aggregate(g, make_layout(), [])
    assert out is not g and all(out[k] is g[k] for k in g)


def test_strided_multi_index_slice() -> None:
    lay = UnitLayout(experts={(0, 0): [TensorSlice("a", 1, (0, 2))], (0, 1): [TensorSlice("a", 1, (1, 3))]})
    g = {"a": torch.zeros(2, 4)}
    ups = [ClientUpdate(5, 2, experts={(0, 1): [torch.tensor([[1.0, 2.0], [3.0, 4.0]])]})]
    out = modular_aggregate(g, lay, ups)
    assert torch.equal(out["a"], torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 4.0]]))


def test_bfloat16_averaged_in_float64_and_cast_back() -> None:
    lay = UnitLayout(experts={(0, 0): [TensorSlice("w")]})
    g = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    vals = [torch.tensor([1.0, 1.0 / 3, 257.0]), torch.tensor([2.0, 2.0 / 3, 258.0]), torch.tensor([4.0, 1.0, 259.0])]
    ups = [ClientUpdate(k, n, experts={(0, 0): [v.to(torch.bfloat16)]}) for k, (n, v) in enumerate(zip((1, 2, 5), vals, strict=True))]
    out = modular_aggregate(g, lay, ups)
    want = sum(w / 8 * v.to(torch.bfloat16).double() for w, v in zip((1, 2, 5), vals, strict=True)).to(torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], want)


def test_shape_mismatch_names_client_unit_and_shapes() -> None:
    ups = [ClientUpdate(7, 1, experts={(0, 2): [torch.zeros(1, 3)]})]
    with pytest.raises(ValueError, match=r"Client 7 .*expert \(0, 2\).*\(1, 3\).*\(1, 2\)"):
        modular_aggregate(make_global(), make_layout(), ups)
    ups = [ClientUpdate(8, 1, dense={"attn": torch.zeros(3)})]
    with pytest.raises(ValueError, match=r"Client 8 .*`attn`.*\(3,\).*\(2,\)"):
        modular_aggregate(make_global(), make_layout(), ups)


def test_unknown_unit_key_and_bad_counts_raise() -> None:
    with pytest.raises(ValueError, match=r"Client 1 sent expert \(5, 0\)"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, 1, experts={(5, 0): [row(0.0, 0.0)]})])
    with pytest.raises(ValueError, match="absent from the global state"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, 1, dense={"nope": torch.zeros(1)})])
    with pytest.raises(ValueError, match="slices it per expert"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, 1, dense={"l0.w": torch.zeros(4, 2)})])
    with pytest.raises(ValueError, match="2 tensors"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, 1, experts={(0, 0): [row(0, 0), row(0, 0)]})])
    with pytest.raises(ValueError, match="-1 examples"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, -1)])
    with pytest.raises(ValueError, match="sum to 0"):
        modular_aggregate(make_global(), make_layout(), [ClientUpdate(1, 0, experts={(0, 0): [row(0, 0)]})])


def test_fedavg_exact() -> None:
    states = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)}, {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor(0.0)}]
    out = fedavg(states, [3, 1])
    assert torch.equal(out["a"], torch.tensor([1.5, 3.0]))
    assert torch.equal(out["b"], torch.tensor(3.0))
    with pytest.raises(ValueError, match="different keys"):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])


def test_non_floating_tensors_must_agree() -> None:
    same = [torch.tensor([1, 2]), torch.tensor([1, 2])]
    assert torch.equal(weighted_mean(same, [1, 5]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-floating"):
        weighted_mean([torch.tensor([1, 2]), torch.tensor([1, 3])], [1, 1])


# -- properties ----------------------------------------------------------------------

floats32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
counts = st.lists(st.integers(1, 10_000), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(ws=counts)
def test_normalised_weights_sum_to_one(ws: list[int]) -> None:
    assert abs(sum(normalised_weights(ws)) - 1.0) < 1e-12


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(floats32, min_size=1, max_size=8), ws=counts)
def test_averaging_identical_tensors_returns_them(vals: list[float], ws: list[int]) -> None:
    x = torch.tensor(vals, dtype=torch.float32)
    lay = UnitLayout(dense_keys=["d"], experts={(0, 0): [TensorSlice("e", 0, (1,))]})
    g = {"d": torch.zeros(len(vals)), "e": torch.zeros(3, len(vals))}
    ups = [ClientUpdate(k, n, dense={"d": x.clone()}, experts={(0, 0): [x.clone()[None]]}) for k, n in enumerate(ws)]
    out = modular_aggregate(g, lay, ups)
    # fp32 accumulation (module numerics): within γ_{K+1}·|x| of x, exact for one contributor
    tol = _gamma(len(ws) + 1) * x.abs() + (len(ws) + 1) * 2.0**-149  # + underflow (subnormals)
    assert bool(((out["d"] - x).abs() <= tol).all()) and bool(((out["e"][1] - x).abs() <= tol).all())
    if len(ws) == 1:
        assert torch.equal(out["d"], x) and torch.equal(out["e"][1], x)


def _gamma(n: int) -> float:
    u = 2.0**-24
    return n * u / (1 - n * u)


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_float32_accumulation_within_the_error_bound(k: int) -> None:
    """Against a float64 oracle: |out − Σ w·t| ≤ γ_{K+1}·Σ w·|t|, in place (strided views) and whole."""
    gen = torch.Generator().manual_seed(k)
    counts_ = torch.randint(1, 1000, (k,), generator=gen).tolist()
    ts = [torch.randn(64, 33, generator=gen) * 10 ** torch.randint(-3, 4, (1,), generator=gen).item() for _ in range(k)]
    w = torch.tensor(counts_, dtype=torch.float64) / sum(counts_)
    exact = sum(wi * t.double() for wi, t in zip(w, ts, strict=True))
    bound = _gamma(k + 1) * sum(wi * t.double().abs() for wi, t in zip(w, ts, strict=True))
    lay = UnitLayout(dense_keys=["d"], experts={(0, 0): [TensorSlice("e", 1, (1, 4, 7))]})
    g = {"d": torch.zeros(64, 33), "e": torch.zeros(64, 9)}
    ups = [ClientUpdate(i, n, dense={"d": t}, experts={(0, 0): [t[:, :3]]}) for i, (n, t) in enumerate(zip(counts_, ts, strict=True))]
    out = modular_aggregate(g, lay, ups)
    assert out["d"].dtype == torch.float32
    assert bool(((out["d"].double() - exact).abs() <= bound).all())
    assert bool(((out["e"][:, [1, 4, 7]].double() - exact[:, :3]).abs() <= bound[:, :3]).all())
    assert torch.equal(out["e"][:, [0, 2, 3, 5, 6, 8]], torch.zeros(64, 6))
    err = (out["d"].double() - exact).abs().max()
    assert 0 < err <= 2.0**-20 * max(t.abs().max() for t in ts)  # rounding happened, and it is tiny


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    holders=st.lists(st.sets(st.integers(0, 4), max_size=5), min_size=1, max_size=5),
    ws=counts,
)
def test_unheld_experts_bit_identical_and_means_convex(seed: int, holders: list[set[int]], ws: list[int]) -> None:
    gen = torch.Generator().manual_seed(seed)
    lay = UnitLayout(experts={(0, j): [TensorSlice("w", 0, (j,))] for j in range(5)})
    g = {"w": torch.randn(5, 3, generator=gen)}
    ups = [
        ClientUpdate(k, ws[k % len(ws)], experts={(0, j): [torch.randn(1, 3, generator=gen)] for j in held})
        for k, held in enumerate(holders)
    ]
    out = modular_aggregate(g, lay, ups)
    for j in range(5):
        sent = [u.experts[(0, j)][0] for u in ups if (0, j) in u.experts]
        if not sent:
            assert torch.equal(out["w"][j].view(torch.int32), g["w"][j].view(torch.int32))
        else:
            stack = torch.cat(sent)
            slack = _gamma(len(sent) + 1) * stack.abs().max(0).values + (len(sent) + 1) * 2.0**-149  # fp32 bound
            assert bool((out["w"][j] >= stack.min(0).values - slack).all() and (out["w"][j] <= stack.max(0).values + slack).all())
    assert np.isfinite(out["w"].numpy()).all()
