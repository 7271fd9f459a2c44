"""FLEx server side (docs/algorithms.md §4.3): only shared tensors are FedAvg'd; side tensors stay home."""

from __future__ import annotations

import pytest
import torch

from fedmoe.algorithms.flex import (
    SIDE_MARKERS,
    FlexServerState,
    aggregate,
    client_payload,
    init_state,
    is_personal,
    merge_personal,
    record_choice,
    split_state,
)
from fedmoe.core.aggregation import ClientUpdate

ATTN = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
HEAD = "tc_head.weight"
SIDE_E = "model.layers.0.mlp.side_expert.inner.gate_up_proj"
SIDE_G = "model.layers.0.mlp.side_gate.weight"


def _client_state(v: float) -> dict[str, torch.Tensor]:
    return {ATTN: torch.full((2, 3), v), HEAD: torch.full((4,), v), SIDE_E: torch.full((1, 2), v), SIDE_G: torch.full((1, 3), v)}


def test_split_and_merge() -> None:
    assert SIDE_MARKERS == ("side_expert", "side_gate")
    assert is_personal(SIDE_E) and is_personal(SIDE_G) and not is_personal(ATTN)
    assert not is_personal("model.layers.0.mlp.experts.gate_up_proj")
    st = _client_state(1.0)
    shared, personal = split_state(st)
    assert set(shared) == {ATTN, HEAD} and set(personal) == {SIDE_E, SIDE_G}
    assert shared[ATTN] is st[ATTN]
    assert merge_personal(shared, personal) == st
    with pytest.raises(ValueError):
        merge_personal(st, personal)


def test_aggregate_fedavg_of_shared_only() -> None:
    state = init_state(_client_state(0.0))
    assert set(state.shared) == {ATTN, HEAD} and set(client_payload(state)) == {ATTN, HEAD}
    before = {k: v.clone() for k, v in state.shared.items()}
    ups = []
    for cid, (n, v) in enumerate([(1, 1.0), (3, 5.0)]):
        shared, _ = split_state(_client_state(v))
        if cid == 1:
            shared.pop(HEAD)  # a key sent by client 0 only
        ups.append(ClientUpdate(cid, n, dense=shared))
    new = aggregate(state, ups)
    assert new.shared[ATTN].tolist() == [[4.0] * 3] * 2  # (1·1 + 3·5) / 4
    assert new.shared[HEAD].tolist() == [1.0] * 4  # only client 0 sent it: its copy
    assert new.round == 1 and state.round == 0
    assert all(torch.equal(state.shared[k], before[k]) for k in before)  # input untouched
    untouched = aggregate(state, [ClientUpdate(0, 1, dense={ATTN: torch.ones(2, 3)})])
    assert untouched.shared[HEAD] is state.shared[HEAD]


def test_aggregate_rejects_personal_and_unknown() -> None:
    state = init_state(_client_state(0.0))
    with pytest.raises(ValueError, match="personal"):
        aggregate(state, [ClientUpdate(0, 1, dense=_client_state(1.0))])
    with pytest.raises(ValueError, match="personal"):
        aggregate(state, [ClientUpdate(0, 1, experts={(0, 0): [torch.ones(1)]})])
    with pytest.raises(ValueError):
        aggregate(state, [ClientUpdate(0, 1, dense={"model.unknown": torch.ones(1)})])


def test_record_choice() -> None:
    state = FlexServerState()
    new = record_choice(state, 3, [2, 0])
    assert new.personal_experts == {3: [2, 0]} and state.personal_experts == {}
    assert new.events[-1]["kind"] == "choose"
