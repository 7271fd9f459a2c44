"""``fedmoe data describe CONFIG``: one table row per client of the built federation (docs/algorithms.md §5).

Columns: client, task, train/val/test sizes, the label (TC) or cluster (RC/TS under a Dirichlet
partition) histogram of the client's share, and the memory budget when known; then one total
row per task and a grand total.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fedmoe.config import ExperimentConfig, load_config
from fedmoe.data.settings import ClientData, Federation, build_federation


def _histogram(client: ClientData) -> str:
    return " ".join(str(n) for n in client.histogram) if client.histogram else "-"


def _budget(client: ClientData) -> str:
    return "-" if client.budget_bytes is None else _bytes(client.budget_bytes)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _data_source(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.source != "hub":
        return f"local:{d.data_dir}"
    from fedmoe.data.hub import hub_split_for

    return "hub (" + ", ".join(f"{t}={getattr(d, f'hub_{t}')}:{hub_split_for(d.hub_split, t)}" for t in d.tasks) + ")"


def describe(cfg: ExperimentConfig, federation: Federation | None = None) -> Table:
    """A rich table of ``federation`` (built from ``cfg`` when not given)."""
    fed = federation if federation is not None else build_federation(cfg)
    st = cfg.setting
    caption = (
        f"preset {fed.preset}: sampler {fed.sampler_kind} ({fed.sampler.per_round} clients/round), "
        f"partition {fed.partition_kind}"
        + (
            f" (Dirichlet alpha={st.dirichlet_alpha}, {st.num_clusters} clusters for RC/TS)"
            if fed.partition_kind == "dirichlet"
            else ""
        )
        + f", seed {fed.seed}, data {_data_source(cfg)}"
    )
    for task, names in fed.group_names.items():
        kind = "labels" if task == "tc" else "k-means clusters"
        caption += f"\n{task} histogram = counts of {kind} {', '.join(names)}"
    from fedmoe.data.source import DROPPED

    for task, (n, why) in sorted(DROPPED.items()):
        if n and task in cfg.data.tasks:
            caption += f"\n{task}: {n} unusable records dropped ({why})"
    table = Table(title=f"Federation: {len(fed.clients)} clients", caption=caption)
    for name, justify in [
        ("client", "right"),
        ("task", "left"),
        ("train", "right"),
        ("val", "right"),
        ("test", "right"),
        ("histogram", "left"),
        ("budget", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in fed.clients:
        table.add_row(
            str(c.client_id),
            c.task,
            str(len(c.train)),
            str(len(c.val)),
            str(len(c.test)),
            _histogram(c),
            _budget(c),
        )
    table.add_section()
    for task in fed.tasks:
        members = fed.clients_of(task)
        table.add_row(
            f"{len(members)}",
            f"{task} ({fed.tasks[task].metric})",
            *(str(sum(len(getattr(c, s)) for c in members)) for s in ("train", "val", "test")),
            "",
            "",
        )
    table.add_row(
        str(len(fed.clients)),
        "total",
        *(str(sum(len(getattr(c, s)) for c in fed.clients)) for s in ("train", "val", "test")),
        "",
        "",
        style="bold",
    )
    return table


def describe_command(config_path: str | None, overrides: list[str], attach_budgets: Any) -> None:
    """Load ``config_path`` (None = defaults) with ``overrides`` and print :func:`describe`;
    ``attach_budgets(cfg, federation)`` gives the clients the run's budgets (from the engine, which
    ``data`` does not import) and returns the full MoE's training bytes."""
    cfg = load_config(config_path, overrides)
    from fedmoe.errors import FedMoEError

    fed = build_federation(cfg)
    try:
        full = attach_budgets(cfg, fed)
        note = (f"budget = training memory the client may use ({cfg.model.name}, {cfg.train.finetune}; "
                f"the full MoE needs {_bytes(full)} on train.batch_size rows of data.max_seq_len tokens, less on a "
                f"client whose longest example is shorter; setting.budget_low/high scale the experts' share)")
    except FedMoEError as exc:  # the data are still worth describing
        note = f"budget: - (model {cfg.model.name} unavailable: {exc})"
    table = describe(cfg, fed)
    table.caption += "\n" + note
    Console().print(table)
