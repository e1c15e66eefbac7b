"""Conversions between psp_model's plain replies and Flower records (the only Flower-aware glue)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from psp_model.site_tasks import Reply

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"


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
