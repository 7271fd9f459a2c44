"""``fedmoe run CONFIG --engine flower-sim``: the same experiment on Flower's simulation engine.

The package's ServerApp and ClientApp code runs under :func:`flwr.simulation.run_simulation`
(Ray backend, needs the ``simulation`` extra) with one virtual SuperNode per client: the
simulation engine gives node ``i`` the node config ``partition-id=i num-partitions=N`` with N =
``setting.num_clients``, so every node is exactly one client. Every message crosses Flower's
in-memory SuperLink as in a deployment.

``run_simulation`` takes no run config, so the apps are built here around one: the resolved
experiment (written to a temporary TOML that server and nodes both read, with ``data.data_dir``
made absolute for the Ray workers), ``out-path`` = the run's ``--out`` (outputs land there
exactly as ``fedmoe run`` writes them) and ``node-state-dir`` = ``<out>/node-state`` (the
simulated nodes' client state: SCAFFOLD's ``c_k``, FLEx's side experts).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmoe.config import ExperimentConfig, dump_toml
from fedmoe.errors import ConfigError
from fedmoe.flower import keys as K

#: the simulated nodes' state directory inside the run's output directory
NODE_STATE_SUBDIR = "node-state"


def simulation_run_config(experiment: Path, out: Path, timeout: float = 1800.0) -> dict[str, Any]:
    """The run config both apps read in a ``flower-sim`` run."""
    return {K.RUN_EXPERIMENT: str(experiment), K.RUN_OVERRIDES: "", K.RUN_OUT_PATH: str(out),
            K.RUN_NODE_STATE_DIR: str(out / NODE_STATE_SUBDIR), K.RUN_ROUND_TIMEOUT: timeout,
            K.RUN_DISCOVERY_TIMEOUT: timeout}


def simulation_apps(run_config: dict[str, Any], result: dict[str, Any]) -> tuple[Any, Any]:
    """A ServerApp and a ClientApp that run the package's handlers with ``run_config``
    (``result["summary"]`` receives the run's summary)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from fedmoe.flower.client_app import handle_evaluate, handle_train, query
    from fedmoe.flower.server_app import run_federated
    from fedmoe.flower.settings import AppSettings

    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        settings = AppSettings.from_run_config(run_config)
        result["summary"] = run_federated(grid, settings, settings.output_dir(context.run_id))

    @client.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return Message(handle_train(msg.content, run_config, context.node_config, context.run_id), reply_to=msg)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return Message(handle_evaluate(msg.content, run_config, context.node_config, context.run_id), reply_to=msg)

    return server, client


def run_flower_simulation(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine with outputs in ``out``; returns the summary."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("`--engine flower-sim` needs Ray (Flower's simulation backend), which is not installed.",
                          'install the simulation extra: pip install -e ".[simulation]" (or `make install`).')
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from fedmoe.flower.logs import quiet_flower

    quiet_flower(sys.stderr.isatty())

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = replace(cfg.data, data_dir=str(Path(cfg.data.data_dir).expanduser().resolve()))
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmoe-sim-") as tmp:
        experiment = Path(tmp) / "experiment.toml"
        experiment.write_text(dump_toml(replace(cfg, data=data)))
        server, client = simulation_apps(simulation_run_config(experiment, out), result)
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False}}
        run_simulation(server_app=server, client_app=client, num_supernodes=cfg.setting.num_clients,
                       backend_config=backend)
    if "summary" not in result:
        raise ConfigError("The Flower simulation ended without finishing the run.",
                          f"see the log above; outputs so far are in {out}.")
    return result["summary"]
