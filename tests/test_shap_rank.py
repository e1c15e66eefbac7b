"""SHAP ranking of the clinical + dose features: signal vs negative controls, additivity, raw-feature
grouping, the multimodal head, the federated combination and the feature selection."""

from __future__ import annotations

import numpy as np
import pytest
import shap
import torch
from torch import nn

from psp_model.evaluate.shap_rank import (
    clinical_shap,
    combine_site_shap,
    mean_abs_shap,
    rank_features,
    raw_feature_names,
    select_features,
    subset_manifest,
)
from psp_model.nets.fusion import HeadConfig, PSPClassifier, build_classifier, build_head
from psp_model.preprocess.clinical import ClinicalRecord, build_manifest, encode, fit_clinical_stats
from psp_model.train.finetune import ClassifierData, FinetuneConfig, predict_proba, train_classifier
from simulation.label_model import sample_cases

SIGNAL = ("mgmt", "dose_d98", "days_since_rt")


def _cohort(seed: int, n: int) -> tuple[list[ClinicalRecord], list[dict[str, float]], np.ndarray]:
    """Cases from the known label model; dose mean/min/median are drawn independently of the label
    (extra negative controls next to sex and age), D98 is the label model's."""
    rng = np.random.default_rng(seed)
    table = sample_cases(rng, n)
    records = [ClinicalRecord(f"c{seed}-{i}", int(table["label"][i]), float(table["age"][i]), str(table["sex"][i]),
                              str(table["idh"][i]), str(table["mgmt"][i]), float(table["days_since_rt"][i]))
               for i in range(n)]
    noise = rng.uniform(20.0, 62.0, size=(n, 3))
    doses = [{"mean": noise[i, 0], "min": noise[i, 1], "median": noise[i, 2], "d98": float(table["d98"][i])}
             for i in range(n)]
    return records, doses, table["label"]


@pytest.fixture(scope="module")
def site():
    """A clinical-only head trained on 300 label-model cases, its manifest and encoded train/validation rows."""
    records, doses, labels = _cohort(0, 300)
    manifest = build_manifest(fit_clinical_stats(records, doses))
    train = ClassifierData(None, encode(records, doses, manifest), labels)
    torch.manual_seed(0)
    model = build_classifier(HeadConfig(n_clinical=len(manifest.features), dim=8, variant="clinical-only"))
    train_classifier(model, train, None, FinetuneConfig(lr=3e-3, epochs=20, batch_size=32, patience=None,
                                                        device="cpu", precision="fp32"), progress=False)
    val_records, val_doses, val_labels = _cohort(100, 20)
    val = ClassifierData(None, encode(val_records, val_doses, manifest), val_labels)
    background = ClassifierData(None, train.clinical[:40], train.labels[:40])
    return model, manifest, background, val


def test_signal_features_rank_above_negative_controls(site):
    model, manifest, background, val = site
    values = clinical_shap(model, val, background, manifest)
    ranking = rank_features(raw_feature_names(manifest), mean_abs_shap(values))
    names = [name for name, _ in ranking]
    assert set(names[:3]) == set(SIGNAL), ranking
    score = dict(ranking)
    assert max(score["sex"], score["age"]) < min(score[name] for name in SIGNAL), ranking


@pytest.mark.parametrize("max_evals", [None, 40])
def test_base_value_plus_shap_values_is_the_model_output(site, max_evals):
    model, manifest, background, val = site
    values = clinical_shap(model, val, background, manifest, max_evals=max_evals)
    base = predict_proba(model, background, device="cpu", precision="fp32").mean()
    np.testing.assert_allclose(base + values.sum(axis=1), predict_proba(model, val, device="cpu", precision="fp32"),
                               atol=1e-5)


def test_permutation_estimate_is_seeded_and_leaves_numpy_global_state_alone(site):
    model, manifest, background, val = site
    state = np.random.get_state()[1].copy()
    first = clinical_shap(model, val, background, manifest, max_evals=40, seed=3)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    np.testing.assert_array_equal(first, clinical_shap(model, val, background, manifest, max_evals=40, seed=3))
    assert not np.array_equal(first, clinical_shap(model, val, background, manifest, max_evals=40, seed=4))


def test_one_hot_columns_are_one_raw_feature(site):
    """For a model linear in the columns, a raw feature's value is the sum of its columns' SHAP values."""
    _, manifest, background, val = site
    n_columns = len(manifest.features)
    head = build_head(HeadConfig(n_clinical=n_columns, dim=8, variant="clinical-only"))
    head.mlp = nn.Linear(n_columns, 1)  # logit linear in the encoded columns
    model = PSPClassifier(head, None)
    values = clinical_shap(model, val, background, manifest, output="logit")

    raw = raw_feature_names(manifest)
    assert {"idh=wildtype", "idh=unknown"} <= set(manifest.features) and len(raw) < n_columns
    assert values.shape == (len(val), len(raw))
    linear = (head.mlp.weight.detach().numpy()[0], head.mlp.bias.detach().numpy())
    per_column = shap.explainers.Linear(linear, background.clinical.numpy())(val.clinical.numpy()).values
    for j, name in enumerate(raw):
        columns = [i for i, column in enumerate(manifest.features) if column.split("=")[0] == name]
        np.testing.assert_allclose(values[:, j], per_column[:, columns].sum(axis=1), atol=1e-5, err_msg=name)


class _PatchEncoder(nn.Module):
    """Stand-in frozen encoder: 2 x 8^3 volumes -> 8 tokens of width 16."""

    hidden_size = 16

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(2, 16, kernel_size=4, stride=4)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.embed(volumes).flatten(2).transpose(1, 2)


def test_multimodal_head_holds_each_cases_tokens_fixed(site):
    _, manifest, background, val = site
    torch.manual_seed(1)
    head = build_head(HeadConfig(n_clinical=len(manifest.features), dim=16, num_heads=2, variant="multimodal"))
    model = PSPClassifier(head, _PatchEncoder())
    volumes = torch.randn(6, 2, 8, 8, 8)
    tokens = model.tokens(volumes)
    cases = ClassifierData(tokens, val.clinical[:6], val.labels[:6])
    values = clinical_shap(model, cases, background, manifest, max_evals=60)

    assert values.shape == (6, len(raw_feature_names(manifest)))
    m = len(background)
    base = [predict_proba(model, ClassifierData(tokens[i : i + 1].expand(m, -1, -1), background.clinical,
                                                background.labels), device="cpu", precision="fp32").mean()
            for i in range(6)]
    np.testing.assert_allclose(np.array(base) + values.sum(axis=1),
                               predict_proba(model, cases, device="cpu", precision="fp32"), atol=1e-5)
    from_volumes = clinical_shap(model, ClassifierData(volumes, cases.clinical, cases.labels), background, manifest,
                                 max_evals=60)
    np.testing.assert_allclose(from_volumes, values, atol=1e-6)


def test_clinical_shap_rejects_bad_inputs(site):
    model, manifest, background, val = site
    narrow = ClassifierData(None, val.clinical[:, :-1], val.labels)
    with pytest.raises(ValueError, match=r"data has 10 clinical columns but the manifest lists 11 \(age, "):
        clinical_shap(model, narrow, background, manifest)
    with pytest.raises(ValueError, match=r"background has 1 case\(s\); SHAP needs at least 2 per site"):
        clinical_shap(model, val, ClassifierData(None, background.clinical[:1], background.labels[:1]), manifest)
    with pytest.raises(ValueError, match=r"data has 1 case\(s\)"):
        clinical_shap(model, ClassifierData(None, val.clinical[:1], val.labels[:1]), background, manifest)
    with pytest.raises(ValueError, match=r"max_evals must be >= 2 \* 9 raw features \+ 1 = 19"):
        clinical_shap(model, val, background, manifest, max_evals=10)
    with pytest.raises(ValueError, match=r"output must be 'probability' or 'logit'; got 'odds'"):
        clinical_shap(model, val, background, manifest, output="odds")
    mri_only = PSPClassifier(build_head(HeadConfig(n_clinical=11, dim=16, variant="mri-only")), _PatchEncoder())
    with pytest.raises(ValueError, match=r"mri-only head ignores the clinical features"):
        clinical_shap(mri_only, val, background, manifest)
    with pytest.raises(TypeError, match=r"model must be a PSPClassifier; got Linear"):
        clinical_shap(nn.Linear(11, 1), val, background, manifest)
    multimodal = PSPClassifier(build_head(HeadConfig(n_clinical=11, dim=16, num_heads=2)), _PatchEncoder())
    with pytest.raises(ValueError, match=r"multimodal head needs data.images"):
        clinical_shap(multimodal, val, background, manifest)


def test_combine_rank_and_select_on_hand_made_numbers():
    values = np.array([[0.25, -0.5, 0.0], [-0.75, 0.5, 0.0]])
    np.testing.assert_array_equal(mean_abs_shap(values), [0.5, 0.5, 0.0])
    combined = combine_site_shap([(np.array([0.5, 0.5, 0.0]), 2), (np.array([0.0, 0.75, 0.125]), 6)])
    np.testing.assert_array_equal(combined, [0.125, 0.6875, 0.09375])  # = mean |SHAP| over the 8 pooled cases
    ranking = rank_features(["age", "mgmt", "sex", "idh"], np.array([0.125, 0.6875, 0.125, 0.0]))
    assert ranking == [("mgmt", 0.6875), ("age", 0.125), ("sex", 0.125), ("idh", 0.0)]  # ties keep the given order
    assert select_features(ranking, {1: 0.70, 2: 0.81, 3: 0.81}) == 2  # tie -> fewer features
    assert select_features(ranking, {1: 0.70, 3: 0.75}) == 3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mean_abs_shap(np.zeros((1, 3))), r"shape \(n, P\) with n >= 2 cases; got \(1, 3\)"),
        (lambda: mean_abs_shap(np.full((2, 3), np.nan)), r"values hold NaN or inf"),
        (lambda: combine_site_shap([]), r"needs at least one"),
        (lambda: combine_site_shap([(np.zeros(3), 4), (np.zeros(2), 4)]), r"same shape \(P,\); got \[\(3,\), \(2,\)\]"),
        (lambda: combine_site_shap([(np.zeros(3), 1)]), r"integer n_cases >= 2; got \[1\]"),
        (lambda: combine_site_shap([(np.array([0.1, np.nan, 0.0]), 3)]), r"finite and >= 0"),
        (lambda: rank_features(["a", "b"], np.zeros(3)), r"one finite value per feature \(2\); got shape \(3,\)"),
        (lambda: select_features([("a", 1.0)], {}), r"val_auc_by_m is empty"),
        (lambda: select_features([("a", 1.0)], {0: 0.6, 2: 0.7}), r"between 1 and the 1 ranked features; got \[0, 2\]"),
        (lambda: select_features([("a", 1.0), ("b", 0.5)], {1: 0.6, 2: float("nan")}),
         r"undefined \(NaN\) for M = \[2\]"),
    ],
)
def test_aggregation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_subset_manifest_encodes_only_the_kept_features(site):
    _, manifest, background, _ = site
    records, doses, labels = _cohort(5, 8)
    subset = subset_manifest(manifest, ["mgmt", "days_since_rt", "dose_d98"])
    assert raw_feature_names(subset) == ["days_since_rt", "dose_d98", "mgmt"]  # manifest order, not keep order
    assert subset.features == ("days_since_rt", "dose_d98", "mgmt=unmethylated", "mgmt=unknown")
    assert ("age", "not among the selected features") in subset.dropped
    full, kept = encode(records, doses, manifest), encode(records, doses, subset)
    np.testing.assert_array_equal(kept, full[:, [manifest.features.index(c) for c in subset.features]])

    head = build_classifier(HeadConfig(n_clinical=len(subset.features), dim=8, variant="clinical-only"))
    assert predict_proba(head, ClassifierData(None, kept, labels), device="cpu").shape == (8,)
    columns = [manifest.features.index(c) for c in subset.features]
    values = clinical_shap(head, ClassifierData(None, kept, labels),
                           ClassifierData(None, background.clinical[:, columns], background.labels), subset)
    assert values.shape == (8, 3)
    with pytest.raises(ValueError, match=r"keep must name at least one of the manifest's raw features \['age', .*"
                                         r"got \['mgmt', 'grade'\] \(unknown: \['grade'\]\)"):
        subset_manifest(manifest, ["mgmt", "grade"])
    with pytest.raises(ValueError, match=r"got \[\]"):
        subset_manifest(manifest, [])
