"""Rigid MR -> CT registration on the MNI phantom (3 mm voxels, raw HU CT with air)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from psp_model.errors import ConfigError, InputError
from psp_model.preprocess.register import RegistrationConfig, register_mr_to_ct
from simulation import phantom

VOXEL_MM = 3.0
MEAN_TRE_MM = 1.0
"""A third of a 3 mm voxel; at 1 mm the default schedule is ~0.2 mm (bench/README.md)."""
MAX_TRE_MM = 2.0


def _tre(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> tuple[float, float]:
    homogeneous = np.c_[points, np.ones(len(points))].T
    errors = np.linalg.norm((estimate @ homogeneous - truth @ homogeneous)[:3], axis=0)
    return float(errors.mean()), float(errors.max())


@pytest.fixture(scope="module")
def template() -> phantom.Template:
    return phantom.load_template(VOXEL_MM)


@pytest.fixture(scope="module")
def case(template):
    """A T1CE moved by a known rigid transform (~4 deg, ~4 mm) and the raw-HU CT."""
    rng = np.random.default_rng(0)
    mr_to_ct, _ = phantom.sample_rigid(rng)
    lesion = phantom.sample_lesion(rng, template, 0.5)
    images, _, brain = phantom.render_mr(template, lesion, mr_to_ct, ("t1ce",))
    t1ce = phantom.scanner(rng, images["t1ce"], brain, gain=1000.0, noise=0.03, bias=0.15)
    ct = phantom.ct_hu(rng, template)
    brain_points = template.voxel_centres(np.asarray(brain) > 0.5)
    return nib.Nifti1Image(t1ce, template.affine), nib.Nifti1Image(ct, template.ct_affine), mr_to_ct, brain_points


def test_recovers_known_transform_from_raw_hu(case):
    t1ce, ct, mr_to_ct, brain_points = case
    assert (np.asarray(ct.dataobj) < 0).mean() > 0.3  # raw HU with air: the case that broke plain ANTs
    result = register_mr_to_ct(t1ce, ct)
    mean, worst = _tre(result.mr_to_ct, mr_to_ct, brain_points)
    assert mean < MEAN_TRE_MM and worst < MAX_TRE_MM, (mean, worst)
    assert result.brain_overlap > 0.95
    assert result.translation_mm < 20.0 and 2.0 < result.rotation_deg < 6.0
    assert result.metric < 0  # Mattes MI as ANTs reports it: negative


@pytest.mark.parametrize("voxel_mm", [2.0, 6.0])
def test_convention_is_mr_world_to_ct_world(template, voxel_mm):
    """Same anatomy, MR header 12 mm to the left: a point at x_mr is at x_mr + 12 mm (R) in the CT.

    The MR is stored with i -> L, j -> P (like DICOM), the CT with i -> R, j -> A. ``voxel_mm=6``
    registers on 2x2x2 block means resampled to 6 mm: a half-voxel slip there would show as ~3 mm.
    """
    data = np.asarray(template.t1, dtype=np.float32)
    ct_hu = np.where(data > 0, 20.0 + 30.0 * data, -1000.0).astype(np.float32)
    mr_affine = phantom.lps_ordered(template.affine, data.shape)
    mr_affine[0, 3] -= 12.0
    t1ce = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), mr_affine)
    config = RegistrationConfig(voxel_mm=voxel_mm, shrink_factors=(2, 1, 1), smoothing_sigmas=(1.0, 0.5, 0.0))
    result = register_mr_to_ct(t1ce, nib.Nifti1Image(ct_hu, template.affine), config=config)
    np.testing.assert_allclose(result.mr_to_ct[:3, 3], [12.0, 0.0, 0.0], atol=0.5)
    np.testing.assert_allclose(result.mr_to_ct[:3, :3], np.eye(3), atol=0.01)


@pytest.mark.parametrize(
    ("bound", "match"),
    [
        ({"max_translation_mm": 0.5}, "max_translation_mm = 0.5"),
        ({"max_rotation_deg": 0.5}, "max_rotation_deg = 0.5"),
        ({"min_overlap": 1.0}, "min_overlap = 1.0"),
    ],
)
def test_guard_rejects_results_beyond_bounds(case, bound, match):
    t1ce, ct, _, _ = case
    config = RegistrationConfig(iterations=(20, 5), shrink_factors=(2, 1), smoothing_sigmas=(1.0, 0.0), **bound)
    with pytest.raises(InputError, match=f"registration rejected: .*{match}"):
        register_mr_to_ct(t1ce, ct, config=config)


def test_ct_without_rescale_intercept_is_rejected(case):
    """Stored pixel values instead of HU (intercept -1024 not applied): the brain lands on '1064 HU'."""
    t1ce, ct, _, _ = case
    stored = nib.Nifti1Image(np.asarray(ct.dataobj).astype(np.float32) + 1024.0, ct.affine)
    config = RegistrationConfig(iterations=(5, 1), shrink_factors=(2, 1), smoothing_sigmas=(1.0, 0.0))
    with pytest.raises(InputError, match="of the MR foreground lands on CT soft tissue.*Check that the CT is in HU"):
        register_mr_to_ct(t1ce, stored, config=config)


def test_itk_exception_printed_to_stdout_is_an_error(case, monkeypatch):
    import ants

    real = ants.registration

    def noisy(*args, **kwargs):
        os.write(1, b"itk::ExceptionObject (0x1)\nDescription: Too many samples map outside moving image buffer\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(ants, "registration", noisy)
    t1ce, ct, _, _ = case
    with pytest.raises(InputError, match="ITK reported an exception.*Too many samples"):
        register_mr_to_ct(t1ce, ct, config=RegistrationConfig(iterations=(2,), shrink_factors=(1,),
                                                                 smoothing_sigmas=(0.0,)))


@pytest.mark.parametrize(
    ("which", "change", "match"),
    [
        ("t1ce", lambda d: np.where(d == 0, d, np.nan), "T1CE has .* non-finite voxels; replace them first"),
        ("t1ce", lambda d: d[..., None], "T1CE must be a 3-D volume; got shape"),
        ("t1ce", np.zeros_like, "T1CE is all zeros"),
        ("t1ce", lambda d: np.where(d > 0, 7.0, 0.0), "T1CE is constant \\(7.0\\) over its non-zero voxels"),
        ("ct", lambda d: np.full_like(d, -1000), "CT has no voxel above -100.0 HU: not a CT in Hounsfield units"),
        ("t1ce", lambda d: np.where(np.arange(d.shape[2]) == d.shape[2] // 2, d, 0.0),
         "T1CE foreground is thinner than 2 x 6 mm"),
    ],
)
def test_unusable_images_are_rejected(case, which, change, match):
    t1ce, ct, _, _ = case
    images = {"t1ce": t1ce, "ct": ct}
    image = images[which]
    images[which] = nib.Nifti1Image(change(np.asarray(image.dataobj)), image.affine)
    with pytest.raises(InputError, match=match):
        register_mr_to_ct(images["t1ce"], images["ct"])


def test_non_finite_ants_transform_is_rejected(case, monkeypatch):
    import ants

    class Broken:
        parameters = [np.nan] * 12
        fixed_parameters = [0.0, 0.0, 0.0]

    monkeypatch.setattr(ants, "read_transform", lambda path: Broken())
    t1ce, ct, _, _ = case
    config = RegistrationConfig(iterations=(2,), shrink_factors=(1,), smoothing_sigmas=(0.0,))
    with pytest.raises(InputError, match="ANTs returned an unusable rigid transform"):
        register_mr_to_ct(t1ce, ct, config=config)


_DETERMINISM = """
import sys
import nibabel as nib
from psp_model.preprocess.register import RegistrationConfig, register_mr_to_ct
t1ce, ct = nib.load(sys.argv[1]), nib.load(sys.argv[2])
config = RegistrationConfig(iterations=(30, 10), shrink_factors=(2, 1), smoothing_sigmas=(1.0, 0.0))
first, second = (register_mr_to_ct(t1ce, ct, config=config, deterministic=True).mr_to_ct for _ in range(2))
print(first.tobytes() == second.tobytes())
"""


def test_deterministic_is_bit_identical(case, tmp_path):
    """In a fresh interpreter: ITK fixes its thread count when ants is first imported.

    Without the seed, two runs differ even on one thread (ANTs seeds its sampler from the clock).
    """
    t1ce, ct, _, _ = case
    nib.save(t1ce, tmp_path / "t1ce.nii.gz")
    nib.save(ct, tmp_path / "ct.nii.gz")
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    command = [sys.executable, "-c", _DETERMINISM, str(tmp_path / "t1ce.nii.gz"), str(tmp_path / "ct.nii.gz")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], check=True)
    assert run.stdout.strip() == "True"


def test_deterministic_needs_one_itk_thread(case, monkeypatch):
    import ants  # noqa: F401  (imported: ITK's thread count is fixed now)

    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    t1ce, ct, _, _ = case
    with pytest.raises(ConfigError, match="deterministic=True\\) needs one ITK thread"):
        register_mr_to_ct(t1ce, ct, deterministic=True)


def test_threads_after_ants_import_warn(case, monkeypatch):
    import ants  # noqa: F401  (imported: ITK's thread count is fixed now)

    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    t1ce, ct, _, _ = case
    config = RegistrationConfig(iterations=(2,), shrink_factors=(1,), smoothing_sigmas=(0.0,), threads=3)
    with pytest.warns(UserWarning, match="threads = 3 has no effect: ants was imported with"):
        register_mr_to_ct(t1ce, ct, config=config)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"iterations": (10, 10), "shrink_factors": (2,)}, "one value per pyramid level; got 2, 1 and 3"),
        ({"iterations": (0, 0, 0)}, "iterations must be >= 0 with one > 0"),
        ({"shrink_factors": (4, 2, 0)}, "shrink_factors must be integers >= 1"),
        ({"smoothing_sigmas": (2.0, -1.0, 0.0)}, "smoothing_sigmas must be >= 0"),
        ({"sampling_rate": 0.0}, "sampling_rate must be in \\(0, 1\\]"),
        ({"native_sampling_rate": 1.5}, "native_sampling_rate must be in \\(0, 1\\]"),
        ({"native_iterations": -1}, "native_iterations must be >= 0"),
        ({"final_sampling_rate": 1.5}, "final_sampling_rate must be in \\(0, 1\\]"),
        ({"final_iterations": -1}, "final_iterations must be >= 0"),
        ({"refine_sampling_rate": 0.0}, "refine_sampling_rate must be in \\(0, 1\\]"),
        ({"refine_iterations": -1}, "refine_iterations must be >= 0"),
        ({"refine_ct_window_hu": (80.0, -20.0)}, "refine_ct_window_hu must be \\(low, high\\) with low < high"),
        ({"refine_erosion_mm": 0.0}, "refine_erosion_mm must be > 0"),
        ({"histogram_bins": 4}, "histogram_bins must be >= 8"),
        ({"ct_window_hu": (200.0, -100.0)}, "ct_window_hu must be \\(low, high\\) with low < high"),
        ({"mr_percentiles": (1.0, 120.0)}, "mr_percentiles must lie in \\[0, 100\\]"),
        ({"max_translation_mm": 0.0}, "max_translation_mm must be > 0"),
        ({"min_overlap": 1.5}, "min_overlap must be in \\[0, 1\\]"),
        ({"voxel_mm": -2.0}, "voxel_mm must be > 0 or None"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_config_is_validated(options, match):
    with pytest.raises(ConfigError, match=match):
        RegistrationConfig(**options)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as error:
        RegistrationConfig(sampling_rate=2.0, threads=0)
    assert len(error.value.problems) == 2


def test_pyramid_is_finer_only_when_no_native_step_follows():
    config = RegistrationConfig()
    assert config.pyramid(final=False) == ((60, 30, 5), (4, 2, 1), (2.0, 1.0, 0.0), 0.15)
    assert config.pyramid(final=True) == ((60, 30, 10), (4, 2, 1), (2.0, 1.0, 0.0), 0.3)
    rigid = RegistrationConfig.ants_rigid()
    assert rigid.pyramid(final=True) == (rigid.iterations, rigid.shrink_factors, rigid.smoothing_sigmas, 0.2)


def test_tiny_cohort_cases_match_truth(tiny_cohort, tiny_cohort_preprocessed):
    """End to end on the generator's files (NIfTI T1CE + CT DICOM series), as the site pipeline registers
    them: every case of the two sites with a planning CT within the bounds of truth.csv's mr_to_ct. 3 mm
    images are not downsampled, so no native step follows the pyramid; with 5 iterations at 15 % sampling
    and no interior-only refine level, 3 of 108 such cases (seeds 0-2) missed the bounds."""
    import pandas as pd

    from psp_model import schema
    from simulation.cohort import truth_mr_to_ct

    truth = pd.read_csv(tiny_cohort / "truth.csv").set_index("case_id")
    results = [r for site in ("burdenko", "uker") for r in tiny_cohort_preprocessed[site].results]
    assert len(results) == 36 and all("mr_to_ct" in r.checks for r in results), [(r.case_id, r.reason) for r in results]
    for result in results:
        row = truth.loc[result.case_id]
        t1ce = nib.load(tiny_cohort / row["site"] / result.case_id / schema.T1CE_FILE)
        brain = np.argwhere(np.asarray(t1ce.dataobj) > 0)
        points = brain @ t1ce.affine[:3, :3].T + t1ce.affine[:3, 3]
        mean, worst = _tre(np.asarray(result.checks["mr_to_ct"]), truth_mr_to_ct(row), points)
        assert mean < MEAN_TRE_MM and worst < MAX_TRE_MM, (result.case_id, mean, worst)
