"""Conversions between psp_model's plain replies and Flower records (the only Flower-aware glue)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from psp_model.signing import message_digest
from psp_model.site_tasks import Reply

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
SIGNATURE = "model-signature"
"""Config key of the server's Ed25519 signature over :func:`signed_digest` of the message."""
SIGNED_TEXTS = ("manifest-json", "features")
"""Config values a signature covers besides every array."""


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def from_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def reply_record(reply: Reply) -> RecordDict:
    record = RecordDict({METRICS: MetricRecord({k: float(v) for k, v in reply.metrics.items()})})
    if reply.arrays:
        record[ARRAYS] = from_arrays(reply.arrays)
    if reply.configs:
        record[CONFIG] = ConfigRecord(dict(reply.configs))
    return record


def signed_digest(content: RecordDict) -> bytes:
    """What the server signs in a message: every array of every ArrayRecord, plus the manifest text."""
    arrays = {f"{key}/{name}": value for key, record in content.array_records.items()
              for name, value in to_arrays(record).items()}
    config = content.config_records.get(CONFIG, ConfigRecord())
    return message_digest(arrays, {k: str(config[k]) for k in SIGNED_TEXTS if k in config})
