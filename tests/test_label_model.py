"""The generative label model, without images: the Bayes AUC is reachable and every signal group counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from psp_model import schema
from simulation.label_model import (
    DESIGN_COLUMNS,
    ClinicalPrior,
    LabelModel,
    design_matrix,
    sample_cases,
    sample_clinical,
)

N = 20_000
CLINICAL_AND_DOSE = tuple(c for c in DESIGN_COLUMNS if c != "u")


@pytest.fixture(scope="module")
def samples() -> tuple[dict, dict]:
    rng = np.random.default_rng(2025)
    return sample_cases(rng, N), sample_cases(rng, N)


def _held_out_auc(train: dict, test: dict, columns: tuple[str, ...], labels: np.ndarray | None = None) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(design_matrix(train, columns), train["label"] if labels is None else labels)
    return roc_auc_score(test["label"], model.predict_proba(design_matrix(test, columns))[:, 1])


def test_logistic_regression_reaches_bayes_auc_and_permuted_labels_do_not(samples):
    train, test = samples
    bayes = roc_auc_score(test["label"], test["p_tp"])
    # sd of an AUC near 0.89 with 20k cases is ~0.003: allow ~3 sd.
    assert 0.85 <= bayes <= 0.92
    assert _held_out_auc(train, test, DESIGN_COLUMNS) == pytest.approx(bayes, abs=0.01)
    # A model fitted to noise ranks along a random direction: single AUCs spread widely (sd ~0.13)
    # around 0.5, so average over permutations (sd of the mean of 20 ~0.03).
    permuted = [
        _held_out_auc(train, test, DESIGN_COLUMNS, labels=np.random.default_rng(k).permutation(train["label"]))
        for k in range(20)
    ]
    assert np.mean(permuted) == pytest.approx(0.5, abs=0.1)


def test_each_signal_group_matters(samples):
    train, test = samples
    everything = _held_out_auc(train, test, DESIGN_COLUMNS)
    assert _held_out_auc(train, test, CLINICAL_AND_DOSE) < everything - 0.05
    assert _held_out_auc(train, test, ("u",)) < everything - 0.1
    assert _held_out_auc(train, test, ("d98",)) > 0.6
    assert _held_out_auc(train, test, ("mgmt_methylated", "mgmt_unmethylated")) > 0.6
    assert _held_out_auc(train, test, ("log_days_since_rt",)) > 0.6


def test_sex_and_age_carry_no_signal(samples):
    train, test = samples
    assert _held_out_auc(train, test, ("sex_M", "age")) == pytest.approx(0.5, abs=0.02)


def test_directions_of_the_effects():
    model = LabelModel()
    base = dict(mgmt=["unknown"], idh=["unknown"], days_since_rt=200, d98=40.0, u=0.5)
    logit = model.logit(**base)[0]
    assert model.logit(**{**base, "mgmt": ["methylated"]})[0] < logit  # methylated -> PsP
    assert model.logit(**{**base, "days_since_rt": 40})[0] < logit  # early -> PsP
    assert model.logit(**{**base, "d98": 58.0})[0] < logit  # high dose -> PsP
    assert model.logit(**{**base, "u": 0.9})[0] > logit  # nodular pattern -> TP


def test_prevalence_is_near_the_papers(samples):
    train, _ = samples
    assert 0.5 <= train["label"].mean() <= 0.65


def test_clinical_values_follow_the_schema():
    table = sample_clinical(np.random.default_rng(1), 5000)
    for name, allowed in schema.CATEGORICAL.items():
        assert set(table[name]) == set(allowed)  # every category, `unknown` included, appears
    assert table["age"].dtype.kind == "i" and 18 <= table["age"].min() and table["age"].max() <= 90
    assert abs(table["age"].mean() - 58) < 1
    assert table["days_since_rt"].min() >= 20 and table["days_since_rt"].max() <= 500
    assert 0.3 < (table["days_since_rt"] < 90).mean() < 0.6


def test_same_generator_state_gives_the_same_cases():
    first = sample_cases(np.random.default_rng(7), 50)
    second = sample_cases(np.random.default_rng(7), 50)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_bad_inputs_are_refused_with_the_value():
    model = LabelModel()
    with pytest.raises(ValueError, match=r"days_since_rt must be > 0, got min 0"):
        model.logit(mgmt=["unknown"], idh=["unknown"], days_since_rt=[0], d98=[40.0], u=[0.5])
    with pytest.raises(ValueError, match=r"d98 has NaN values: the lesion had no voxel inside the dose grid"):
        model.logit(mgmt=["unknown"], idh=["unknown"], days_since_rt=[50], d98=[np.nan], u=[0.5])
    with pytest.raises(ValueError, match=r"unknown design column\(s\) \['kps'\]; use any of"):
        design_matrix(sample_cases(np.random.default_rng(0), 5), ("age", "kps"))
    with pytest.raises(ValueError, match=r"ClinicalPrior.sex has categories \['F', 'M', 'X'\], expected \['F', 'M'\]"):
        sample_clinical(np.random.default_rng(0), 5, ClinicalPrior(sex={"F": 0.4, "M": 0.5, "X": 0.1}))
