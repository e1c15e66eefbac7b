"""Baselines of the paper: Sun et al. radiomics + random forest, Jang et al. CNN-LSTM on 9 axial slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psp_model.errors import InputError
from psp_model.nets.baselines import (
    SUN_FEATURE_NAMES,
    JangCNNLSTM,
    akbari_classifier,
    akbari_features,
    jang_slices,
    lesion_features,
    sun_classifier,
)
from psp_model.train.finetune import ClassifierData, FinetuneConfig, train_classifier


def _sphere(radius: float, size: int = 40, centre: tuple[float, float, float] = (19.5, 19.5, 19.5)) -> np.ndarray:
    grid = np.indices((size, size, size)) - np.asarray(centre)[:, None, None, None]
    return (grid**2).sum(0) <= radius**2


def test_sphere_shape_features_are_close_to_analytic():
    r = 10.0
    mask = _sphere(r)
    features = dict(zip(SUN_FEATURE_NAMES, lesion_features(np.ones(mask.shape), mask)))
    assert len(features) == len(SUN_FEATURE_NAMES)
    assert features["volume_mm3"] == pytest.approx(4 / 3 * np.pi * r**3, rel=0.02)
    assert features["surface_mm2"] == pytest.approx(4 * np.pi * r**2, rel=0.05)
    assert features["sphericity"] == pytest.approx(1.0, abs=0.05)
    assert features["extent"] == pytest.approx(np.pi / 6, rel=0.03)
    for axis in ("axis_major_mm", "axis_minor_mm", "axis_least_mm"):
        assert features[axis] == pytest.approx(2 * r, rel=0.03)
    assert features["std"] == 0.0 and features["skewness"] == 0.0 and features["entropy"] == 0.0


def test_spacing_scales_volume_and_an_elongated_lesion_is_less_spherical():
    mask = _sphere(6, size=20, centre=(9.5, 9.5, 9.5))
    iso = dict(zip(SUN_FEATURE_NAMES, lesion_features(np.ones(mask.shape), mask)))
    stretched = dict(zip(SUN_FEATURE_NAMES, lesion_features(np.ones(mask.shape), mask, spacing=(3.0, 1.0, 1.0))))
    assert stretched["volume_mm3"] == pytest.approx(3 * iso["volume_mm3"])
    assert stretched["axis_major_mm"] == pytest.approx(3 * iso["axis_major_mm"], rel=0.01)
    assert stretched["sphericity"] < iso["sphericity"] - 0.05


def test_first_order_features_of_known_intensities():
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    image = np.where(mask, rng.normal(3.0, 2.0, mask.shape), 100.0)
    f = dict(zip(SUN_FEATURE_NAMES, lesion_features(image, mask)))
    assert f["mean"] == pytest.approx(3.0, abs=0.1) and f["std"] == pytest.approx(2.0, abs=0.1)
    assert f["kurtosis"] == pytest.approx(3.0, abs=0.2) and abs(f["skewness"]) < 0.1
    assert f["p10"] < f["p25"] < f["median"] < f["p75"] < f["p90"]
    assert f["extent"] == 1.0


def test_lesion_features_reject_bad_input():
    with pytest.raises(InputError, match="lesion mask is empty"):
        lesion_features(np.ones((4, 4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match=r"T1CE \(4, 4, 4\) and lesion mask \(4, 4, 5\) must be 3-D volumes"):
        lesion_features(np.ones((4, 4, 4)), np.ones((4, 4, 5)))


def test_sun_random_forest_fits_features_plus_clinical():
    rng = np.random.default_rng(1)
    rows, labels = [], []
    for i in range(24):
        label = i % 2
        mask = _sphere(3 + 3 * label + rng.integers(0, 2), size=20, centre=(9.5, 9.5, 9.5))
        image = rng.normal(label, 1.0, mask.shape)
        rows.append(np.concatenate([lesion_features(image, mask), rng.normal(size=2)]))
        labels.append(label)
    x, y = np.asarray(rows), np.asarray(labels)
    model = sun_classifier(n_estimators=50, random_state=0).fit(x, y)
    proba = model.predict_proba(x)
    assert proba.shape == (24, 2) and model.class_weight == "balanced"
    assert (proba[:, 1].round() == y).mean() == 1.0
    np.testing.assert_array_equal(sun_classifier(n_estimators=50).fit(x, y).predict_proba(x), proba)


def test_jang_slices_are_centred_on_the_lesion_and_kept_inside():
    image = np.broadcast_to(np.arange(30, dtype=np.float32), (16, 16, 30)).copy()
    mask = np.zeros(image.shape, bool)
    mask[5:9, 5:9, 12:15] = True
    slices = jang_slices(image, mask)
    assert slices.shape == (9, 16, 16)
    np.testing.assert_array_equal(slices[:, 0, 0], np.arange(9, 18))
    mask[:] = False
    mask[5:9, 5:9, 28:30] = True
    np.testing.assert_array_equal(jang_slices(image, mask)[:, 0, 0], np.arange(21, 30))
    with pytest.raises(InputError, match="n_slices must be between 1 and the volume's 30 axial slices; got 31"):
        jang_slices(image, mask, n_slices=31)


def test_jang_cnn_lstm_forward_and_one_training_step():
    torch.manual_seed(0)
    model = JangCNNLSTM(n_clinical=3, channels=(4, 8), lstm_hidden=8, fc_hidden=8)
    slices, clinical = torch.randn(4, 9, 24, 24), torch.randn(4, 3)
    assert model(slices, clinical).shape == (4,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ClassifierData(slices, clinical, np.array([0, 1, 0, 1]))
    result = train_classifier(model, data, None, FinetuneConfig(epochs=1, batch_size=4, device="cpu", precision="fp32"),
                              progress=False)
    assert set(result.state) == set(before)
    assert all(not torch.equal(model.state_dict()[k], before[k]) for k in ("cnn.0.weight", "lstm.weight_ih_l0"))


def test_jang_cnn_lstm_rejects_bad_options_and_shapes():
    with pytest.raises(ValueError, match=r"JangCNNLSTM needs n_clinical >= 0 and positive sizes; got n_clinical=-1"):
        JangCNNLSTM(n_clinical=-1)
    model = JangCNNLSTM(n_clinical=3, channels=(4,), lstm_hidden=4, fc_hidden=4)
    with pytest.raises(ValueError, match=r"expected slices \(B, S, H, W\) and clinical \(B, 3\); got \(2, 9, 8\)"):
        model(torch.randn(2, 9, 8), torch.randn(2, 3))


def test_akbari_svm_on_pooled_tokens_plus_radiomics():
    rng = np.random.default_rng(2)
    labels = np.array([0, 1] * 15)
    tokens = rng.normal(size=(30, 8, 6))
    tokens[:, :, 0] += 2.0 * labels[:, None]
    x = akbari_features(tokens, rng.normal(size=(30, 4)))
    assert x.shape == (30, 10)
    np.testing.assert_allclose(x[:, :6], tokens.mean(axis=1))
    model = akbari_classifier().fit(x, labels)
    assert model.predict_proba(x).shape == (30, 2) and (model.predict(x) == labels).mean() > 0.9
    with pytest.raises(ValueError, match=r"tokens \(n, N, d\) and radiomics \(n, K\); got \(30, 6\) and \(30, 4\)"):
        akbari_features(tokens[:, 0], np.zeros((30, 4)))
