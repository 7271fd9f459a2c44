"""Every key the Flower apps exchange or read, defined once.

Three namespaces:

* run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``flwr run --run-config``),
  read by both the ServerApp and the ClientApp;
* node config (``flower-supernode --node-config``), read by the ClientApp;
* message content: record names in a :class:`~flwr.app.RecordDict` and the keys inside them.
"""

from __future__ import annotations

# -- run config ------------------------------------------------------------------------
#: path of the experiment TOML (relative: to the working directory, else the installed app)
RUN_EXPERIMENT = "experiment"
#: ``;``-separated ``key=value`` experiment overrides (the CLI's ``--set`` syntax)
RUN_OVERRIDES = "overrides"
#: where the ServerApp writes its outputs: ``<out-dir>/<run-id>/``
RUN_OUT_DIR = "out-dir"
#: seconds the server waits for a round's replies; missing ones count as failed
RUN_ROUND_TIMEOUT = "round-timeout"
#: seconds the server waits for SuperNodes to cover every partition
RUN_DISCOVERY_TIMEOUT = "discovery-timeout"
#: outputs go exactly here instead of ``<out-dir>/<run-id>/`` (``fedmoe run --engine flower-sim``)
RUN_OUT_PATH = "out-path"
#: state directory of nodes whose node config has no ``state-dir`` (e.g. simulated SuperNodes)
RUN_NODE_STATE_DIR = "node-state-dir"
#: test-only fault injection: ``"ROUND:CLIENT[,ROUND:CLIENT…]"`` makes those turns raise
RUN_INJECT_FAULT = "inject-fault"

# -- node config -------------------------------------------------------------------------
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
#: optional node-local override of ``data.data_dir``
NODE_DATA_DIR = "data-dir"
#: where the node keeps its clients' own state between turns (SCAFFOLD's c_k, FLEx's side
#: experts): ``<state-dir>/run-<run id>/client-<cid>/``; default: run config ``node-state-dir``,
#: else ``<temp dir>/fedmoe-node-state``
NODE_STATE_DIR = "state-dir"
#: ``;``-separated folders: when set, the node refuses a run whose server-sent paths (the
#: experiment file, ``data.data_dir``, ``node-state-dir``, a local ``model.name`` or hub folder)
#: lie outside them; its own ``data-dir`` / ``state-dir`` always win over the server's
NODE_ALLOWED_ROOTS = "allowed-roots"

# -- message content: record names ---------------------------------------------------------
#: ArrayRecord: trainable tensors (server → client: the sub-MoE's share of the global
#: state; client → server: the trained tensors)
REC_TRAINABLES = "trainables"
#: ArrayRecord: algorithm extras (``ClientPlan.extra_down`` / ``extra_up``)
REC_EXTRA = "extra"
#: ArrayRecord: routing statistics of the reply (``p``: ``[L, E_global]`` float64)
REC_ROUTING = "routing"
#: ConfigRecord: round / client / expert-map metadata of a request, identity of a node
REC_CONFIG = "config"
#: MetricRecord: loss, score, steps, peak memory of a reply
REC_METRICS = "metrics"
#: MetricRecord: a client's final test scores (evaluate reply; metric name → value)
REC_SCORES = "scores"

# -- message content: keys inside records ---------------------------------------------------
CFG_CLIENT_ID = "client-id"
CFG_ROUND = "round"
CFG_STAGE = "stage"
CFG_SEED = "seed"
#: JSON of :class:`~fedmoe.moe.slicing.ExpertMap` (the kept global experts per layer)
CFG_EXPERT_MAP = "expert-map"
#: SHA-256 of the resolved experiment config (node-local keys left out) and the base model's
#: structure: server and node must agree
CFG_FINGERPRINT = "config-sha256"
#: name of the strategy's client code the node builds (``ClientPlan.node_plan``; "" = none)
CFG_NODE_PLAN = "node-plan"
#: name of the strategy's client trainables (``Strategy.client_kind``; "" = the default)
CFG_CLIENT_KIND = "client-kind"
#: the turn trains with gradient checkpointing (``ClientJob.checkpointing``)
CFG_CHECKPOINTING = "gradient-checkpointing"
#: number of test examples behind an evaluation reply's scores (the weight of the client)
CFG_NUM_EXAMPLES = "num-examples"
#: JSON list of an evaluation reply's per-example rows (``predictions.jsonl``'s fields)
CFG_PREDICTIONS = "predictions"
CFG_PARTITION_ID = NODE_PARTITION_ID
CFG_NUM_PARTITIONS = NODE_NUM_PARTITIONS

ARR_P = "p"

MET_LOSS = "loss"
MET_SCORE = "score"
MET_STEPS = "steps"
MET_PEAK_MEMORY = "peak_memory_bytes"

# -- error texts the server recognises ------------------------------------------------------------
#: in a node's error reply when its config / base model differs from the server's
ERR_MISMATCH = "differs from the server's"
