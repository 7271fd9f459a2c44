"""HFedMoE's routing pass and FLEx's expert distances count real tokens only (issue #15).

Both go through the engine's own batches (:func:`~fedmoe.engine.strategies.hfedmoe.client_batches`,
``train.eval_batch_size`` rows, padded to the batch's longest row) and, for HFedMoE, the
strategy's configure exchange (:meth:`HFedMoEStrategy._select`'s routing pass on the wrapped full
MoE). On tiny-switch-transformers the decoder's padded label positions and the encoder/decoder
masks are what used to leak in.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.config import load_config
from fedmoe.engine.run import Run
from fedmoe.engine.strategies.hfedmoe import client_batches, routing_pass
from fedmoe.moe.graft import expert_distances
from tests.conftest import REPO

FAMILIES = ["tiny-switch-transformers", "tiny-mixtral", "minilm-moe-4e"]


def _run(shared_data, tmp_path, name: str, algorithm: str, eval_batch_size: int, target_len: int = 6) -> Run:
    cfg = load_config(REPO / "configs" / "tiny.toml", [
        f'data.data_dir="{shared_data}"', f'model.name="{name}"', "data.max_examples_per_task=36",
        "setting.num_clients=3", "federation.clients_per_round=3", "engine.measure_memory=false",
        f"algorithm={algorithm}", f"train.eval_batch_size={eval_batch_size}", f"data.max_target_len={target_len}",
        "data.max_seq_len=200",  # long enough that byte-tokenised items differ in length (padding)
    ])
    out = tmp_path / f"{name}-{algorithm}-{eval_batch_size}"
    out.mkdir()
    return Run(cfg, out)


@pytest.mark.parametrize("name", FAMILIES)
def test_hfedmoe_router_stats_invariant_to_eval_batch_size(shared_data, tmp_path, name):
    stats = {}
    for bs in (1, 8):
        run = _run(shared_data, tmp_path, name, "hfedmoe", bs)
        scorer, _ = run.strategy._scorer(run)
        stats[bs] = {cid: routing_pass(scorer, run, run.clients[cid], 12) for cid in sorted(run.clients)}
    for cid, one in stats[1].items():
        for i, (a, b) in enumerate(zip(one, stats[8][cid], strict=True)):
            assert a.rows > 0 and a.rows == b.rows, (cid, i)
            np.testing.assert_array_equal(b.counts, a.counts, err_msg=f"client {cid} layer {i}")
            np.testing.assert_allclose(b.usage(), a.usage(), atol=1e-6, rtol=0, err_msg=f"client {cid} layer {i}")
            np.testing.assert_allclose(b.max_g, a.max_g, atol=1e-6, rtol=0)
            np.testing.assert_allclose(b.sum_xlogx, a.sum_xlogx, atol=1e-6 * a.rows, rtol=0)


@pytest.mark.parametrize("name", ["tiny-switch-transformers", "tiny-mixtral"])
def test_flex_distances_are_over_real_tokens(shared_data, tmp_path, name):
    """d = Σ_batches ‖MoE(X) − E_e(X)‖_F over real tokens, so a batch's term is the root of the
    sum of its examples' squared terms (each example alone, no padding): the oracle."""
    got = {}
    for bs in (1, 8):
        run = _run(shared_data, tmp_path, name, "flex", bs, target_len=12)  # TC labels differ in length
        client = run.clients[min(run.clients)]
        got[bs] = [expert_distances(run.base, run.family, [b]) for b in client_batches(run.ctx, client, 16)]
    singles = np.stack(got[1])  # [examples, L, E]
    expect = sum(np.sqrt((singles[i : i + 8] ** 2).sum(axis=0)) for i in range(0, len(singles), 8))
    np.testing.assert_allclose(sum(got[8]), expect, rtol=1e-5)
