"""MR pipeline on tiny synthetic NIfTI volumes stored LPS on disk (3 mm, 48x56x44)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from psp_model.errors import ConfigError, InputError
from psp_model.layouts.case import Case
from psp_model.preprocess.mri import MRConfig, mr_transforms, preprocess_mr, standardize_mr
from psp_model.preprocess.nyul import fit_nyul

SHAPE = (48, 56, 44)
SPACING = 3.0
# LPS on disk: i runs to the patient's right (RAS x decreases), j to posterior, k up.
LPS_AFFINE = np.array([[-SPACING, 0, 0, 70.0], [0, -SPACING, 0, 80.0], [0, 0, SPACING, -60.0], [0, 0, 0, 1]])
LESION_CENTRE_RAS = np.array([25.0, 10.0, 5.0])


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _volumes(affine: np.ndarray = LPS_AFFINE, shape: tuple[int, ...] = SHAPE, lesion_centre=LESION_CENTRE_RAS):
    rng = np.random.default_rng(0)
    xyz = _world(shape, affine) - _world(shape, affine).reshape(-1, 3).mean(axis=0)
    brain = ((xyz / [60.0, 75.0, 55.0]) ** 2).sum(-1) <= 1
    lesion = np.linalg.norm(_world(shape, affine) - _world(shape, affine).reshape(-1, 3).mean(axis=0)
                            - lesion_centre, axis=-1) <= 12
    t1ce = np.where(brain, 300 + 40 * rng.standard_normal(shape) + 500 * lesion, 0).clip(min=0)
    flair = np.where(brain, 120 + 20 * rng.standard_normal(shape) + 200 * lesion, 0).clip(min=0)
    return t1ce.astype(np.float32), flair.astype(np.float32), (lesion * 4).astype(np.uint8)


def _save(path: Path, array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _case(folder: Path, t1ce=None, flair=None, lesion=None, affine: np.ndarray = LPS_AFFINE) -> Case:
    t, f, l = _volumes()
    folder.mkdir(parents=True, exist_ok=True)
    return Case(
        case_id="c1",
        folder=folder,
        mr={"t1ce": _save(folder / "t1ce.nii.gz", t if t1ce is None else t1ce),
            "flair": _save(folder / "flair.nii.gz", f if flair is None else flair, affine)},
        lesion=_save(folder / "lesion.nii.gz", l if lesion is None else lesion),
    )


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return _case(tmp_path / "c1")


@pytest.fixture
def landmarks(case: Case):
    raw = preprocess_mr(case, MRConfig.tiny(), None)
    return fit_nyul([raw["image"]], [raw["brain"]])


def test_output_shape_ras_and_z_scored_in_brain(case, landmarks):
    out = preprocess_mr(case, MRConfig.tiny(), landmarks)
    assert out["image"].shape == (2, 32, 32, 32) and out["image"].dtype == np.float32
    assert out["lesion"].shape == (32, 32, 32) and out["lesion"].dtype == np.uint8
    assert out["brain"].dtype == bool
    assert np.allclose(np.diag(out["affine"])[:3], [5.0, 5.0, 5.0])  # RAS, 5 mm
    assert np.all(out["image"][:, ~out["brain"]] == 0)
    for channel in out["image"]:
        inside = channel[channel != 0]
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert out["brain"].sum() > 0.9 * (channel != 0).sum()


def test_lesion_kept_in_place(case, landmarks):
    out = preprocess_mr(case, MRConfig.tiny(), landmarks)
    lesion = out["lesion"] > 0
    assert set(np.unique(out["lesion"])) == {0, 4}
    # Same world position and volume as on disk (a flipped axis would move it by >= 20 mm).
    centre_out = _world((32, 32, 32), out["affine"])[lesion].mean(axis=0)
    _, _, l = _volumes()
    centre_in = _world(SHAPE, LPS_AFFINE)[l > 0].mean(axis=0)
    assert np.allclose(centre_out, centre_in, atol=2.5)
    assert lesion.sum() * 125 == pytest.approx((l > 0).sum() * 27, rel=0.25)
    # The enhancing lesion is bright in T1CE after standardisation.
    assert out["image"][0][lesion].mean() > out["image"][0][out["brain"] & ~lesion].mean() + 1


def test_compose_matches_preprocess_mr(case, landmarks):
    out = preprocess_mr(case, MRConfig.tiny(), landmarks)
    d = mr_transforms(MRConfig.tiny(), landmarks)({k: str(v) for k, v in {**case.mr, "lesion": case.lesion}.items()})
    assert np.allclose(d["image"].numpy(), out["image"])
    assert np.array_equal(d["lesion"][0].numpy().astype(np.uint8), out["lesion"])


def test_without_landmarks_keeps_raw_intensities(case):
    out = preprocess_mr(case, MRConfig.tiny(), None, lesion=False)
    assert out["lesion"] is None
    assert 250 < np.median(out["image"][0][out["brain"]]) < 350


def test_truncated_file(case):
    data = case.mr["t1ce"].read_bytes()
    case.mr["t1ce"].write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"t1ce is unreadable or truncated: .*t1ce\.nii\.gz"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_not_a_nifti(case):
    case.mr["flair"].write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"flair is not a readable NIfTI file"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_nan_voxels(tmp_path):
    _, flair, _ = _volumes()
    flair[10, 10, 10] = np.nan
    flair[11, 10, 10] = np.inf
    with pytest.raises(InputError, match=r"flair has 2 NaN/inf voxels"):
        preprocess_mr(_case(tmp_path, flair=flair), MRConfig.tiny(), None)


def test_missing_modality_file(case):
    case.mr["flair"].unlink()
    with pytest.raises(InputError, match=r"flair file missing: .*flair\.nii\.gz"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_modality_not_listed(case):
    with pytest.raises(InputError, match=r"no flair image listed for the case \(found \['t1ce'\]\)"):
        preprocess_mr(Case("c1", case.folder, {"t1ce": case.mr["t1ce"]}, case.lesion), MRConfig.tiny(), None)


def test_lesion_not_listed(case):
    with pytest.raises(InputError, match=r"no lesion mask listed"):
        preprocess_mr(Case("c1", case.folder, case.mr), MRConfig.tiny(), None)


def test_different_affine(tmp_path):
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 1.5
    with pytest.raises(InputError, match=r"t1ce and flair are not on the same voxel grid.*t1ce shape .*flair shape"):
        preprocess_mr(_case(tmp_path, affine=shifted), MRConfig.tiny(), None)


def test_different_shape(tmp_path):
    t1ce, _, _ = _volumes()
    with pytest.raises(InputError, match=r"t1ce shape \(48, 56, 44\).*flair shape \(48, 56, 43\)"):
        preprocess_mr(_case(tmp_path, flair=t1ce[:, :, :43]), MRConfig.tiny(), None)


def test_lesion_on_another_grid(case):
    _, _, lesion = _volumes()
    _save(case.lesion, lesion[:-1])
    with pytest.raises(InputError, match=r"t1ce and lesion are not on the same voxel grid"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_not_3d(case):
    t1ce, _, _ = _volumes()
    _save(case.mr["t1ce"], np.stack([t1ce, t1ce], axis=-1))
    with pytest.raises(InputError, match=r"t1ce must be a 3D volume, got shape \(48, 56, 44, 2\)"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_lesion_not_labels(case):
    _, _, lesion = _volumes()
    _save(case.lesion, lesion * 0.3)
    with pytest.raises(InputError, match=r"lesion must hold integer labels"):
        preprocess_mr(case, MRConfig.tiny(), None)


def test_lesion_cut_by_crop(tmp_path):
    # A 100 mm box around a 120x150x110 mm brain loses a lesion 45 mm off-centre.
    _, _, lesion = _volumes(lesion_centre=np.array([0.0, 55.0, 0.0]))
    case = _case(tmp_path, lesion=lesion)
    with pytest.raises(InputError, match=r"lesion extends outside the 100 mm crop: \d+ of \d+ voxels lost"):
        preprocess_mr(case, MRConfig(5.0, (20, 20, 20)), None)


def test_empty_brain(tmp_path):
    zeros = np.zeros(SHAPE, np.float32)
    with pytest.raises(InputError, match=r"empty brain: no voxel > 0 in t1ce or flair"):
        preprocess_mr(_case(tmp_path, t1ce=zeros, flair=zeros), MRConfig.tiny(), None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"spacing_mm": 0.0}, r"spacing_mm must be a positive number of mm, got 0\.0"),
     ({"size": (160, 160)}, r"size must be three positive integers, got \(160, 160\)"),
     ({"spacing_mm": float("nan"), "size": (1, 2, -3)}, r"spacing_mm(.|\n)*size")],
)
def test_config_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MRConfig(**kwargs)


def test_profiles_share_the_field_of_view():
    assert MRConfig.full().field_of_view_mm == MRConfig.demo().field_of_view_mm == MRConfig.tiny().field_of_view_mm
    assert MRConfig() == MRConfig.full()


def test_mni_template(tmp_path):
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=2)
    t1 = template.get_fdata().astype(np.float32) * 1000
    xyz = _world(t1.shape, template.affine)
    lesion = (np.linalg.norm(xyz - [30.0, -20.0, 20.0], axis=-1) <= 10).astype(np.uint8)
    folder = tmp_path / "mni"
    folder.mkdir()
    case = Case("mni", folder,
                {"t1ce": _save(folder / "t1ce.nii.gz", t1, template.affine),
                 "flair": _save(folder / "flair.nii.gz", np.sqrt(t1), template.affine)},
                _save(folder / "lesion.nii.gz", lesion, template.affine))
    raw = preprocess_mr(case, MRConfig.demo(), None)
    out = preprocess_mr(case, MRConfig.demo(), fit_nyul([raw["image"]], [raw["brain"]]))
    assert out["image"].shape == (2, 64, 64, 64)
    centre = _world((64, 64, 64), out["affine"])[out["lesion"] > 0].mean(axis=0)
    assert np.allclose(centre, [30.0, -20.0, 20.0], atol=2.5)


def test_constant_image_cannot_be_standardised(tmp_path, landmarks):
    t1ce, flair, _ = _volumes()
    case = _case(tmp_path / "flat", t1ce=np.where(t1ce > 0, 100.0, 0.0).astype(np.float32))
    # At the on-disk spacing the resampling is exact, so the brain stays one value.
    with pytest.raises(InputError, match=r"t1ce: the image is constant inside the mask \(100\)"):
        preprocess_mr(case, MRConfig(3.0, (56, 56, 56)), landmarks)


def test_lesion_cut_names_each_axis(tmp_path):
    _, _, lesion = _volumes(lesion_centre=np.array([0.0, 55.0, 0.0]))
    with pytest.raises(InputError, match=r"outside the 120x100x120 mm crop"):
        preprocess_mr(_case(tmp_path, lesion=lesion), MRConfig(5.0, (24, 20, 24)), None)


def test_standardize_cached_raw_output(case, landmarks):
    raw = preprocess_mr(case, MRConfig.tiny(), None)
    direct = preprocess_mr(case, MRConfig.tiny(), landmarks)
    assert np.allclose(standardize_mr(raw["image"], raw["brain"], landmarks), direct["image"], atol=1e-5)
    with pytest.raises(ValueError, match=r"needs image \(2, \*size\) and brain \(\*size\), got \(1, 32, 32, 32\)"):
        standardize_mr(raw["image"][:1], raw["brain"], landmarks)


def test_preset():
    assert MRConfig.preset("demo") == MRConfig(2.5, (64, 64, 64))
    with pytest.raises(ConfigError, match=r"MR profile 'huge' is not one of \['full', 'demo', 'tiny'\]"):
        MRConfig.preset("huge")
