"""The server's side of a transport whose clients run elsewhere (``fedmoe.flower``).

The client turn itself (prepare → exchange → finish) is :mod:`fedmoe.engine.turn`, shared by
both engines; a networked engine supplies the exchange (its messages). What is here is what
such a transport needs besides: a config parsed from text, the strategy's round plans one at a
time, the final-evaluation job, a reply rebuilt from what crossed the network, checkpoints and
the run directory's head (:func:`start_outputs`) and tail (:func:`write_outputs`). The client
half is :mod:`fedmoe.engine.node`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fedmoe.config import ExperimentConfig, dump_toml, load_config
from fedmoe.engine.client import ClientReply
from fedmoe.engine.fingerprint import (  # noqa: F401 (re-exported)
    config_fingerprint,
    deployment_fingerprint,
    model_fingerprint,
)
from fedmoe.engine.node import (  # noqa: F401 (re-exported: the client half)
    NodeState,
    build_node_state,
    client_evaluation,
    client_turn,
    measure_fn,
)
from fedmoe.engine.payload import to_bytes
from fedmoe.engine.run import Run, _jsonable, combine_scores, write_outputs  # noqa: F401 (re-exported)
from fedmoe.engine.strategies.base import RoundPlan
from fedmoe.engine.turn import ClientJob, client_seed  # noqa: F401 (re-exported)
from fedmoe.moe.slicing import expert_map_of


# -- configuration -----------------------------------------------------------------------
def config_from_text(text: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Parse a TOML experiment config held in a string (e.g. :func:`dump_toml`'s output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=True) as f:
        f.write(text)
        f.flush()
        return load_config(f.name, overrides)


#: ``ClientJob.round`` of a final-evaluation job
EVAL_ROUND = -1


def round_plans(run: Run) -> Iterator[RoundPlan]:
    """The strategy's plans, one round at a time (each drawn after the previous round closed)."""
    for rnd in range(run.strategy.num_rounds()):
        yield run.strategy.plan(run, rnd)


# -- server side ---------------------------------------------------------------------------
def prepare_evaluation(run: Run, cid: int, kept: list[list[int]]) -> ClientJob:
    """What a node needs for client ``cid``'s final evaluation (strategies with a client kind):
    the global tensors shaped for its sub-MoE, as ``Run.final_scores`` loads them."""
    client = run.clients[cid]
    expert_map = expert_map_of(run.base, kept, run.family)
    template = run.templates.get(run.trainables, kept)
    download = run.trainables.for_client(template, expert_map, client.task)
    return ClientJob(cid, client.task, 0, EVAL_ROUND, 0, [list(k) for k in kept], expert_map, download,
                     client_kind=run.strategy.client_kind)


def reply_from_parts(upload: dict[str, torch.Tensor], metrics: dict[str, float], p: np.ndarray,
                     extra_up: dict[str, torch.Tensor] | None = None, width: int | None = None) -> ClientReply:
    """Rebuild a :class:`ClientReply` on the server from what crossed the network.

    ``width``: the server's number of experts per layer (``max(global_num_experts)`` of the
    job's expert map). A node indexes ``p`` by its own base model's experts; when the strategy
    replaced the global model by a smaller one (a prefix of each layer's experts), the columns
    beyond ``width`` are experts the client did not hold (zero) and are dropped.
    """
    if width is not None and p.shape[-1] != width:
        if p.shape[-1] < width or np.any(p[..., width:]):
            raise ValueError(f"routing statistics have {p.shape[-1]} expert columns; the server's model has {width}")
        p = p[..., :width]
    return ClientReply(
        upload=to_bytes(upload), loss=float(metrics["loss"]), score=float(metrics["score"]), p=p,
        steps=int(metrics["steps"]), peak_memory_bytes=int(metrics["peak_memory_bytes"]),
        extra=extra_up or {}, extra_down_bytes=0, extra_up_bytes=0,
    )


def maybe_checkpoint(run: Run, rnd: int) -> None:
    """Write a server checkpoint after round ``rnd`` when ``engine.checkpoint_every`` says so."""
    every = run.cfg.engine.checkpoint_every
    if every and (rnd + 1) % every == 0:
        from fedmoe.engine.checkpoint import save_checkpoint

        save_checkpoint(run, rnd)


def start_outputs(cfg: ExperimentConfig, out: Path) -> None:
    """Head of ``run_experiment``: an empty ``rounds.jsonl`` and the resolved ``config.toml``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").write_text("")
    (out / "config.toml").write_text(dump_toml(cfg))
