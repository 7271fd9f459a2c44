"""benchmarks/gpu/check.sh runs end to end at toy size on CPU (so it works before a GPU is at hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and result["device"] == "cpu"
    step = result["step"]
    assert step["dense_step_s"] > 0 and step["moe_step_s"] > 0
    assert step["ratio"] == pytest.approx(step["moe_step_s"] / step["dense_step_s"])
    assert [c["algorithm"] for c in result["cells"]] == ["fedmoe", "fedprox"]
    for c in result["cells"]:
        assert c["rc"] == 0 and c["rounds"] >= 1 and c["scores"], c
