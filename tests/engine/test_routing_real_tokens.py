"""p counts real tokens only: a client's reported p does not depend on its eval batch size.

Goes through the engine's client turn (``Run._client``: training, validation, the routing
hooks as production opens them), so padding, encoder/decoder masks and generation steps of
finished sequences are handled on the path every run takes.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.config import load_config
from fedmoe.engine.run import Run
from tests.conftest import REPO


def _replies(shared_data, tmp_path, name: str, eval_batch_size: int) -> dict[int, np.ndarray]:
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'data.data_dir="{shared_data}"', f'model.name="{name}"', "data.max_examples_per_task=36",
        "setting.num_clients=3", "federation.clients_per_round=3", "train.max_local_steps=1",
        "engine.measure_memory=false", f"train.eval_batch_size={eval_batch_size}", "data.max_target_len=6",
        "data.max_seq_len=200",  # long enough that byte-tokenised items differ in length (padding)
    ])
    out = tmp_path / f"{name}-{eval_batch_size}"
    out.mkdir()
    run = Run(cfg, out)
    run._base_bytes = lambda cid, kept: 0  # byte accounting is not under test (tied tensors: issue #14)
    full = [list(range(n)) for n in run.plan.num_experts]
    replies = {}
    for cid in sorted(run.clients):  # one client per task (tc, rc, ts)
        record, _, reply = run._client(cid, full, 1, 0)
        assert not record.error, record.error
        assert len(run.clients[cid].val) >= 2
        replies[cid] = reply.p
    return replies


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-switch-transformers", "minilm-moe-4e"])
def test_p_invariant_to_eval_batch_size(shared_data, tmp_path, name):
    one = _replies(shared_data, tmp_path, name, 1)
    eight = _replies(shared_data, tmp_path, name, 8)
    assert one.keys() == eight.keys()
    for cid in one:
        assert one[cid].sum() > 0
        np.testing.assert_allclose(eight[cid], one[cid], atol=1e-6, rtol=0, err_msg=f"client {cid}")
