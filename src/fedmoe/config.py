"""Experiment configuration: dataclasses loaded from TOML, with ``--set key=value`` overrides.

Every key is defined once here. Unknown keys are rejected with the nearest valid key
suggested; values are type-checked against the dataclass annotations.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.config_keys import _CHOICES, _RANGES, _get, migrate, refuse_moved, validate
from fedmoe.errors import ConfigError

__all__ = ["_CHOICES", "_RANGES", "_get", "validate"]  # defined in fedmoe.config_keys, read from here too


@dataclass
class ModelConfig:
    #: preset (``tiny-mixtral``, ``minilm-moe-8e`` …), hub name or local directory
    name: str = "tiny-mixtral"
    #: parameter dtype on the server: float32 | bfloat16
    dtype: str = "float32"


@dataclass
class DataConfig:
    #: folder holding ag_news/, squad/, xsum/ in their official formats
    data_dir: str = "../shared/data"
    #: task types held by clients (TC=AG News, RC=SQuAD v1.1, TS=XSum)
    tasks: list[str] = field(default_factory=lambda: ["tc", "rc", "ts"])
    #: cap on examples read per task (0 = all); keeps CPU runs small
    max_examples_per_task: int = 0
    #: maximum input length in tokens
    max_seq_len: int = 128
    #: maximum target length in tokens (text-to-text tasks)
    max_target_len: int = 32
    #: fractions of each client's share used for validation and test
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    #: "local" (official files under data_dir) or "hub" (``datasets.load_dataset``)
    source: str = "local"
    #: hub names (or local dataset folders) read when source = "hub"
    hub_tc: str = "ag_news"
    hub_rc: str = "squad"
    hub_ts: str = "EdinburghNLP/xsum"
    #: hub split to read: one name for every task, or a table per task (``{tc = "train", rc =
    #: "validation"}``; a task left out takes its default); "" = test for TC/TS, validation for RC
    #: (the splits the shared data holds)
    hub_split: str | dict[str, str] = ""
    #: text file of example ids (one per line) left out of every client's data; "" = none
    exclude_ids: str = ""


@dataclass
class SettingConfig:
    #: one of standard-hetero-t | standard-hetero-td | enforced-hetero-t | enforced-hetero-td
    preset: str = "standard-hetero-t"
    num_clients: int = 30
    #: "uniform" or "enforced" (3 clients of 3 different tasks per round); "" = from preset
    sampler: str = ""
    #: "iid" or "dirichlet"; "" = from preset
    partition: str = ""
    #: Dirichlet concentration for label / cluster skew (docs/algorithms.md §5.1 choice)
    dirichlet_alpha: float = 0.5
    #: number of k-means clusters for RC/TS clustering-based partitions (FedNLP)
    num_clusters: int = 5
    #: client memory budget M_k = mem(dense) + u_k · mem(all experts), u_k ~ U[low, high]
    #: (training bytes); u_k < 1: the client cannot hold the whole MoE; stage 1 needs
    #: some clients with u_k >= 1 ("sufficient memory")
    budget_low: float = 0.3
    budget_high: float = 1.2


@dataclass
class FederationConfig:
    """Keys every algorithm shares (they were ``fedmoe.rounds``, ``setting.clients_per_round``
    and ``fedmoe.exclude_unfit``; :data:`fedmoe.config_keys.MOVED`)."""

    #: R: federated rounds of every algorithm (FedMoE: stage-2 rounds, after ``fedmoe.stage1_rounds``)
    rounds: int = 20
    #: clients per round for the uniform sampler (the enforced sampler always takes 3)
    clients_per_round: int = 5
    #: leave out clients whose budget cannot hold what the algorithm needs (FedMoE: the dense
    #: part alone exceeds α·M; baselines / HFedMoE: their global model / one expert per layer);
    #: false: such a client stops the run with a one-line error
    exclude_unfit: bool = False


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    #: local epochs per round (each over the client's train split)
    local_epochs: int = 1
    #: cap on local optimiser steps per round (0 = no cap)
    max_local_steps: int = 0
    batch_size: int = 8
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    #: coefficient ``a`` of the load-balance loss over kept experts (docs/algorithms.md §1.2 step 3)
    load_balance_coef: float = 0.01
    #: "lora" (paper default: LoRA on kept experts + attention, router rows trainable) or "full"
    finetune: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    #: evaluation batch size
    eval_batch_size: int = 32
    #: recompute each layer's activations in backward (transformers' gradient checkpointing):
    #: less activation memory, so the memory plan prices submodels lower and memory-poor clients
    #: keep more experts, at a step-time cost (benchmarks/memory/gradient_checkpointing.md).
    #: "auto": only clients whose initial submodel search keeps more experts with it train with it
    #: (FedMoE/randomMoE; HFedMoE: clients whose C_k grows with it; other algorithms train without
    #: it); recorded per turn in rounds.jsonl
    gradient_checkpointing: bool | str = False


@dataclass
class FedMoEConfig:
    #: R1: stage-1 rounds of full-MoE LoRA fine-tuning by sufficient-memory clients
    stage1_rounds: int = 5
    #: α: share of the budget above the dense part used by the initial submodel search
    #: (mem ≤ D + α·(M − D); docs/algorithms.md §1.1 step 3 choice)
    alpha: float = 0.9
    #: bracket tolerance of the θ binary search
    theta_tol: float = 1e-4
    #: P: participations without improvement before recommendation triggers
    patience: int = 2
    #: K: most similar clients used by the recommendation (eq. 4–6)
    top_k_similar: int = 3
    #: ablation switches (paper Table 2)
    stage1: bool = True
    stage2_adjust: bool = True


@dataclass
class BaselineConfig:
    """Dense-sharing baselines FedAvg / FedProx / SCAFFOLD (docs/algorithms.md §2).

    They train for ``federation.rounds`` rounds (the same R as FedMoE's stage 2).
    """

    #: experts per MoE layer of the baselines' global model (the first n of each layer);
    #: 0 = the global model itself; -1 = auto: the largest n whose model fits every client's
    #: budget (the paper's set-up: a smaller MoE that every client can hold)
    num_experts: int = -1
    #: FedProx μ: proximal term (μ/2)·‖w − w_global‖² on the trainable tensors
    fedprox_mu: float = 0.01
    #: SCAFFOLD server step size η_g (w ← w + η_g · mean Δw)
    scaffold_server_lr: float = 1.0


@dataclass
class HFedMoEConfig:
    """HFedMoE (docs/algorithms.md §3); it trains for ``federation.rounds`` rounds like the other algorithms."""

    #: λ of s(e) = λ·s_cumul(e) + (1−λ)·s_spec(e) (§3.2 choice)
    lam: float = 0.5
    #: β of I(e) = s(e) − β·KL_e (§3.3 choice)
    beta: float = 0.1
    #: τ of the sparsity-aware aggregation (§3.5 choice); < 0 = 1/(2·E_i) for MoE layer i
    tau: float = -1.0
    #: safety factor on M_k's share above the dense part (as fedmoe.alpha) when deriving C_k, the experts
    #: per layer a client trains (§3.1 choice)
    alpha: float = 1.0
    #: training examples a client scores its experts on before each turn (0 = its whole train split)
    max_score_examples: int = 0


@dataclass
class FlexConfig:
    """FLEx (docs/algorithms.md §4); it trains for ``federation.rounds`` rounds like the other algorithms."""

    #: b_side of the side gate σ(w_side·x + b_side) at grafting (§4.2 choice; w_side starts at 0)
    gate_bias: float = -4.0
    #: training examples a client picks its personalised experts e* on (0 = its whole train split)
    max_choice_examples: int = 0
    #: experts per MoE layer of the MoE the clients hold (the first n of each layer), as
    #: ``baseline.num_experts``: 0 = the run's whole MoE, budgets not enforced (the published FLEx);
    #: -1 = the largest n whose model + side experts fits every client's budget; n > 0 = n
    num_experts: int = 0


@dataclass
class EngineConfig:
    #: engine of `fedmoe run`: "inprocess", or "flower-sim" (Flower's simulation engine, one
    #: SuperNode per client; needs the `simulation` extra). Deployed Flower runs go through
    #: `flwr run` (docs/deploy.md).
    name: str = "inprocess"
    #: measure the peak memory of each client's local step
    measure_memory: bool = True
    #: dtype of the floating tensors that travel each round (adapters, router rows, heads):
    #: "fp32", or "bf16"/"fp16" (half the bytes; received tensors are cast back to fp32)
    wire_dtype: str = "fp32"
    #: device: "auto" (CUDA when present), "cpu" or "cuda"
    device: str = "auto"
    #: write a server checkpoint every N rounds (0 = never); `fedmoe run --resume DIR`
    checkpoint_every: int = 1
    #: a client turn running longer than this is rejected (seconds; 0 = no limit)
    client_timeout_s: float = 0.0
    #: stop the run (clear message, rounds.jsonl and checkpoint kept) after this many consecutive
    #: rounds in which no client reply survived; 0 = never stop (the global model stays unchanged)
    max_empty_rounds: int = 3
    #: reject a client update whose L2 norm ‖uploaded − sent‖ over its trainable tensors exceeds
    #: this (0 = no bound)
    max_update_norm: float = 0.0
    #: tests and drills only: "ROUND:CLIENT[:KIND],…" client turns that misbehave (KIND: see
    #: fedmoe.engine.faults.FAULT_KINDS; default raise)
    inject_faults: str = ""


@dataclass
class ExperimentConfig:
    seed: int = 0
    #: fedmoe | fedavg | fedprox | scaffold | random_moe | hfedmoe | flex
    algorithm: str = "fedmoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    setting: SettingConfig = field(default_factory=SettingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fedmoe: FedMoEConfig = field(default_factory=FedMoEConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    hfedmoe: HFedMoEConfig = field(default_factory=HFedMoEConfig)
    flex: FlexConfig = field(default_factory=FlexConfig)


# ---------------------------------------------------------------------------------------


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys.extend(_valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str, cls: type) -> str:
    close = difflib.get_close_matches(key, _valid_keys(cls), n=1, cutoff=0.5)
    return f"did you mean `{close[0]}`?" if close else "see `fedmoe config show` for valid keys."


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(
            f"Config key `{key}` must be {tp.__name__}, got {type(value).__name__} {value!r}.",
            f"set it to a {tp.__name__}, e.g. --set {key}=<{tp.__name__}>.",
        )
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"Config key `{key}` must be a list, got {value!r}.", f'write it as {key}=["a", "b"].')
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"Config key `{key}` must be a table, got {value!r}.", f'write it as {key}={{a = "x"}}.')
        return {str(k): _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        for inner in typing.get_args(tp):
            try:
                return _coerce(key, value, inner)
            except ConfigError:
                continue
        raise ConfigError(f"Config key `{key}` has an invalid value {value!r}.", f"use a value of type {tp}.")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, root: type) -> Any:
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + key
        if key not in hints:
            raise ConfigError(f"Unknown config key `{full}`.", _suggest(full, root))
        tp = hints[key]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key `{full}` is a section, not a value.", f"use [{full}] or {full}.<key>=…")
            kwargs[key] = _build(tp, value, full + ".", root)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML (numbers, booleans, lists), else a string."""
    if "=" not in text:
        raise ConfigError(f"Override `{text}` has no `=`.", "write overrides as --set section.key=value.")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if raw.strip()[:1] in ("\"", "'", "[", "{"):  # meant as TOML: a typo must not become a literal string
            raise ConfigError(f"Override `{key}` value `{raw.strip()}` is not valid TOML ({exc}).",
                              f'quote strings and close brackets, e.g. --set {key}="text" or {key}=[1, 2].') from None
        value = raw  # a bare word: the string itself (e.g. model.name=tiny-mixtral)
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override key `{'.'.join(path)}` goes through a value, not a section.")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                stored: bool = False) -> ExperimentConfig:
    """Load a TOML file (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    A moved key (:data:`fedmoe.config_keys.MOVED`) is refused with its new name — unless
    ``stored``: the file is a config a run wrote (``RUN_DIR/config.toml``), whose moved keys are
    translated; the overrides are checked either way."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist.", "pass the path of a TOML file, e.g. configs/quickstart.toml.")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Config file {p} is not valid TOML: {exc}.", "fix the syntax at that line.") from None
        data = migrate(data) if stored else data
    for item in overrides or []:
        keys, value = parse_override(item)
        _merge(data, keys, value)
    refuse_moved(data)  # from the file (unless stored) or an override
    return validate(_build(ExperimentConfig, data, "", ExperimentConfig))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_toml(cfg: ExperimentConfig) -> str:
    """Serialise a config to TOML (fully resolved: every key written)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    d = config_to_dict(cfg)
    lines = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines.extend(f"{kk} = {fmt(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"
