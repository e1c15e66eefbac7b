"""Clinical + lesion-dose features: strict parsing, federated z-score statistics, one shared encoder.

shared/notes/method.md, "Local preprocessing" step 3: continuous values are z-scored, categories
one-hot encoded with ``unknown`` as a category of its own, collinear columns dropped. The statistics
are pooled from per-site sums (``ClinicalStats.combine``), and ``encode`` is the only encoder: the
server, the sites and ``psp-predict`` all call it with the same ``FeatureManifest``.

Column rule (deterministic, recorded in ``FeatureManifest.dropped``):

1. the reference level of every category -- the first allowed value in ``schema.CATEGORICAL``
   (``sex=F``, ``idh=mutant``, ``mgmt=methylated``) -- is dropped, because a category's one-hot
   columns always sum to 1; the reference level is then the all-zero pattern;
2. any column constant over the pooled data (standard deviation 0, e.g. a level nobody has) is
   dropped: it carries no information and cannot be z-scored. A later case with such a level is
   encoded like the reference level.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from psp_model import schema
from psp_model.errors import CaseError
from psp_model.preprocess.dose import DOSE_FEATURES

__all__ = [
    "AGE_RANGE",
    "ClinicalRecord",
    "ClinicalStats",
    "FeatureManifest",
    "build_manifest",
    "candidate_features",
    "encode",
    "fit_clinical_stats",
    "parse_clinical",
]

AGE_RANGE: tuple[float, float] = (0.0, 120.0)
"""Accepted ages in years."""

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ClinicalRecord:
    """One case's validated clinical row. ``label``: 1 = TP, 0 = PsP, None = unlabelled."""

    case_id: str
    label: int | None
    age: float
    sex: str
    idh: str
    mgmt: str
    days_since_rt: float


def parse_clinical(case_id: str, row: Mapping[str, str] | None, *, require_label: bool) -> ClinicalRecord:
    """Validate a raw ``clinical.csv`` row (strings, as read) into a typed record.

    Args:
        case_id: the case, named in every error.
        row: the raw row, or None when the case has none.
        require_label: True for training and evaluation (a missing label is an error), False for
            prediction.

    Raises:
        CaseError: with the column, the value found and what is allowed.
    """
    if row is None:
        raise CaseError(case_id, f"no row in {schema.CLINICAL_FILE}; add one with the columns "
                                 f"{','.join(schema.CLINICAL_COLUMNS)}")
    missing = [column for column in schema.CLINICAL_COLUMNS if column != "case_id" and column not in row]
    if missing:
        raise CaseError(case_id, f"clinical row lacks column(s) {missing}")
    label_text = row["label"].strip()
    if label_text:
        label: int | None = schema.LABELS.get(label_text)
        if label is None:
            raise CaseError(case_id, _not_one_of("label", label_text, tuple(schema.LABELS)))
    elif require_label:
        raise CaseError(case_id, f"label is missing; it must be one of {list(schema.LABELS)} for training "
                                 "and evaluation")
    else:
        label = None
    age = _number(case_id, "age", row["age"])
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise CaseError(case_id, f"age {age:g} is outside {AGE_RANGE[0]:g}..{AGE_RANGE[1]:g} years")
    days = _number(case_id, "days_since_rt", row["days_since_rt"])
    if days < 0:
        raise CaseError(case_id, f"days_since_rt {days:g} is negative; it counts days from the end of RT "
                                 "to the follow-up scan")
    categories = {name: _category(case_id, name, row[name]) for name in schema.CATEGORICAL}
    return ClinicalRecord(case_id=case_id, label=label, age=age, days_since_rt=days, **categories)


def _number(case_id: str, column: str, text: str) -> float:
    text = text.strip()
    if not text:
        raise CaseError(case_id, f"{column} is empty; a number is required")
    try:
        value = float(text)
    except ValueError:
        raise CaseError(case_id, f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CaseError(case_id, f"{column} {text!r} is not a finite number")
    return value


def _category(case_id: str, column: str, text: str) -> str:
    allowed = schema.CATEGORICAL[column]
    text = text.strip()
    if text not in allowed:
        raise CaseError(case_id, _not_one_of(column, text, allowed))
    return text


def _not_one_of(column: str, text: str, allowed: Sequence[str]) -> str:
    message = f"{column} {text!r} is not one of {list(allowed)}"
    by_lower = {value.lower(): value for value in allowed}
    close = by_lower.get(text.lower()) or next(iter(difflib.get_close_matches(text, allowed, n=1, cutoff=0.6)), None)
    return f"{message} (did you mean {close!r}?)" if close else message


def candidate_features() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """All columns before dropping: (z-scored columns, one-hot columns), in encoding order."""
    scaled = (*schema.CONTINUOUS, *(f"dose_{name}" for name in DOSE_FEATURES))
    one_hot = tuple(f"{column}={value}" for column, values in schema.CATEGORICAL.items() for value in values)
    return scaled, one_hot


def _raw_matrix(records: Sequence[ClinicalRecord], dose_features: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Unscaled candidate columns, shape (n, len(scaled) + len(one_hot)); a NaN dose is a case error."""
    if len(records) != len(dose_features):
        raise ValueError(f"got {len(records)} clinical records but {len(dose_features)} dose feature sets")
    scaled, one_hot = candidate_features()
    rows = []
    for record, dose in zip(records, dose_features):
        values = [float(getattr(record, name)) for name in schema.CONTINUOUS]
        for name in DOSE_FEATURES:
            if name not in dose:
                raise ValueError(f"{record.case_id}: dose features lack {name!r}; expected {list(DOSE_FEATURES)}")
            if not math.isfinite(dose[name]):
                raise CaseError(record.case_id, f"dose {name} is {dose[name]} (empty lesion or dose grid not "
                                                "covering it?); such a case must be excluded before encoding")
            values.append(float(dose[name]))
        for column, allowed in schema.CATEGORICAL.items():
            value = getattr(record, column)
            if value not in allowed:
                raise ValueError(f"{record.case_id}: {column} {value!r} is not one of {list(allowed)}")
            values.extend(float(value == level) for level in allowed)
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(scaled) + len(one_hot))


@dataclass(frozen=True, eq=False)
class ClinicalStats:
    """Pooled sums over cases, per candidate column (``candidate_features()`` order).

    What a site sends instead of its cases; sums add up across sites, so pooled means and standard
    deviations are exact.
    """

    sums: np.ndarray
    sum_squares: np.ndarray
    count: int

    def __post_init__(self) -> None:
        n_columns = sum(len(group) for group in candidate_features())
        sums = np.array(self.sums, dtype=np.float64)
        sum_squares = np.array(self.sum_squares, dtype=np.float64)
        if sums.shape != (n_columns,) or sum_squares.shape != (n_columns,):
            raise ValueError(f"ClinicalStats needs sums and sum_squares of shape ({n_columns},), "
                             f"got {sums.shape} and {sum_squares.shape}")
        if int(self.count) < 1:
            raise ValueError(f"ClinicalStats needs count >= 1, got {self.count}")
        for array in (sums, sum_squares):
            array.setflags(write=False)
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "sum_squares", sum_squares)
        object.__setattr__(self, "count", int(self.count))

    @classmethod
    def combine(cls, parts: Sequence[ClinicalStats]) -> ClinicalStats:
        """The server's step: add the sites' sums."""
        if not parts:
            raise ValueError("ClinicalStats.combine needs at least one ClinicalStats, got none")
        return cls(sum(p.sums for p in parts), sum(p.sum_squares for p in parts), sum(p.count for p in parts))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums.copy(), "sum_squares": self.sum_squares.copy(),
                "count": np.array([self.count], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ClinicalStats:
        expected = {"sums", "sum_squares", "count"}
        if set(arrays) != expected:
            raise ValueError(f"ClinicalStats arrays must have keys {sorted(expected)}, got {sorted(arrays)}")
        return cls(arrays["sums"], arrays["sum_squares"], int(np.asarray(arrays["count"]).ravel()[0]))


def fit_clinical_stats(
    records: Sequence[ClinicalRecord], dose_features: Sequence[Mapping[str, float]]
) -> ClinicalStats:
    """A site's sums over its (training) cases; ``dose_features[i]`` are ``records[i]``'s dose statistics (Gy)."""
    if not records:
        raise ValueError("fit_clinical_stats needs at least one record, got none")
    raw = _raw_matrix(records, dose_features)
    return ClinicalStats(raw.sum(axis=0), (raw**2).sum(axis=0), len(records))


@dataclass(frozen=True)
class FeatureManifest:
    """The encoding contract: column order, scaling, and which columns were dropped and why.

    ``encode`` computes ``(raw[features] - center) / scale``; one-hot columns have center 0, scale 1.
    """

    features: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]
    dropped: tuple[tuple[str, str], ...]
    count: int
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.center) == len(self.scale):
            raise ValueError(f"FeatureManifest: {len(self.features)} features, {len(self.center)} centers and "
                             f"{len(self.scale)} scales must match")
        known = set(candidate_features()[0] + candidate_features()[1])
        unknown = [name for name in self.features if name not in known]
        if unknown:
            raise ValueError(f"FeatureManifest: unknown feature(s) {unknown}; known: {sorted(known)}")
        if self.version != MANIFEST_VERSION:
            raise ValueError(f"FeatureManifest version {self.version} is not supported (expected {MANIFEST_VERSION})")
        if any(not (math.isfinite(s) and s > 0) for s in self.scale):
            raise ValueError(f"FeatureManifest: scales must be positive, got {self.scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FeatureManifest:
        data = json.loads(text)
        fields = set(cls.__dataclass_fields__)
        if set(data) != fields:
            raise ValueError(f"FeatureManifest JSON must have keys {sorted(fields)}, got {sorted(data)}")
        return cls(
            features=tuple(data["features"]),
            center=tuple(float(v) for v in data["center"]),
            scale=tuple(float(v) for v in data["scale"]),
            dropped=tuple((str(name), str(reason)) for name, reason in data["dropped"]),
            count=int(data["count"]),
            version=int(data["version"]),
        )


def build_manifest(stats: ClinicalStats) -> FeatureManifest:
    """Column order, z-score statistics and dropped columns from pooled sums (rule: module docstring)."""
    scaled, one_hot = candidate_features()
    mean = stats.sums / stats.count
    std = np.sqrt(np.maximum(stats.sum_squares / stats.count - mean**2, 0.0))
    # Relative tolerance: sum-of-squares cancellation leaves std ~1e-7 * |mean| for a constant column.
    constant = std <= 1e-6 * np.maximum(np.abs(mean), 1.0)
    reference = {f"{column}={values[0]}" for column, values in schema.CATEGORICAL.items()}
    features, center, scale, dropped = [], [], [], []
    for index, name in enumerate((*scaled, *one_hot)):
        if name in reference:
            dropped.append((name, "reference level: the category's one-hot columns sum to 1"))
        elif constant[index]:
            dropped.append((name, f"constant over the {stats.count} pooled cases (value {mean[index]:g})"))
        else:
            features.append(name)
            is_scaled = name in scaled
            center.append(float(mean[index]) if is_scaled else 0.0)
            scale.append(float(std[index]) if is_scaled else 1.0)
    return FeatureManifest(tuple(features), tuple(center), tuple(scale), tuple(dropped), stats.count)


def encode(
    records: Sequence[ClinicalRecord],
    dose_features: Sequence[Mapping[str, float]],
    manifest: FeatureManifest,
) -> np.ndarray:
    """Feature matrix, shape ``(n, len(manifest.features))``, float32, columns in manifest order.

    Raises:
        CaseError: a NaN/inf dose feature (the lesion dose could not be computed).
    """
    scaled, one_hot = candidate_features()
    index = {name: i for i, name in enumerate((*scaled, *one_hot))}
    raw = _raw_matrix(records, dose_features)
    columns = [index[name] for name in manifest.features]
    encoded = (raw[:, columns] - np.asarray(manifest.center)) / np.asarray(manifest.scale)
    return encoded.astype(np.float32)
