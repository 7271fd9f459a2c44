"""Quiet by default: the upstream warnings and Flower records fedmoe filters, and only those."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from fedmoe.flower.logs import quiet_flower
from fedmoe.quiet import filter_upstream_warnings


def _warnings_of_wrapping(filtered: bool) -> list[str]:
    from fedmoe.moe.lora import apply_lora
    from fedmoe.moe.models import build_tiny

    model = build_tiny("tiny-mixtral")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if filtered:
            filter_upstream_warnings()
        apply_lora(model, 2, 4)
        warnings.warn("a warning about the user's own input", UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_peft_future_warning_is_filtered_and_others_still_show():
    noisy = _warnings_of_wrapping(filtered=False)
    assert any("is_gradient_checkpointing" in m for m in noisy)  # the upstream warning exists here
    quiet = _warnings_of_wrapping(filtered=True)
    assert not any("is_gradient_checkpointing" in m for m in quiet)
    assert "a warning about the user's own input" in quiet


def test_flower_logs_once_without_colour_or_deprecation_notice(capfd):
    from flwr.common.logger import FLOWER_LOGGER, log, warn_deprecated_feature

    root = logging.getLogger()
    extra = logging.StreamHandler()  # as if something configured the root logger (Ray does)
    root.addHandler(extra)
    saved = (FLOWER_LOGGER.propagate, list(FLOWER_LOGGER.filters),
             [(h, list(h.filters), getattr(h, "colored", None), h.level) for h in FLOWER_LOGGER.handlers])
    import sys

    streams = [(h, h.setStream(sys.stderr)) for h in FLOWER_LOGGER.handlers if isinstance(h, logging.StreamHandler)]
    try:  # (the handlers' streams point at this test's stderr: an earlier test may have left them elsewhere)
        quiet_flower(stream_is_tty=False)
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        log(logging.INFO, "[fedmoe] round 0 done")
        log(logging.DEBUG, "[fedmoe] debug detail")
        warn_deprecated_feature("Some other feature is deprecated")
        propagated = FLOWER_LOGGER.propagate
    finally:
        root.removeHandler(extra)
        FLOWER_LOGGER.propagate, FLOWER_LOGGER.filters = saved[0], saved[1]
        for h, stream in streams:
            h.setStream(stream)
        for h, filters, colored, level in saved[2]:
            h.filters, h.level = filters, level
            if colored is not None:
                h.colored = colored
    err = capfd.readouterr().err
    assert err.count("[fedmoe] round 0 done") == 1
    assert "debug detail" not in err and "run_simulation" not in err and "\x1b" not in err
    assert "Some other feature is deprecated" in err  # only the listed record is dropped
    assert propagated is False


def test_importing_fedmoe_leaves_the_environment_alone():
    """`import fedmoe` (a library user's program) changes no environment variable; the process
    policy is applied by the `fedmoe` command and the Flower apps only."""
    from tests.conftest import REPO

    code = ("import os, json; before = dict(os.environ); import fedmoe, fedmoe.engine.run, fedmoe.moe.models; "
            "print(json.dumps([before == dict(os.environ), 'THP_MEM_ALLOC_ENABLE' in os.environ])); "
            "import fedmoe.flower; print(os.environ.get('THP_MEM_ALLOC_ENABLE'), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.splitlines() == ["[true, false]", "1 PASSIVE"], out.stdout + out.stderr
