"""RunMonitor on a terminal: bars over rounds, clients and the final evaluation (no run needed)."""

from __future__ import annotations

import io

from rich.console import Console

from fedmoe.engine.records import ClientRecord, RoundRecord
from fedmoe.progress import RunMonitor, round_line, round_row


def _rec(cid: int, loss: float, error: str = "") -> ClientRecord:
    return ClientRecord(client_id=cid, task="tc", stage=1, loss=loss, score=0.5, num_examples=10, bytes_down_base=0,
                        bytes_down=2**20, bytes_up=2**20, peak_memory_bytes=0, predicted_memory_bytes=0,
                        budget_bytes=0, num_experts=4, steps=1, error=error)


def _round(rnd: int) -> RoundRecord:
    clients = [_rec(0, 1.0), _rec(1, 3.0), _rec(2, 99.0, error="boom")]
    return RoundRecord(round=rnd, stage=1, sampled=[0, 1, 2], clients=clients, wall_time_s=1.0, bytes_down_base=0,
                       bytes_down=3 * 2**20, bytes_up=3 * 2**20, actions=[], theta={}, skipped={})


def test_round_line_averages_surviving_clients_only():
    row = round_row(_round(0), 4, elapsed=10.0, eta=30.0)
    assert (row["clients"], row["failed"], row["loss"]) == (3, 1, 2.0)
    assert round_line(row, 4) == ("round 1/4  stage 1  clients 2/3 ok  loss 2.0000  score 0.5000  down 3.00 MiB "
                                  "(+0.00 MiB base)  up 3.00 MiB  elapsed 10s  eta 30s")


def test_terminal_monitor_draws_rounds_clients_and_final_evaluation(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    mon = RunMonitor(console, tmp_path, ["csv"])
    mon.start(2, 0)
    for rnd in range(2):
        mon.round_start(rnd, 1, 3)
        for cid in range(3):
            mon(rnd, 1, cid, _rec(cid, 1.0))
        mon.round_done(_round(rnd))
    mon.evaluating(6)
    for cid in range(6):
        mon.evaluated(cid)
    mon.finish({"scores": {"tc": {"accuracy": 0.5}}, "rounds": 2})
    text = buf.getvalue()
    assert "final evaluation" in text and "6/6" in text and "2/2" in text and "3/3" in text
    assert "round 1/2" not in text  # the plain lines are for non-terminals only
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3
    assert "tc,accuracy,0.5" in (tmp_path / "final_scores.csv").read_text()
