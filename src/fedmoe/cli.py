"""``fedmoe`` command line: ``run``, ``inspect``, ``data describe``.

User mistakes (:class:`~fedmoe.errors.FedMoEError`) print one line and exit with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmoe.errors import FedMoEError, RunStopped

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Personalised federated fine-tuning of MoE LMs.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data partitions.")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)
DEBUG = {"on": False}


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
    from fedmoe.quiet import quiet_cli

    quiet_cli()


def _fail(exc: FedMoEError) -> None:
    if DEBUG["on"]:
        raise exc
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="tiny-<family>, a preset, a hub name or a local path")]) -> None:
    """Print the MoE layers of MODEL: experts, top-k, bytes per expert, dense and total bytes
    (built on the meta device: shapes only, no weights are loaded)."""
    try:
        from fedmoe.moe.meta import load_shapes
        from fedmoe.moe.slicing import layout_of

        m, family = load_shapes(model)
    except FedMoEError as exc:
        _fail(exc)
        return
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


@app.command()
def models() -> None:
    """What `model.name` (and `fedmoe inspect`) accepts: presets, tiny families, hub names and folders."""
    from fedmoe.moe.models_table import models_tables

    for item in models_tables():
        console.print(item)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")] = None,
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("runs/latest"),
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the run in this directory")] = None,
    engine: Annotated[str | None, typer.Option(
        "--engine", help="inprocess (default) or flower-sim (Flower's simulation engine; config key engine.name)",
    )] = None,
    log: Annotated[str | None, typer.Option(
        "--log", help="metric logs, comma-separated: csv (metrics.csv), tensorboard (<out>/tensorboard), wandb",
    )] = None,
) -> None:
    """Run an experiment; writes config.toml, rounds.jsonl, summary.json, expert_map.json."""
    from fedmoe.config import load_config
    from fedmoe.errors import ConfigError

    if resume is not None:
        out, config = resume, resume / "config.toml"
    created = not out.exists()
    try:
        if config is None:
            raise ConfigError("No config file given.", "run `fedmoe run CONFIG.toml` or `fedmoe run --resume RUN_DIR`.")
        if resume is not None and engine not in (None, "inprocess"):
            raise ConfigError(f"`--resume` continues in-process runs only (got --engine {engine}).",
                              "resume with --engine inprocess, or start the run again.")
        cfg = load_config(config, [*(set_ or []), *([f'engine.name="{engine}"'] if engine else [])])
        from fedmoe.progress import parse_logs

        logs = parse_logs(log)
        if logs and cfg.engine.name != "inprocess":
            raise ConfigError("`--log` works with the in-process engine only.", "drop --log, or use --engine inprocess.")
        if cfg.engine.name == "flower-sim":
            from fedmoe.flower.simulation import run_flower_simulation

            summary = run_flower_simulation(cfg, out)
        else:
            from fedmoe.engine.run import run_experiment

            summary = _monitored(cfg, out, logs, resume is not None, run_experiment)
    except FedMoEError as exc:
        if created and out.exists() and not isinstance(exc, RunStopped):
            shutil.rmtree(out)  # leave nothing that could be mistaken for a result (a stopped run has
            # no summary.json and keeps rounds.jsonl + its checkpoint for `--resume`)
        _fail(exc)
        return
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

    try:
        describe_command(str(config) if config else None, set_ or [])
    except FedMoEError as exc:
        _fail(exc)


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

    try:
        rep = build_report(run_dirs, out, window=final_window, reference=reference, figures=figures)
    except FedMoEError as exc:
        _fail(exc)
        return
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

    try:
        written = export_run(run_dir, out, client)
    except FedMoEError as exc:
        _fail(exc)
        return
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


if __name__ == "__main__":
    app()
