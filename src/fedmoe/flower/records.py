"""Conversion between the engine's objects and Flower records, and message byte accounting.

* tensors ↔ :class:`~flwr.app.ArrayRecord`: numpy-serialised ``Array`` s (Flower's standard
  ``numpy.ndarray`` stype) for dtypes numpy has; raw little-endian bytes (stype
  :data:`STYPE_TORCH_RAW`, dtype e.g. ``torch.bfloat16``) for those it lacks. Both are exact.
* a round's request (:class:`~fedmoe.engine.remote.ClientJob`) and a client's reply
  (:class:`~fedmoe.engine.client.ClientReply`) ↔ :class:`~flwr.app.RecordDict`, with
  metadata in ``ConfigRecord`` / ``MetricRecord`` under the keys of :mod:`fedmoe.flower.keys`.
* :func:`content_bytes`: the bytes a message's content occupies on the wire (Flower sends a
  message as content-addressed objects; identical objects inside one message count once).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedmoe.engine.payload import from_wire, to_wire
from fedmoe.flower import keys as K
from fedmoe.moe.slicing import ExpertMap

if TYPE_CHECKING:
    from fedmoe.engine.client import ClientReply
    from fedmoe.engine.remote import ClientJob

STYPE_NUMPY = "numpy.ndarray"
STYPE_TORCH_RAW = "torch.raw"
_NUMPY_LESS = (torch.bfloat16,)


# -- tensors --------------------------------------------------------------------------------
def tensor_to_array(t: torch.Tensor) -> Array:
    """One tensor as an :class:`Array` (exact, any dtype)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _NUMPY_LESS or t.dtype.is_floating_point and t.dtype.itemsize == 1:
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return Array(dtype=str(t.dtype), shape=tuple(t.shape), stype=STYPE_TORCH_RAW, data=raw)
    return Array.from_numpy_ndarray(t.numpy())


def array_to_tensor(a: Array) -> torch.Tensor:
    """Inverse of :func:`tensor_to_array` (a fresh, writable tensor)."""
    if a.stype == STYPE_TORCH_RAW:
        dtype = getattr(torch, a.dtype.removeprefix("torch."))
        if not a.data:
            return torch.empty(tuple(a.shape), dtype=dtype)
        return torch.frombuffer(bytearray(a.data), dtype=dtype).reshape(tuple(a.shape))
    return torch.from_numpy(np.array(a.numpy(), copy=True))


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an :class:`ArrayRecord` (key order kept)."""
    record = ArrayRecord()
    for k, v in state.items():
        record[k] = tensor_to_array(v)
    return record


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_record`."""
    return {k: array_to_tensor(a) for k, a in record.items()}


# -- wire size ----------------------------------------------------------------------------------
def content_bytes(content: RecordDict) -> int:
    """Bytes of the serialised objects a message with this content carries (each object once)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def wire_roundtrip(content: RecordDict) -> RecordDict:
    """Serialise ``content`` to Flower's wire objects and rebuild it (what the receiver sees)."""
    objects = get_all_nested_objects(content)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    rebuilt = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(rebuilt, RecordDict)
    return rebuilt


# -- request: server → client ---------------------------------------------------------------
@dataclass
class TrainRequest:
    """A client turn as the node reads it from a message."""

    client_id: int
    round: int
    stage: int
    seed: int
    expert_map: ExpertMap
    download: dict[str, torch.Tensor]
    extra_down: dict[str, torch.Tensor]
    fingerprint: str
    node_plan: str = ""
    client_kind: str = ""
    checkpointing: bool = False


def job_content(job: ClientJob, fingerprint: str, wire_dtype: str = "fp32") -> RecordDict:
    """The content of a train message: the sub-MoE's trainable tensors (float32 ones cast to
    ``engine.wire_dtype``, as the in-process engine sends them), extras, metadata."""
    content = RecordDict()
    content[K.REC_TRAINABLES] = state_to_record(to_wire(job.download, wire_dtype))
    if job.extra_down:
        content[K.REC_EXTRA] = state_to_record(job.extra_down)
    content[K.REC_CONFIG] = ConfigRecord({
        K.CFG_CLIENT_ID: job.client_id, K.CFG_ROUND: job.round, K.CFG_STAGE: job.stage, K.CFG_SEED: job.seed,
        K.CFG_EXPERT_MAP: job.expert_map.to_json(), K.CFG_FINGERPRINT: fingerprint,
        K.CFG_NODE_PLAN: job.node_plan, K.CFG_CLIENT_KIND: job.client_kind, K.CFG_CHECKPOINTING: job.checkpointing,
    })
    return content


def parse_request(content: RecordDict) -> TrainRequest:
    """Inverse of :func:`job_content`."""
    cfg = content[K.REC_CONFIG]
    extra = record_to_state(content[K.REC_EXTRA]) if K.REC_EXTRA in content else {}
    return TrainRequest(
        client_id=int(cfg[K.CFG_CLIENT_ID]), round=int(cfg[K.CFG_ROUND]), stage=int(cfg[K.CFG_STAGE]),
        seed=int(cfg[K.CFG_SEED]), expert_map=ExpertMap.from_json(str(cfg[K.CFG_EXPERT_MAP])),
        download=record_to_state(content[K.REC_TRAINABLES]), extra_down=extra,
        fingerprint=str(cfg[K.CFG_FINGERPRINT]), node_plan=str(cfg.get(K.CFG_NODE_PLAN, "")),
        client_kind=str(cfg.get(K.CFG_CLIENT_KIND, "")), checkpointing=bool(cfg.get(K.CFG_CHECKPOINTING, False)),
    )


# -- reply: client → server ---------------------------------------------------------------------
def reply_content(reply: ClientReply, upload: Mapping[str, torch.Tensor], client_id: int, rnd: int) -> RecordDict:
    """The content of a train reply: trained tensors, routing statistics, metrics."""
    content = RecordDict()
    content[K.REC_TRAINABLES] = state_to_record(upload)
    if reply.extra:
        content[K.REC_EXTRA] = state_to_record(reply.extra)
    content[K.REC_ROUTING] = ArrayRecord({K.ARR_P: Array.from_numpy_ndarray(np.asarray(reply.p, dtype=np.float64))})
    content[K.REC_METRICS] = MetricRecord({
        K.MET_LOSS: float(reply.loss), K.MET_SCORE: float(reply.score), K.MET_STEPS: int(reply.steps),
        K.MET_PEAK_MEMORY: int(reply.peak_memory_bytes),
    })
    content[K.REC_CONFIG] = ConfigRecord({K.CFG_CLIENT_ID: client_id, K.CFG_ROUND: rnd})
    return content


@dataclass
class TrainResult:
    """A client's reply as the server reads it."""

    client_id: int
    round: int
    upload: dict[str, torch.Tensor]
    extra_up: dict[str, torch.Tensor]
    p: np.ndarray
    metrics: dict[str, float]


def parse_reply(content: RecordDict, wire_dtype: str = "fp32") -> TrainResult:
    """Inverse of :func:`reply_content`; uploaded ``wire_dtype`` tensors come back as float32."""
    cfg, met = content[K.REC_CONFIG], content[K.REC_METRICS]
    return TrainResult(
        client_id=int(cfg[K.CFG_CLIENT_ID]), round=int(cfg[K.CFG_ROUND]),
        upload=from_wire(record_to_state(content[K.REC_TRAINABLES]), wire_dtype),
        extra_up=record_to_state(content[K.REC_EXTRA]) if K.REC_EXTRA in content else {},
        p=np.array(content[K.REC_ROUTING][K.ARR_P].numpy(), dtype=np.float64, copy=True),
        metrics={k: float(met[k]) for k in (K.MET_LOSS, K.MET_SCORE, K.MET_STEPS, K.MET_PEAK_MEMORY)},
    )


# -- final evaluation on a node (evaluate messages) -----------------------------------------------
def scores_content(client_id: int, num_examples: int, scores: Mapping[str, float],
                   predictions: list[dict] | None = None) -> RecordDict:
    """The content of an evaluate reply: the client's test scores and their weight, and its
    per-example rows (``predictions.jsonl``) as JSON."""
    from fedmoe.engine.run import _jsonable

    content = RecordDict()
    content[K.REC_SCORES] = MetricRecord({k: float(v) for k, v in scores.items()})
    cfg = {K.CFG_CLIENT_ID: client_id, K.CFG_NUM_EXAMPLES: num_examples}
    if predictions is not None:
        cfg[K.CFG_PREDICTIONS] = json.dumps(_jsonable(predictions))
    content[K.REC_CONFIG] = ConfigRecord(cfg)
    return content


def parse_predictions(content: RecordDict, client_id: int) -> list[dict]:
    """The per-example rows of an evaluate reply (plain JSON: nothing in it runs); ``ValueError``
    unless it is a list of objects of client ``client_id``."""
    cfg = content[K.REC_CONFIG]
    if K.CFG_PREDICTIONS not in cfg:
        return []
    rows = json.loads(str(cfg[K.CFG_PREDICTIONS]))
    if not isinstance(rows, list) or not all(isinstance(r, dict) and r.get("client") == client_id for r in rows):
        raise ValueError(f"predictions of client {client_id} are not a list of its rows")
    return rows


def parse_scores(content: RecordDict) -> tuple[int, int, dict[str, float]]:
    """Inverse of :func:`scores_content`: ``(client_id, num_examples, scores)``."""
    cfg = content[K.REC_CONFIG]
    scores = {k: float(v) for k, v in content[K.REC_SCORES].items()}
    return int(cfg[K.CFG_CLIENT_ID]), int(cfg[K.CFG_NUM_EXAMPLES]), scores
