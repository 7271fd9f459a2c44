"""Run fedmoe experiments on Flower (the only package that imports ``flwr``).

* :mod:`fedmoe.flower.server_app` — ``ServerApp``: the engine's round loop over the Message API;
* :mod:`fedmoe.flower.client_app` — ``ClientApp``: one client's turn on a SuperNode;
* :mod:`fedmoe.flower.records` — tensors and metadata ↔ Flower records, message byte counts;
* :mod:`fedmoe.flower.settings` / :mod:`fedmoe.flower.keys` — run/node config and message keys;
* :mod:`fedmoe.flower.local` — an in-process ``Grid`` for debugging the message path.

``flwr run .`` uses ``[tool.flwr.app]`` in ``pyproject.toml``; see ``docs/deploy.md``.
"""

from fedmoe import apply_process_policy

apply_process_policy()  # the Flower apps' processes: before the apps import torch
