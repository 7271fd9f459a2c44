"""Reply fields and the update-norm bound on the Flower message path (:class:`LocalGrid`): the
same rejections as in-process (``tests/engine/test_faults.py``)."""

from __future__ import annotations

import pytest

from fedmoe.flower import keys as K
from fedmoe.flower.client_app import app as client_app
from fedmoe.flower.local import LocalGrid, node_configs
from fedmoe.flower.server_app import run_federated
from fedmoe.flower.settings import AppSettings
from tests.flower.test_local import PARTITIONS, rounds_of, run_config


@pytest.mark.parametrize(("algorithm", "bad_extra"), [
    ("fedmoe", "routing statistics p are not probabilities"),  # no extras: a negative p
    ("scaffold", "holds NaN/Inf values or is not floating point"),  # Δc with NaN
])
def test_flower_rejects_bad_reply_fields(tmp_path, shared_data, algorithm, bad_extra):
    rc = run_config(shared_data)
    rc[K.RUN_OVERRIDES] += (f"; algorithm={algorithm}; federation.clients_per_round=6; engine.max_update_norm=100"
                            + ("; federation.rounds=1" if algorithm == "fedmoe" else ""))
    kinds = {0: "bad_p", 1: "bad_extra", 2: "big_update"}
    rc[K.RUN_INJECT_FAULT] = ",".join(f"1:{cid}:{kind}" for cid, kind in kinds.items())
    run_federated(LocalGrid(client_app, node_configs(PARTITIONS), rc), AppSettings.from_run_config(rc), tmp_path)
    reasons = {"bad_p": "routing statistics p are not probabilities", "bad_extra": bad_extra,
               "big_update": "exceeds engine.max_update_norm = 100"}
    r1 = {c["client_id"]: c for c in rounds_of(tmp_path)[1]["clients"]}
    hit = [cid for cid in kinds if cid in r1]
    assert len(hit) >= 2
    for cid in hit:
        assert reasons[kinds[cid]] in r1[cid]["error"], (kinds[cid], r1[cid]["error"])
        assert r1[cid]["bytes_up"] > 0  # the reply crossed the wire and was rejected on the server
    assert all(c["error"] == "" for cid, c in r1.items() if cid not in kinds)
