"""Nyul histogram standardisation: local fit, server combine, application."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from psp_model.errors import InputError
from psp_model.preprocess.nyul import (
    PERCENTILES,
    STANDARD_RANGE,
    NyulLandmarks,
    NyulStandardized,
    combine_landmarks,
    fit_nyul,
    image_landmarks,
    standardize,
)

SHAPE = (12, 14, 10)


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[2:10, 2:12, 2:8] = True
    return mask


def _image(seed: int) -> np.ndarray:
    """Two channels (t1ce, flair) with site-like gain and offset; background 0."""
    rng = np.random.default_rng(seed)
    gain, offset = rng.uniform(0.5, 3), rng.uniform(0, 200)
    t1ce = offset + gain * rng.gamma(3, 50, SHAPE)
    flair = offset / 2 + gain * rng.lognormal(4, 0.4, SHAPE)
    return np.where(_mask(), np.stack([t1ce, flair]), 0).astype(np.float32)


def test_own_landmarks_land_on_the_standard_scale():
    image = _image(0)
    landmarks = fit_nyul([image], [_mask()])
    assert landmarks.n_images == 1 and landmarks.modalities == ("t1ce", "flair")
    for channel, modality in enumerate(landmarks.modalities):
        target = landmarks.landmarks[modality]
        assert (target[0], target[-1]) == pytest.approx(STANDARD_RANGE)
        out = standardize(image[channel], target, _mask())
        assert np.allclose(image_landmarks(out, _mask()), target, atol=1e-3)


def test_other_image_mapped_onto_fitted_landmarks():
    landmarks = fit_nyul([_image(seed) for seed in range(4)], [_mask()] * 4)
    out = standardize(_image(9)[0], landmarks.landmarks["t1ce"], _mask())
    # Not exact: np.percentile interpolates between voxels on either side of a landmark.
    assert np.allclose(image_landmarks(out, _mask()), landmarks.landmarks["t1ce"], atol=0.02)


def test_mask_respected():
    image = _image(1)[0]
    noisy = image + np.where(_mask(), 0, 1e4).astype(np.float32)
    target = fit_nyul([_image(1)], [_mask()]).landmarks["t1ce"]
    out, out_noisy = standardize(image, target, _mask()), standardize(noisy, target, _mask())
    assert np.array_equal(out, out_noisy)
    assert np.all(out[~_mask()] == 0)


def test_combining_sites_equals_fitting_on_all_images():
    images = [_image(seed) for seed in range(7)]
    site_a, site_b = fit_nyul(images[:3], [_mask()] * 3), fit_nyul(images[3:], [_mask()] * 4)
    combined = combine_landmarks([site_a, site_b])
    pooled = fit_nyul(images, [_mask()] * 7)
    assert combined.n_images == 7
    for modality in pooled.modalities:
        assert np.allclose(combined.landmarks[modality], pooled.landmarks[modality], rtol=1e-12)


def test_landmarks_match_torchio_training(tmp_path: Path):
    torchio = pytest.importorskip("torchio")
    images = [_image(seed)[0] for seed in range(3)]
    paths, mask_paths = [], []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"image{index}.nii.gz")
        mask_paths.append(tmp_path / f"mask{index}.nii.gz")
        nib.save(nib.Nifti1Image(image, np.eye(4)), paths[-1])
        nib.save(nib.Nifti1Image(_mask().astype(np.uint8), np.eye(4)), mask_paths[-1])
    expected = torchio.HistogramStandardization.train(paths, mask_path=mask_paths, progress=False)
    ours = fit_nyul([image[None] for image in images], [_mask()] * 3, modalities=("t1ce",))
    assert np.allclose(ours.landmarks["t1ce"], expected, atol=1e-4)


def test_arrays_round_trip():
    landmarks = fit_nyul([_image(2)], [_mask()])
    arrays = landmarks.to_arrays()
    assert set(arrays) == {"t1ce", "flair", "n_images"}
    assert all(a.dtype == np.float64 for a in arrays.values())
    again = NyulLandmarks.from_arrays(arrays)
    assert again.n_images == 1
    assert np.array_equal(again.landmarks["flair"], landmarks.landmarks["flair"])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [({"t1ce": np.arange(13.0)}, r"lack 'n_images'"),
     ({"t1ce": np.arange(13.0), "n_images": np.array([1.5])}, r"'n_images' must be one whole number"),
     ({"t1ce": np.arange(12.0), "n_images": np.array([2.0])}, r"landmarks of 't1ce' must have shape \(13,\)"),
     ({"t1ce": np.arange(13.0)[::-1], "n_images": np.array([2.0])}, r"must be finite and non-decreasing"),
     ({"t1ce": np.arange(13.0), "n_images": np.array([0.0])}, r"needs n_images >= 1"),
     ({"n_images": np.array([1.0])}, r"at least one modality")],
)
def test_arrays_rejected(arrays, match):
    with pytest.raises(ValueError, match=match):
        NyulLandmarks.from_arrays(arrays)


def test_landmarks_are_read_only():
    landmarks = fit_nyul([_image(2)], [_mask()])
    with pytest.raises(ValueError, match="read-only"):
        landmarks.landmarks["t1ce"][0] = 5.0


def test_combine_rejects_different_modalities():
    a = fit_nyul([_image(0)], [_mask()])
    b = fit_nyul([_image(0)[:1]], [_mask()], modalities=("t1",))
    with pytest.raises(ValueError, match=r"cannot combine landmarks for \['t1'\] with \['t1ce', 'flair'\]"):
        combine_landmarks([a, b])
    with pytest.raises(ValueError, match="at least one"):
        combine_landmarks([])


def test_fit_errors():
    with pytest.raises(ValueError, match="at least one image"):
        fit_nyul([], [])
    with pytest.raises(ValueError, match=r"image 0 has 1 channels, expected 2"):
        fit_nyul([_image(0)[:1]], [_mask()])
    with pytest.raises(InputError, match=r"image 0: the brain mask is empty"):
        fit_nyul([_image(0)], [np.zeros(SHAPE, bool)])
    with pytest.raises(InputError, match=r"image 0 t1ce: 1st and 99th percentiles are equal"):
        fit_nyul([np.where(_mask(), 7.0, 0.0)[None].repeat(2, axis=0)], [_mask()])
    with pytest.raises(ValueError, match=r"zip\(\)"):
        fit_nyul([_image(0)], [_mask(), _mask()])


def test_standardize_refuses_constant_image():
    with pytest.raises(InputError, match=r"constant inside the mask \(7\)"):
        standardize(np.where(_mask(), 7.0, 0.0), np.linspace(0, 100, len(PERCENTILES)), _mask())


def test_dict_transform_keeps_metatensor():
    image = _image(3)
    landmarks = fit_nyul([image], [_mask()])
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    data = {"t1ce": MetaTensor(image[:1], affine=affine), "flair": MetaTensor(image[1:], affine=affine),
            "brain": MetaTensor(_mask()[None])}
    out = NyulStandardized(["t1ce", "flair"], landmarks, mask_key="brain")(data)
    assert isinstance(out["t1ce"], MetaTensor) and torch.equal(out["t1ce"].affine, affine)
    expected = standardize(image[1], landmarks.landmarks["flair"], _mask())
    assert np.allclose(out["flair"][0].numpy(), expected)


def test_dict_transform_rejects_unknown_key():
    landmarks = fit_nyul([_image(3)], [_mask()])
    with pytest.raises(ValueError, match=r"no landmarks for key\(s\) \['t2'\]; landmarks are for \['t1ce', 'flair'\]"):
        NyulStandardized(["t1ce", "t2"], landmarks, mask_key="brain")


def test_dict_transform_rejects_shape_mismatch():
    landmarks = fit_nyul([_image(3)], [_mask()])
    data = {"t1ce": _image(3)[:1], "brain": _mask()[None, :, :, :5]}
    with pytest.raises(ValueError, match=r"'t1ce' has shape \(1, 12, 14, 10\), mask 'brain' has \(1, 12, 14, 5\)"):
        NyulStandardized(["t1ce"], landmarks, mask_key="brain")(data)
