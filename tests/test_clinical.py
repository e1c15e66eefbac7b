"""Clinical parsing, federated z-score statistics, the feature manifest and the shared encoder."""

from __future__ import annotations

import numpy as np
import pytest

from psp_model.errors import CaseError
from psp_model.preprocess.clinical import (
    ClinicalRecord,
    ClinicalStats,
    FeatureManifest,
    build_manifest,
    encode,
    fit_clinical_stats,
    parse_clinical,
)

ROW = {"case_id": "c1", "label": "TP", "age": "61", "sex": "M", "idh": "wildtype", "mgmt": "unknown",
       "days_since_rt": "92"}


def _row(**changes: str) -> dict[str, str]:
    return {**ROW, **changes}


def test_parse_valid_row():
    record = parse_clinical("c1", ROW, require_label=True)
    assert record == ClinicalRecord("c1", 1, 61.0, "M", "wildtype", "unknown", 92.0)
    assert parse_clinical("c1", _row(label="PsP"), require_label=True).label == 0
    assert parse_clinical("c1", _row(label=""), require_label=False).label is None


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (None, r"c1: no row in clinical\.csv"),
        ({k: v for k, v in ROW.items() if k != "mgmt"}, r"lacks column\(s\) \['mgmt'\]"),
        (_row(age="abc"), r"age 'abc' is not a number"),
        (_row(age=""), r"age is empty"),
        (_row(age="nan"), r"age 'nan' is not a finite number"),
        (_row(age="130"), r"age 130 is outside 0\.\.120 years"),
        (_row(age="-1"), r"age -1 is outside"),
        (_row(days_since_rt="-3"), r"days_since_rt -3 is negative"),
        (_row(days_since_rt="ninety"), r"days_since_rt 'ninety' is not a number"),
        (_row(idh="Mutant"), r"idh 'Mutant' is not one of \['mutant', 'wildtype', 'unknown'\] "
                             r"\(did you mean 'mutant'\?\)"),
        (_row(mgmt="unmethylatd"), r"mgmt 'unmethylatd' is not one of .*\(did you mean 'unmethylated'\?\)"),
        (_row(sex="female"), r"sex 'female' is not one of \['F', 'M'\]$"),
        (_row(idh=""), r"idh '' is not one of"),
        (_row(label=""), r"label is missing; it must be one of \['TP', 'PsP'\]"),
        (_row(label="tp"), r"label 'tp' is not one of \['TP', 'PsP'\] \(did you mean 'TP'\?\)"),
        (_row(label="progression"), r"label 'progression' is not one of"),
    ],
)
def test_parse_errors(row, match):
    with pytest.raises(CaseError, match=match) as caught:
        parse_clinical("c1", row, require_label=True)
    assert caught.value.case_id == "c1"


def _cohort(seed: int, n: int) -> tuple[list[ClinicalRecord], list[dict[str, float]]]:
    rng = np.random.default_rng(seed)
    records = [
        ClinicalRecord(f"s{seed}-{i}", int(rng.integers(2)), float(rng.uniform(30, 80)), str(rng.choice(["F", "M"])),
                       str(rng.choice(["mutant", "wildtype", "unknown"])), str(rng.choice(["methylated", "unknown"])),
                       float(rng.uniform(20, 400)))
        for i in range(n)
    ]
    doses = [dict(zip(("mean", "min", "median", "d98"), sorted(rng.uniform(30, 62, 4))[::-1])) for _ in range(n)]
    return records, doses


def test_combined_stats_equal_pooled_numpy():
    (r1, d1), (r2, d2) = _cohort(1, 7), _cohort(2, 12)
    combined = ClinicalStats.combine([fit_clinical_stats(r1, d1), fit_clinical_stats(r2, d2)])
    manifest = build_manifest(combined)
    ages = np.array([r.age for r in r1 + r2])
    d98 = np.array([d["d98"] for d in d1 + d2])
    index = manifest.features.index
    assert manifest.count == 19
    assert manifest.center[index("age")] == pytest.approx(ages.mean(), rel=1e-12)
    assert manifest.scale[index("age")] == pytest.approx(ages.std(), rel=1e-9)
    assert manifest.scale[index("dose_d98")] == pytest.approx(d98.std(), rel=1e-9)
    x = encode(r1 + r2, d1 + d2, manifest)
    z = x[:, :6]
    assert np.allclose(z.mean(axis=0), 0, atol=1e-5) and np.allclose(z.std(axis=0), 1, atol=1e-5)


def test_feature_order_one_hot_and_drops_recorded():
    records, doses = _cohort(3, 20)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    assert manifest.features == (
        "age", "days_since_rt", "dose_mean", "dose_min", "dose_median", "dose_d98",
        "sex=M", "idh=wildtype", "idh=unknown", "mgmt=unknown",
    )
    dropped = dict(manifest.dropped)
    assert set(dropped) == {"sex=F", "idh=mutant", "mgmt=methylated", "mgmt=unmethylated"}
    assert dropped["sex=F"].startswith("reference level")
    assert dropped["mgmt=unmethylated"] == "constant over the 20 pooled cases (value 0)"
    x = encode(records, doses, manifest)
    assert x.shape == (20, 10) and x.dtype == np.float32
    for row, record in zip(x, records):
        assert row[6] == (record.sex == "M")
        assert (row[7], row[8]) == (record.idh == "wildtype", record.idh == "unknown")
        assert row[9] == (record.mgmt == "unknown")


def test_encode_order_stable_under_record_order():
    records, doses = _cohort(4, 9)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    forward = encode(records, doses, manifest)
    backward = encode(records[::-1], doses[::-1], manifest)
    assert np.array_equal(forward, backward[::-1])
    assert np.array_equal(encode(records[:1], doses[:1], manifest), forward[:1])


def test_manifest_json_round_trip():
    records, doses = _cohort(5, 8)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    again = FeatureManifest.from_json(manifest.to_json())
    assert again == manifest
    assert np.array_equal(encode(records, doses, again), encode(records, doses, manifest))


def test_manifest_rejects_foreign_json():
    records, doses = _cohort(5, 8)
    text = build_manifest(fit_clinical_stats(records, doses)).to_json().replace('"age"', '"weight"')
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['weight'\]"):
        FeatureManifest.from_json(text)
    with pytest.raises(ValueError, match=r"must have keys"):
        FeatureManifest.from_json('{"features": []}')


def test_stats_travel_as_arrays():
    records, doses = _cohort(6, 5)
    stats = fit_clinical_stats(records, doses)
    again = ClinicalStats.from_arrays(stats.to_arrays())
    assert again.count == 5 and np.array_equal(again.sums, stats.sums)
    with pytest.raises(ValueError, match=r"must have keys"):
        ClinicalStats.from_arrays({"sums": stats.sums})


def test_encode_refuses_nan_dose():
    records, doses = _cohort(7, 4)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    doses[2] = {**doses[2], "d98": float("nan")}
    with pytest.raises(CaseError, match=r"s7-2: dose d98 is nan \(empty lesion"):
        encode(records, doses, manifest)
    with pytest.raises(CaseError, match=r"dose d98 is nan"):
        fit_clinical_stats(records, doses)


def test_encode_refuses_mismatched_lengths():
    records, doses = _cohort(8, 4)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    with pytest.raises(ValueError, match=r"got 4 clinical records but 3 dose feature sets"):
        encode(records, doses[:3], manifest)
