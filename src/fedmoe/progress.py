"""Progress and metric logs of a run, from one place.

:class:`RunMonitor` is the ``progress`` object :func:`~fedmoe.engine.run.run_experiment` calls:

* on a terminal: a rich progress bar over rounds, one over the clients of the current round,
  and one over the final evaluation;
* otherwise (a file, a pipe, nohup, CI): one plain line per round, flushed at once —
  ``round k/N``, stage, clients ok/sampled, mean loss and score of the surviving clients,
  bytes down (+base) and up, elapsed and ETA — and one line when the final evaluation starts
  and ends. No ANSI codes.

``--log csv,tensorboard,wandb`` adds metric sinks fed the same per-round row and the final
scores: ``metrics.csv`` in the run folder; TensorBoard event files under ``<run>/tensorboard``
(needs the ``tensorboard`` package: the ``logging`` extra); Weights & Biases (needs ``wandb``;
honours ``WANDB_MODE``, and runs offline when ``WANDB_MODE`` is unset and no API key is
configured: no login, no network, nothing printed; the run is under ``<run>/wandb/offline-run-*``,
``wandb sync`` uploads it later).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from fedmoe.errors import ConfigError

LOG_KINDS = ("csv", "tensorboard", "wandb")
ROW_FIELDS = ("round", "stage", "clients", "failed", "loss", "score", "bytes_down", "bytes_down_base", "bytes_up",
              "round_s", "elapsed_s", "eta_s")
CSV_FILE = "metrics.csv"
TB_DIR = "tensorboard"


def parse_logs(text: str | None) -> list[str]:
    """``"csv,tensorboard"`` → ``["csv", "tensorboard"]``; unknown kinds or missing packages
    raise :class:`~fedmoe.errors.ConfigError` before the run starts."""
    kinds = [k.strip().lower() for k in (text or "").split(",") if k.strip()]
    for k in kinds:
        if k not in LOG_KINDS:
            raise ConfigError(f"Unknown log kind `{k}` in --log.", f"use a comma-separated subset of {', '.join(LOG_KINDS)}.")
    if "tensorboard" in kinds and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("`--log tensorboard` needs the tensorboard package, which is not installed.",
                          'pip install -e ".[logging]" (or pip install tensorboard).')
    if "wandb" in kinds and importlib.util.find_spec("wandb") is None:
        raise ConfigError("`--log wandb` needs the wandb package, which is not installed.", "pip install wandb.")
    return list(dict.fromkeys(kinds))


def round_row(rr: Any, total: int, elapsed: float, eta: float) -> dict[str, Any]:
    """The per-round metrics every sink and the plain line share."""
    ok = [c for c in rr.clients if not c.error]
    return {
        "round": rr.round + 1, "stage": rr.stage, "clients": len(rr.clients), "failed": len(rr.clients) - len(ok),
        "loss": sum(c.loss for c in ok) / len(ok) if ok else float("nan"),
        "score": sum(c.score for c in ok) / len(ok) if ok else float("nan"),
        "bytes_down": rr.bytes_down, "bytes_down_base": rr.bytes_down_base, "bytes_up": rr.bytes_up,
        "round_s": rr.wall_time_s, "elapsed_s": elapsed, "eta_s": eta,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def round_line(row: dict[str, Any], total: int) -> str:
    ok = row["clients"] - row["failed"]
    return (f"round {row['round']}/{total}  stage {row['stage']}  clients {ok}/{row['clients']} ok  "
            f"loss {row['loss']:.4f}  score {row['score']:.4f}  down {_mib(row['bytes_down'])} "
            f"(+{_mib(row['bytes_down_base'])} base)  up {_mib(row['bytes_up'])}  "
            f"elapsed {_dur(row['elapsed_s'])}  eta {_dur(row['eta_s'])}")


class _Csv:
    def __init__(self, out: Path, resume: bool) -> None:
        self.path = out / CSV_FILE
        fresh = not (resume and self.path.is_file())
        self.f = self.path.open("w" if fresh else "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=ROW_FIELDS)
        if fresh:
            self.w.writeheader()

    def round(self, row: dict[str, Any]) -> None:
        self.w.writerow(row)
        self.f.flush()

    def final(self, scores: dict[str, dict[str, float]], step: int) -> None:
        with (self.path.parent / "final_scores.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("task", "metric", "value"))
            for task, s in scores.items():
                for k, v in s.items():
                    w.writerow((task, k, v))

    def close(self) -> None:
        self.f.close()


class _TensorBoard:
    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(out / TB_DIR))

    def round(self, row: dict[str, Any]) -> None:
        for k in ("loss", "score", "bytes_down", "bytes_down_base", "bytes_up", "round_s", "failed"):
            self.w.add_scalar(f"round/{k}", row[k], row["round"])
        self.w.flush()

    def final(self, scores: dict[str, dict[str, float]], step: int) -> None:
        for task, s in scores.items():
            for k, v in s.items():
                self.w.add_scalar(f"final/{task}/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # offline: no login, no network, nothing printed (the run's files are under <out>/wandb);
        # no console capture, system-stats sampler, git or code snapshot in either mode
        settings = wandb.Settings(silent=mode != "online", console="off", x_disable_stats=True, disable_git=True,
                                  save_code=False)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedmoe"), dir=str(out), mode=mode,
                              config=config, name=out.name, settings=settings)

    def round(self, row: dict[str, Any]) -> None:
        self.run.log({f"round/{k}": v for k, v in row.items() if k != "round"}, step=row["round"])

    def final(self, scores: dict[str, dict[str, float]], step: int) -> None:
        for task, s in scores.items():
            for k, v in s.items():
                self.run.summary[f"final/{task}/{k}"] = v

    def close(self) -> None:
        self.run.finish()


class RunMonitor:
    """The ``progress`` object of a run: bars or lines, and the metric sinks."""

    def __init__(self, console: Any, out: Path, logs: list[str] | None = None, resume: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        self.console, self.out, self.logs, self.resume, self.config = console, Path(out), logs or [], resume, config
        self.tty = bool(console.is_terminal)
        self.sinks: list[Any] = []
        self.total, self.done, self.t0 = 0, 0, time.perf_counter()
        self.bar = self.rounds_task = self.clients_task = self.eval_task = None

    # -- called by the engine --------------------------------------------------------
    def start(self, total: int, done: int) -> None:
        """The run is set up: ``total`` rounds, ``done`` of them already in the folder (resume)."""
        self.total, self.done, self.first_done, self.t0 = total, done, done, time.perf_counter()
        for kind in self.logs:
            self.sinks.append(_Csv(self.out, self.resume) if kind == "csv" else _TensorBoard(self.out)
                              if kind == "tensorboard" else _Wandb(self.out, self.config or {}))
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.rounds_task = self.bar.add_task("rounds", total=total, completed=done)
        else:
            self._line(f"{total} rounds ({done} done before)" if done else f"{total} rounds")

    def round_start(self, rnd: int, stage: int, num_clients: int) -> None:
        if self.bar is not None:
            desc = f"round {rnd + 1} (stage {stage}) clients"
            if self.clients_task is None:
                self.clients_task = self.bar.add_task(desc, total=num_clients)
            else:
                self.bar.reset(self.clients_task, total=num_clients, description=desc)

    def __call__(self, rnd: int, stage: int, cid: int, rec: Any) -> None:
        """One client's turn ended."""
        if self.bar is not None and self.clients_task is not None:
            self.bar.advance(self.clients_task)

    def round_done(self, rr: Any) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        per = elapsed / max(1, self.done - self.first_done)
        row = round_row(rr, self.total, elapsed, per * max(0, self.total - self.done))
        for s in self.sinks:
            s.round(row)
        if self.bar is not None:
            self.bar.update(self.rounds_task, completed=self.done,
                            description=f"rounds  loss {row['loss']:.3f} score {row['score']:.3f}")
        else:
            self._line(round_line(row, self.total))

    def evaluating(self, num_clients: int) -> None:
        self.t_eval = time.perf_counter()
        if self.bar is not None:
            self.eval_task = self.bar.add_task("final evaluation", total=num_clients)
        else:
            self._line(f"final evaluation: {num_clients} clients")

    def evaluated(self, cid: int) -> None:
        if self.bar is not None and self.eval_task is not None:
            self.bar.advance(self.eval_task)

    def finish(self, summary: dict[str, Any] | None) -> None:
        """The run ended (``summary`` None: it stopped early); close bars and sinks."""
        if self.bar is not None:
            self.bar.stop()
        elif summary is not None and hasattr(self, "t_eval"):
            self._line(f"final evaluation done in {_dur(time.perf_counter() - self.t_eval)}")
        for s in self.sinks:
            if summary is not None:
                s.final(summary["scores"], summary["rounds"])
            s.close()
        self.sinks = []

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        self.console.file.flush()
