"""``fedmoe`` command line: ``run``, ``inspect``, ``data describe``, ``report``.

One error policy for every command (:func:`_handle`): user mistakes
(:class:`~fedmoe.errors.FedMoEError`, and the disk or permission errors of the folders the user
chose) print one line — what, where, how to fix — and exit 2; anything else is an internal
error: one line and exit 1. ``--debug`` adds the traceback (never with local variables).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from fedmoe.algorithms import ALGORITHM_NAMES
from fedmoe.errors import FedMoEError

#: OS errors that are the user's to fix (a full disk, a folder they may not write): exit 2
_USER_OS_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                   errno.ENAMETOOLONG}


def _one_line(text: object, limit: int = 600) -> str:
    """``text`` on one line, at most ``limit`` characters, with rich markup escaped."""
    from rich.markup import escape

    text = " ".join(str(text).split())
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def _handle(exc: BaseException) -> int:
    """Print ``exc`` as one line (plus the traceback with ``--debug``); returns the exit code."""
    if DEBUG["on"]:
        err.print_exception(show_locals=False)
    if isinstance(exc, KeyboardInterrupt):
        err.print("[bold red]interrupted[/]", highlight=False)
        return 130
    if isinstance(exc, FedMoEError):
        err.print(f"[bold red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 2
    if isinstance(exc, OSError) and exc.errno in _USER_OS_ERRORS:
        where = f" ({_one_line(exc.filename)})" if exc.filename else ""
        err.print(f"[bold red]error:[/] {_one_line(exc.strerror or exc)}{where}. Fix: free disk space or choose a "
                  "folder you can write (--out); a run that stopped keeps its last checkpoint for --resume.",
                  highlight=False, soft_wrap=True)
        return 2
    err.print(f"[bold red]internal error:[/] {_one_line(f'{type(exc).__name__}: {exc}')} "
              "(run with --debug for the traceback; please report it).", highlight=False, soft_wrap=True)
    return 1


class _App(typer.Typer):
    """Typer app whose every command goes through :func:`_handle` — however it is invoked (the console
    script, ``python -m fedmoe.cli``, or click's test runner, which calls the commands directly)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def wrap(fn):
            @functools.wraps(fn)
            def guarded(*a, **kw):
                try:
                    return fn(*a, **kw)
                except (SystemExit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                    raise
                except BaseException as exc:  # noqa: BLE001 — the one top-level policy
                    raise typer.Exit(_handle(exc)) from None

            register(guarded)
            return fn

        return wrap

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 — errors outside a command (e.g. the callback)
            sys.exit(_handle(exc))


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Personalised federated fine-tuning of MoE LMs.")
data_app = _App(no_args_is_help=True, pretty_exceptions_enable=False, help="Inspect data partitions.")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)
DEBUG = {"on": False}
_RUN_SET_HELP = "override: section.key=value; algorithm=" + " | ".join(ALGORITHM_NAMES)


def _version(value: bool) -> None:
    if value:
        from fedmoe import __version__

        console.print(f"fedmoe {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    DEBUG["on"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedmoe import apply_process_policy

    apply_process_policy()  # before any command imports torch
    from fedmoe.quiet import notices_as_lines, quiet_cli

    quiet_cli()
    notices_as_lines()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="tiny-<family>, a preset, a hub name or a local path")]) -> None:
    """Print the MoE layers of MODEL: experts, top-k, bytes per expert, dense and total bytes
    (built on the meta device: shapes only, no weights are loaded)."""
    from fedmoe.moe.meta import load_shapes
    from fedmoe.moe.slicing import layout_of

    m, family = load_shapes(model)
    state = m.state_dict()
    layout = layout_of(m, family)
    table = Table(title=f"{model}  ({family.name}, {type(m).__name__})")
    for col in ("layer", "module", "experts", "top-k", "bytes/expert", "router"):
        table.add_column(col)
    for b in family.blocks(m):
        ex = sum(s.read(state).numel() * s.read(state).element_size() for s in layout.experts[(b.index, 0)])
        table.add_row(str(b.index), b.path, str(b.num_experts), str(b.top_k), _mib(ex), family.normalisation)
    console.print(table)
    dense = sum(state[k].numel() * state[k].element_size() for k in layout.dense_keys)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    shared = ", ".join(family.shared_experts) or "none"
    console.print(f"dense bytes: {_mib(dense)}   total bytes: {_mib(total)}   "
                  f"parameters: {sum(p.numel() for p in m.parameters()):,}   shared experts: {shared}")
    from fedmoe.moe.slicing import MAP_FILE, ExpertMap

    if (Path(model) / MAP_FILE).is_file():  # a saved sub-MoE: which global experts each layer kept
        emap = ExpertMap.from_json((Path(model) / MAP_FILE).read_text())
        console.print(f"sub-MoE of a model with {emap.global_num_experts} experts per layer; kept global experts: "
                      + "; ".join(f"layer {i}: {ids}" for i, ids in enumerate(emap.kept)))


@app.command()
def models() -> None:
    """What `model.name` (and `fedmoe inspect`) accepts: presets, tiny families, hub names and folders."""
    from fedmoe.moe.models_table import models_tables

    for item in models_tables():
        console.print(item)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_RUN_SET_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", help="output directory (new or empty)")] = Path("runs/latest"),
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory")] = None,
    engine: Annotated[str | None, typer.Option(
        "--engine", help="inprocess (default) or flower-sim (Flower's simulation engine; config key engine.name)",
    )] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the earlier run in --out")] = False,
    log: Annotated[str | None, typer.Option(
        "--log", help="metric logs, comma-separated: csv (metrics.csv), tensorboard (<out>/tensorboard), wandb",
    )] = None,
) -> None:
    """Run an experiment; writes config.toml, rounds.jsonl, summary.json, expert_map.json."""
    from fedmoe.config import load_config
    from fedmoe.errors import ConfigError
    from fedmoe.outdir import INCOMPLETE, after_failure, check_resume_dir, prepare_out

    if resume is not None and engine not in (None, "inprocess"):
        raise ConfigError(f"`--resume` continues in-process runs only (got --engine {engine}).",
                          "resume with --engine inprocess, or start the run again.")
    if resume is not None:
        out, config = resume, resume / "config.toml"
        check_resume_dir(resume)
    if config is None:
        raise ConfigError("No config file given.", "run `fedmoe run CONFIG.toml` or `fedmoe run --resume RUN_DIR`.")
    cfg = load_config(config, [*(set_ or []), *([f'engine.name="{engine}"'] if engine else [])],
                      stored=resume is not None)  # a run's own config.toml: moved keys translated
    from fedmoe.progress import parse_logs

    logs = parse_logs(log)
    if logs and cfg.engine.name != "inprocess":
        raise ConfigError("`--log` works with the in-process engine only.", "drop --log, or use --engine inprocess.")
    created = resume is None and prepare_out(out, overwrite)
    try:
        if cfg.engine.name == "flower-sim":
            from fedmoe.flower.simulation import run_flower_simulation

            summary = run_flower_simulation(cfg, out)
        else:
            from fedmoe.engine.run import run_experiment

            summary = _monitored(cfg, out, logs, resume is not None, run_experiment)
    except BaseException as exc:
        after_failure(out, created, exc)
        raise
    (out / INCOMPLETE).unlink(missing_ok=True)
    table = Table(title="final scores (clients' test splits)")
    table.add_column("task")
    table.add_column("scores")
    for task, scores in summary["scores"].items():
        table.add_row(task, "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    console.print(table)
    console.print(
        f"rounds={summary['rounds']} bytes_down={_mib(summary['bytes_down'])} (+{_mib(summary['bytes_down_base'])} base) "
        f"bytes_up={_mib(summary['bytes_up'])} peak_mem_max={_mib(summary['peak_memory_max'])} "
        f"experts {summary['experts_start'].get('mean', 0):.1f}→{summary['experts_end'].get('mean', 0):.1f} "
        f"wall={summary['wall_time_s']:.0f}s  → {out}"
    )


def _monitored(cfg, out: Path, logs: list[str], resume: bool, run_experiment):
    """Run with the progress bar (terminal) or per-round lines (otherwise) and the --log sinks."""
    from fedmoe.config import config_to_dict
    from fedmoe.progress import RunMonitor

    monitor = RunMonitor(console, out, logs, resume, config_to_dict(cfg))
    summary = None
    try:
        summary = run_experiment(cfg, out, monitor, resume=resume)
    finally:
        monitor.finish(summary)
    return summary


@data_app.command("describe")
def describe(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")] = None,
) -> None:
    """A table per client: task, split sizes, label/cluster histogram, budget; and totals."""
    from fedmoe.data.describe import describe_command
    from fedmoe.engine.budget import attach_budgets

    describe_command(str(config) if config else None, set_ or [], attach_budgets)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories, or folders holding them (searched recursively)")],
    out: Annotated[Path, typer.Option("--out", help="output directory for report.md, report.json, figures/")] = Path(
        "runs/report"),
    final_window: Annotated[int, typer.Option("--final-window", help="points averaged for a curve's final score")] = 1,
    reference: Annotated[str, typer.Option("--reference", help="method whose convergence speed-up is reported")] = "fedmoe",
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="write PNG figures (needs matplotlib)")] = True,
) -> None:
    """Tables 1–2, convergence speed-ups, CVI and figures from finished run directories."""
    from fedmoe.report import build_report

    rep = build_report(run_dirs, out, window=final_window, reference=reference, figures=figures)
    for note in rep.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {rep.markdown}, {rep.json} and {len(rep.figures)} figure(s) under {out / 'figures'}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="folder of a finished `fedmoe run`")],
    out: Annotated[Path, typer.Option("--out", help="new or empty folder to write")],
    client: Annotated[int | None, typer.Option("--client", help="export this client's personalised model")] = None,
) -> None:
    """Write a run's result for plain transformers/peft: the global LoRA adapter (routers kept),
    or with --client K that client's sub-MoE with its LoRA merged (see docs/export.md)."""
    from fedmoe.export import export_run

    written = export_run(run_dir, out, client)
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


if __name__ == "__main__":
    app()
