"""Rigid registration of a follow-up T1CE (moving) to the planning CT (fixed) with ANTs, guarded.

ANTs/ITK work in LPS; the matrices returned here are RAS (nibabel), converted only through
:mod:`psp_model.preprocess.dicom`. Raw CT numbers break ANTs silently (shared/notes/imaging.md: with
negative HU the centre-of-mass initialisation fails, ITK prints an exception and a 591 mm transform
comes back), so both images are rescaled to [0, 1] first (a soft-tissue CT window: the skull stays
bright, nothing is negative; thresholded skull-stripping was not used because it breaks on a
craniotomy, which every patient here had), the centre-of-mass start is computed here (so the
translation guard can measure from it), ITK's printed output is captured, and every result is checked
against the bounds of :class:`RegistrationConfig` before use.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
from scipy import ndimage

from psp_model.errors import ConfigError, InputError
from psp_model.preprocess.dicom import LPS_TO_RAS, ras_to_lps

__all__ = ["RegistrationConfig", "RigidResult", "register_mr_to_ct"]

_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_MR_FOREGROUND = 0.1
"""MR foreground (brain, or head if not skull-stripped): above 10 % of the robust range (noise is ~3 %)."""
_DIAGNOSTIC = re.compile(r"DIAGNOSTIC,\s*\d+,\s*([-+0-9.eEinfa]+),")


@dataclass(frozen=True)
class RegistrationConfig:
    """Schedule, intensity windows, sanity bounds and threads of :func:`register_mr_to_ct`.

    The default registers on 2 mm copies of both images (pyramid 8, 4, 2 mm), then takes one step
    at the images' own resolution when they are finer (4 % sampling). On 30 full-profile (1 mm)
    cases the 2 mm result alone left one case's lesion dose 0.67 Gy off (29 / 30 within 0.5 Gy,
    3.4 CPU s); the native step gives 30 / 30, worst 0.42 Gy, at 5.1 CPU s (bench/README.md,
    Registration). A native level inside the pyramid (shrink 8, 4, 2, 1 of 1 mm) costs 12.5 CPU s,
    and it breaks 3 mm images, whose top level then has 24 mm voxels. Images already at or coarser
    than 2 mm (the demo and tiny cohorts) get no native step; their pyramid runs 10 iterations at its
    last level and samples 30 % instead (``final_iterations``, ``final_sampling_rate``), then a level
    that samples only the MR's interior (``refine_*``), away from the brain edge that biases it.

    Args:
        voxel_mm: isotropic spacing both images are smoothed and resampled to first when they are
            finer (None: register at the given spacing).
        iterations: gradient-descent iterations per pyramid level, coarse to fine (ANTs runs one
            step even at a level given 0).
        shrink_factors: downsampling factor per level (of ``voxel_mm``).
        smoothing_sigmas: Gaussian sigma per level, in voxels.
        sampling_rate: fraction of fixed-image voxels sampled by the Mattes metric.
        native_iterations: iterations of a last level on the full-resolution images, run only when
            ``voxel_mm`` downsampled one of them (0: none).
        native_sampling_rate: ``sampling_rate`` of that level (a 1 mm CT has ~8x the 2 mm voxels, so
            4 % there samples about twice as many as 15 % at 2 mm).
        final_iterations: iterations of the last pyramid level when no native step follows (images at
            or coarser than ``voxel_mm``, or ``native_iterations=0``); the refine level follows it
            (None: ``iterations[-1]``).
        final_sampling_rate: ``sampling_rate`` of the pyramid in that case (None: ``sampling_rate``).
            With 5 iterations at 15 %, 3 of 108 CT cases of 3 mm tiny cohorts missed the tests' TRE
            bounds; with 10 at 30 %, 0 of 144 (median mean TRE 0.52 -> 0.32 mm), +0.6 CPU s per case.
        refine_iterations: iterations of a last level at the images' own resolution after a pyramid that
            had no native step (images at or coarser than ``voxel_mm``); it and the pyramid's last level
            (then run as its own call) sample only the CT points onto which the transform so far puts the
            MR's eroded foreground (a fixed mask; 0: no refine level, no mask). The MR's brain edge (a hard
            cut, 0 outside, on the MR grid) biases the Mattes optimum by 0.2-0.6 mm at 2 mm. Demo cohort
            (79 CT cases, 2 mm), config seed / seed 1: 79 / 79 and 77 / 79 within 0.5 Gy (worst 0.47 and
            0.83 Gy), median lesion max TRE 0.11-0.12 mm, 3.5-4.0 CPU s per case; with the interior as a
            moving mask of the refine level only 78 / 79 and 79 / 79 (0.58, 0.47 Gy), 0.13 mm, 6.3-6.8 CPU
            s; without a refine level 72 / 79 (0.86 Gy), 0.18 mm. Masking the coarser pyramid levels breaks
            capture (TRE up to 14 mm): they need the brain edge.
        refine_sampling_rate: ``sampling_rate`` of that level.
        refine_ct_window_hu: CT window of that level: narrower than ``ct_window_hu`` so grey matter,
            white matter and CSF (8-38 HU) span many histogram bins instead of three.
        refine_erosion_mm: how far inside the MR foreground the sampled region ends (rounded up to
            whole MR voxels). On 20 hard demo cases, worst lesion dose error 2 mm: 0.67 Gy (17 / 20
            within 0.5 Gy), 4 mm: 0.45 Gy, 6 mm: 0.28 Gy, 8 mm: 0.29 Gy, 10 mm: 0.30 Gy.
        histogram_bins: Mattes mutual-information bins.
        ct_window_hu: CT numbers mapped linearly to [0, 1] (clipped). A soft-tissue window: brain,
            CSF and scalp spread over the range, air and bone saturate, nothing is negative.
        mr_percentiles: MR intensity percentiles (of the non-zero voxels) mapped to [0, 1].
        soft_tissue_hu: CT numbers counted as soft tissue by the overlap check.
        max_translation_mm: largest accepted shift of the MR brain centre away from where the
            centre-of-mass initialisation put it.
        max_rotation_deg: largest accepted rotation angle between the MR and CT frames.
        min_overlap: smallest accepted fraction of the MR foreground that lands on CT soft tissue.
            Calibrated on the synthetic cohort: correct registrations give 0.99-1.00, an MR stored
            upside down or rotated by 90 degrees converges to a wrong optimum at 0.86-0.93, which
            the rotation bound cannot see. A left-right flip of a symmetric head is not detectable.
        threads: ITK threads. ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ants is
            first imported: this sets it if ants is not imported yet, otherwise it only warns when
            the value in effect differs (None: leave it to the environment; ITK's default is all cores).
        seed: random seed of the metric sampling, always used: unseeded, ANTs seeds it from the clock and
            a 3 mm case could pass or miss the tests' accuracy bounds from run to run. With more than one
            ITK thread, runs still differ in the last bits; ``deterministic=True`` makes them identical.
    """

    voxel_mm: float | None = 2.0
    iterations: tuple[int, ...] = (60, 30, 5)
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    sampling_rate: float = 0.15
    native_iterations: int = 1
    native_sampling_rate: float = 0.04
    final_iterations: int | None = 10
    final_sampling_rate: float | None = 0.3
    refine_iterations: int = 10
    refine_sampling_rate: float = 0.3
    refine_ct_window_hu: tuple[float, float] = (-20.0, 80.0)
    refine_erosion_mm: float = 6.0
    histogram_bins: int = 32
    ct_window_hu: tuple[float, float] = (-100.0, 200.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    soft_tissue_hu: tuple[float, float] = (-50.0, 150.0)
    max_translation_mm: float = 40.0
    max_rotation_deg: float = 30.0
    min_overlap: float = 0.96
    threads: int | None = None
    seed: int = 20240917

    def __post_init__(self) -> None:
        problems = []
        levels = {len(self.iterations), len(self.shrink_factors), len(self.smoothing_sigmas)}
        if len(levels) != 1 or 0 in levels:
            problems.append(
                "RegistrationConfig: iterations, shrink_factors and smoothing_sigmas need one value per "
                f"pyramid level; got {len(self.iterations)}, {len(self.shrink_factors)} and "
                f"{len(self.smoothing_sigmas)} values"
            )
        if any(int(i) < 0 for i in self.iterations) or not any(int(i) > 0 for i in self.iterations):
            problems.append(f"RegistrationConfig.iterations must be >= 0 with one > 0; got {self.iterations}")
        if any(int(s) < 1 for s in self.shrink_factors):
            problems.append(f"RegistrationConfig.shrink_factors must be integers >= 1; got {self.shrink_factors}")
        if any(s < 0 for s in self.smoothing_sigmas):
            problems.append(f"RegistrationConfig.smoothing_sigmas must be >= 0; got {self.smoothing_sigmas}")
        for name in ("sampling_rate", "native_sampling_rate", "final_sampling_rate", "refine_sampling_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                problems.append(f"RegistrationConfig.{name} must be in (0, 1]; got {value}")
        for name in ("native_iterations", "final_iterations", "refine_iterations"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"RegistrationConfig.{name} must be >= 0; got {value}")
        if self.histogram_bins < 8:
            problems.append(f"RegistrationConfig.histogram_bins must be >= 8; got {self.histogram_bins}")
        for name in ("ct_window_hu", "refine_ct_window_hu", "mr_percentiles", "soft_tissue_hu"):
            low, high = getattr(self, name)
            if not low < high:
                problems.append(f"RegistrationConfig.{name} must be (low, high) with low < high; got {(low, high)}")
        if not 0.0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100.0:
            problems.append(f"RegistrationConfig.mr_percentiles must lie in [0, 100]; got {self.mr_percentiles}")
        for name in ("max_translation_mm", "max_rotation_deg"):
            if not getattr(self, name) > 0:
                problems.append(f"RegistrationConfig.{name} must be > 0; got {getattr(self, name)}")
        if not self.refine_erosion_mm > 0:
            problems.append(f"RegistrationConfig.refine_erosion_mm must be > 0; got {self.refine_erosion_mm}")
        if not 0.0 <= self.min_overlap <= 1.0:
            problems.append(f"RegistrationConfig.min_overlap must be in [0, 1]; got {self.min_overlap}")
        if self.voxel_mm is not None and not self.voxel_mm > 0:
            problems.append(f"RegistrationConfig.voxel_mm must be > 0 or None; got {self.voxel_mm}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"RegistrationConfig.threads must be >= 1; got {self.threads}")
        if problems:
            raise ConfigError(problems)

    def pyramid(self, *, final: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...], float]:
        """Iterations, shrink factors, sigmas and sampling rate of the pyramid; ``final``: no step follows."""
        iterations, sampling = self.iterations, self.sampling_rate
        if final and self.final_iterations is not None:
            iterations = (*iterations[:-1], self.final_iterations)
        if final and self.final_sampling_rate is not None:
            sampling = self.final_sampling_rate
        return iterations, self.shrink_factors, self.smoothing_sigmas, sampling

    @classmethod
    def ants_rigid(cls, **overrides) -> RegistrationConfig:
        """ANTs' own "Rigid" schedule (accurate, ~4x slower than the default)."""
        return cls(voxel_mm=None, iterations=(2100, 1200, 1200, 10), shrink_factors=(6, 4, 2, 1),
                   smoothing_sigmas=(3.0, 2.0, 1.0, 0.0), sampling_rate=0.2, final_iterations=None,
                   final_sampling_rate=None, refine_iterations=0, **overrides)

    @classmethod
    def ants_quick_rigid(cls, **overrides) -> RegistrationConfig:
        """ANTs' "QuickRigid" schedule (fast, up to ~0.7 mm off at 1 mm)."""
        return cls(voxel_mm=None, iterations=(20, 20, 0, 0), shrink_factors=(6, 4, 2, 1),
                   smoothing_sigmas=(3.0, 2.0, 1.0, 0.0), sampling_rate=0.2, final_iterations=None,
                   final_sampling_rate=None, refine_iterations=0, **overrides)


@dataclass(frozen=True)
class RigidResult:
    """A rigid MR -> CT transform and the numbers it was accepted on.

    ``mr_to_ct`` (4, 4) maps RAS mm: ``x_ct = mr_to_ct @ x_mr`` for a point ``x_mr`` of the MR
    world and the same anatomy ``x_ct`` in the CT world. ``translation_mm``: how far the result moves
    the MR brain centre away from the centre-of-mass start (not the matrix's translation column,
    which depends on where each scanner put its origin). ``rotation_deg``: the rotation angle.
    ``metric``: ANTs' final Mattes value (negative mutual information). ``brain_overlap``: fraction
    of the MR foreground mapped onto CT soft tissue. ``seconds``: wall time of the call.
    """

    mr_to_ct: np.ndarray = field(repr=False)
    translation_mm: float
    rotation_deg: float
    metric: float
    brain_overlap: float
    seconds: float


def register_mr_to_ct(
    t1ce: nib.Nifti1Image,
    ct: nib.Nifti1Image,
    *,
    config: RegistrationConfig = RegistrationConfig(),
    deterministic: bool = False,
) -> RigidResult:
    """Rigidly register the follow-up T1CE to the planning CT (Mattes mutual information).

    Args:
        t1ce: the MR image (any orientation; skull-stripped or not), shape (X, Y, Z).
        ct: the planning CT in Hounsfield units, shape (X, Y, Z).
        config: schedule, windows and the bounds a result must meet.
        deterministic: bit-identical results on every run: a fixed seed for the metric's sampling
            and one ITK thread (which must be in effect when ants is imported; ConfigError if not).

    Raises:
        ConfigError: ``deterministic=True`` but ants runs with more than one ITK thread.
        InputError: an image is empty or not finite, ITK reports an exception, or the result breaks
            a bound of ``config`` (the message says which, the value and the bound).
    """
    start = time.perf_counter()
    ct_hu = _volume(ct, "CT")
    mr = _volume(t1ce, "T1CE")
    ct_unit = _window(ct_hu, config.ct_window_hu)
    mr_unit = _rescale_mr(mr, config.mr_percentiles)
    mr_foreground = mr_unit > _MR_FOREGROUND
    if not ct_unit.any():
        raise InputError(f"CT has no voxel above {config.ct_window_hu[0]} HU: not a CT in Hounsfield units?")

    init_mr_to_ct = np.eye(4)
    init_mr_to_ct[:3, 3] = _centroid(ct_unit, ct.affine) - _centroid(mr_unit, t1ce.affine)
    ants = _import_ants(config.threads, deterministic)
    with tempfile.TemporaryDirectory(prefix="psp-register-") as work, _seeded(ants, config.seed):
        init_path = str(Path(work) / "init.mat")
        ants.write_transform(_ants_affine(ants, _ct_to_mr_lps(init_mr_to_ct)), init_path)
        fixed = _downsampled(ct_unit, ct.affine, config.voxel_mm)
        moving = _downsampled(mr_unit, t1ce.affine, config.voxel_mm)
        native_step = config.native_iterations > 0 and (fixed[0] is not ct_unit or moving[0] is not mr_unit)
        iterations, shrink, sigmas, sampling = config.pyramid(final=not native_step)
        pyramid = (fixed, moving, iterations, shrink, sigmas, sampling, None)
        if native_step:
            levels = [pyramid, ((ct_unit, ct.affine), (mr_unit, t1ce.affine), (config.native_iterations,), (1,),
                                (0.0,), config.native_sampling_rate, None)]
        elif config.refine_iterations > 0:
            interior = _eroded(mr_foreground, t1ce.affine, config.refine_erosion_mm)
            if not interior.any():
                raise InputError(f"T1CE foreground is thinner than 2 x {config.refine_erosion_mm:g} mm "
                                 "(RegistrationConfig.refine_erosion_mm): not a head MR, or a cropped one?")
            interior_image = _ants_image(ants, interior.astype(np.float32), t1ce.affine)
            coarse = (fixed, moving, iterations[:-1], shrink[:-1], sigmas[:-1], sampling, None)
            levels = [
                *([coarse] if len(iterations) > 1 else []),
                (fixed, moving, iterations[-1:], shrink[-1:], sigmas[-1:], sampling, interior_image),
                ((_window(ct_hu, config.refine_ct_window_hu), ct.affine), (mr_unit, t1ce.affine),
                 (config.refine_iterations,), (1,), (0.0,), config.refine_sampling_rate, interior_image),
            ]
        else:
            levels = [pyramid]
        printed = ""
        for stage, (fixed, moving, iterations, shrink, sigmas, sampling, mr_mask) in enumerate(levels):
            fixed_image = _ants_image(ants, *fixed)
            mask = None if mr_mask is None else _on_fixed_grid(ants, mr_mask, fixed_image, init_path)
            if mask is not None and _flat_under(fixed_image, mask):
                break  # nothing to match where the MR interior lands (a CT in stored values?): the guard says why
            with _captured_output() as itk_output:
                result = ants.registration(
                    fixed=fixed_image,
                    moving=_ants_image(ants, *moving),
                    mask=mask,
                    type_of_transform="Rigid",
                    initial_transform=[init_path],
                    outprefix=str(Path(work) / f"rigid{stage}_"),
                    aff_metric="mattes",
                    aff_sampling=config.histogram_bins,
                    aff_random_sampling_rate=sampling,
                    aff_iterations=tuple(int(i) for i in iterations),
                    aff_shrink_factors=tuple(int(s) for s in shrink),
                    aff_smoothing_sigmas=tuple(float(s) for s in sigmas),
                    verbose=True,  # the only way to get the final metric value; the output is captured
                )
            printed = itk_output[0]
            if "exception" in printed.lower():
                raise InputError(f"ITK reported an exception during MR-to-CT registration: {_exception_text(printed)}")
            init_path = result["fwdtransforms"][0]
        transform = ants.read_transform(init_path)
    parameters = np.asarray(transform.parameters, dtype=float)
    centre = np.asarray(transform.fixed_parameters, dtype=float)
    if parameters.shape != (12,) or not np.isfinite(parameters).all() or not np.isfinite(centre).all():
        raise InputError(f"ANTs returned an unusable rigid transform: parameters {parameters}, centre {centre}")
    mr_to_ct = np.linalg.inv(_ras_conjugate(_itk_matrix(parameters, centre)))

    centre_mr = _centroid(mr_foreground.astype(float), t1ce.affine)
    translation_mm = float(np.linalg.norm((mr_to_ct - init_mr_to_ct)[:3] @ np.append(centre_mr, 1.0)))
    rotation_deg = float(np.degrees(np.arccos(np.clip((np.trace(mr_to_ct[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))
    overlap = _soft_tissue_fraction(mr_foreground, t1ce.affine, ct_hu, ct.affine, mr_to_ct, config.soft_tissue_hu)
    rigid = RigidResult(mr_to_ct, translation_mm, rotation_deg, _final_metric(printed), overlap,
                        time.perf_counter() - start)
    _check(rigid, config)
    return rigid


def _check(result: RigidResult, config: RegistrationConfig) -> None:
    problems = []
    if not np.isfinite(result.mr_to_ct).all():
        problems.append(f"the transform is not finite: {result.mr_to_ct.tolist()}")
    if not result.translation_mm <= config.max_translation_mm:
        problems.append(
            f"it moves the MR brain centre {result.translation_mm:.1f} mm away from the centre-of-mass "
            f"alignment (max_translation_mm = {config.max_translation_mm})"
        )
    if not result.rotation_deg <= config.max_rotation_deg:
        problems.append(f"it rotates by {result.rotation_deg:.1f} deg (max_rotation_deg = {config.max_rotation_deg})")
    if not result.brain_overlap >= config.min_overlap:
        problems.append(
            f"only {result.brain_overlap:.0%} of the MR foreground lands on CT soft tissue "
            f"{config.soft_tissue_hu} HU (min_overlap = {config.min_overlap})"
        )
    if problems:
        raise InputError(
            "MR-to-CT registration rejected: " + "; ".join(problems)
            + ". Check that the CT is in HU and both images show the same head; relax the bound in "
            "RegistrationConfig only if the images really are this far apart."
        )


def _volume(image: nib.Nifti1Image, name: str) -> np.ndarray:
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise InputError(f"{name} must be a 3-D volume; got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{name} has {int((~np.isfinite(data)).sum())} non-finite voxels; replace them first")
    return data


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """CT numbers to [0, 1] over ``window`` (clipped)."""
    low, high = window
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def _eroded(mask: np.ndarray, affine: np.ndarray, depth_mm: float) -> np.ndarray:
    """``mask`` less its outer ``depth_mm`` (whole voxels, rounded up)."""
    voxels = int(np.ceil(depth_mm / np.linalg.norm(affine[:3, :3], axis=0).min() - 1e-6))
    return ndimage.binary_erosion(mask, iterations=voxels)


def _on_fixed_grid(ants: ModuleType, mask, fixed, transform_path: str):
    """An MR-grid mask mapped onto the fixed (CT) grid through the transform so far, as the metric's mask.

    A fixed mask samples the same CT points at every iteration. As a moving mask, points enter and
    leave it as the MR moves, the metric jumps, and the optimiser stops near wherever it started
    (demo UKER-011, 4 mm erosion: 0.07 mm lesion TRE from the true transform, 0.40 mm from the
    pyramid's result; with the fixed mask 0.39 and 0.35 mm).
    """
    moved = ants.apply_transforms(fixed=fixed, moving=mask, transformlist=[transform_path],
                                  interpolator="nearestNeighbor")
    return moved.new_image_like((moved.numpy() > 0.5).astype(np.float32))


def _flat_under(image, mask) -> bool:
    """True when ``image`` has one value (or no voxel) under ``mask``: ITK's Mattes histogram then fails."""
    values = image.numpy()[mask.numpy() > 0]
    return values.size == 0 or values.min() == values.max()


def _rescale_mr(mr: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """MR to [0, 1] by robust percentiles of its non-zero voxels (MR units are arbitrary, may be < 0)."""
    nonzero = mr[mr != 0]
    if nonzero.size == 0:
        raise InputError("T1CE is all zeros")
    low, high = np.percentile(nonzero, percentiles)
    if not high > low:
        raise InputError(f"T1CE is constant ({low}) over its non-zero voxels")
    return np.clip((mr - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _centroid(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (RAS mm), as ANTs' centre-of-mass initialisation computes it."""
    return (affine @ np.append(ndimage.center_of_mass(weights), 1.0))[:3]


def _import_ants(threads: int | None, deterministic: bool) -> ModuleType:
    """Import ants, setting ITK's thread count first while that is still possible.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ants is first imported; later
    changes (``ants.config.set_ants_deterministic`` included) have no effect. Deterministic results
    need one thread: per-thread partial sums make 2-thread runs differ in the last bits.
    """
    wanted = "1" if deterministic else (None if threads is None else str(threads))
    in_effect = os.environ.get(_THREADS_VARIABLE)
    if "ants" not in sys.modules and wanted is not None:
        os.environ[_THREADS_VARIABLE] = in_effect = wanted
    import ants

    if deterministic and in_effect != "1":
        raise ConfigError([
            f"register_mr_to_ct(deterministic=True) needs one ITK thread, but ants was imported with "
            f"{_THREADS_VARIABLE}={in_effect!r}: set {_THREADS_VARIABLE}=1 before anything imports ants"
        ])
    if wanted is not None and in_effect != wanted:
        warnings.warn(
            f"RegistrationConfig.threads = {threads} has no effect: ants was imported with "
            f"{_THREADS_VARIABLE}={in_effect!r}; set it before importing ants",
            stacklevel=3,
        )
    return ants


def _ants_image(ants: ModuleType, data: np.ndarray, affine_ras: np.ndarray):
    affine_lps = ras_to_lps(affine_ras)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=affine_lps[:3, 3].tolist(),
        spacing=spacing.tolist(),
        direction=affine_lps[:3, :3] / spacing,
    )


def _downsampled(data: np.ndarray, affine: np.ndarray, voxel_mm: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic ``voxel_mm`` copy when the image is finer: block means, then trilinear resampling.

    The block mean (integer factor per axis) is the anti-aliasing filter and costs one pass over the
    input, so a 0.5 mm planning CT costs little more than a 2 mm one; Gaussian smoothing the full
    image first (what ANTs' pyramid does at every level) costs ~10x more.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if voxel_mm is None or spacing.min() >= voxel_mm:
        return data, affine
    factors = np.maximum(1, np.floor(voxel_mm / spacing + 1e-6)).astype(int)
    shape = np.array(data.shape) // factors
    trimmed = data[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = trimmed.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))
    block_affine = affine.copy()
    block_affine[:3, :3] = affine[:3, :3] * factors
    block_affine[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2.0) + affine[:3, 3]
    extent = shape * spacing * factors
    out_shape = np.maximum(1, np.round(extent / voxel_mm)).astype(int)
    directions = affine[:3, :3] / spacing
    out_affine = np.eye(4)
    out_affine[:3, :3] = directions * voxel_mm
    corner = block_affine[:3, 3] - block_affine[:3, :3] @ np.full(3, 0.5)
    out_affine[:3, 3] = corner + out_affine[:3, :3] @ np.full(3, 0.5)
    to_block = np.linalg.solve(block_affine, out_affine)
    resampled = ndimage.affine_transform(blocks.astype(np.float32), to_block[:3, :3], to_block[:3, 3],
                                         output_shape=tuple(out_shape), order=1, mode="nearest")
    return resampled, out_affine


def _itk_matrix(parameters: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 of an ITK matrix-offset transform: ``y = A (x - c) + t + c`` (ANTs: fixed -> moving, LPS)."""
    matrix = np.eye(4)
    matrix[:3, :3] = parameters[:9].reshape(3, 3)
    matrix[:3, 3] = parameters[9:] + centre - matrix[:3, :3] @ centre
    return matrix


def _ras_conjugate(matrix: np.ndarray) -> np.ndarray:
    """The same point mapping with RAS coordinates in and out (LPS_TO_RAS is its own inverse)."""
    return LPS_TO_RAS @ matrix @ LPS_TO_RAS


def _ct_to_mr_lps(mr_to_ct: np.ndarray) -> np.ndarray:
    """ANTs' forward direction (fixed CT -> moving MR) in LPS of an RAS ``mr_to_ct``."""
    return _ras_conjugate(np.linalg.inv(mr_to_ct))


def _ants_affine(ants: ModuleType, matrix: np.ndarray):
    return ants.create_ants_transform(
        transform_type="AffineTransform", precision="double", dimension=3,
        matrix=matrix[:3, :3], translation=matrix[:3, 3],
    )


def _soft_tissue_fraction(
    mr_mask: np.ndarray,
    mr_affine: np.ndarray,
    ct_hu: np.ndarray,
    ct_affine: np.ndarray,
    mr_to_ct: np.ndarray,
    soft_tissue_hu: tuple[float, float],
) -> float:
    """Fraction of MR foreground voxels mapped onto CT soft tissue (outside the CT counts as a miss).

    Every second voxel along each axis: the fraction is the same to ~0.1 % at an eighth of the cost.
    """
    index = np.argwhere(mr_mask[::2, ::2, ::2]).T
    to_ct_voxel = np.linalg.inv(ct_affine) @ mr_to_ct @ mr_affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    ct_index = np.rint(to_ct_voxel[:3, :3] @ index + to_ct_voxel[:3, 3:]).astype(np.int64)
    inside = np.all((ct_index >= 0) & (ct_index < np.array(ct_hu.shape)[:, None]), axis=0)
    values = ct_hu[tuple(ct_index[:, inside])]
    hits = (values >= soft_tissue_hu[0]) & (values <= soft_tissue_hu[1])
    return float(hits.sum() / index.shape[1])


@contextlib.contextmanager
def _seeded(ants: ModuleType, seed: int) -> Iterator[None]:
    """ANTs' fixed sampling seed for the calls inside, restored afterwards.

    antspyx ignores ``random_seed=`` and passes ``--random-seed`` from ``ants.config._random_seed``;
    its ``set_ants_deterministic`` would also reseed numpy's and Python's global generators.
    """
    saved = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = saved


def _final_metric(printed: str) -> float:
    """Mattes MI (negative, lower is better) at the last iteration, from ANTs' verbose DIAGNOSTIC lines."""
    values = _DIAGNOSTIC.findall(printed)
    return float(values[-1]) if values else float("nan")


def _exception_text(printed: str) -> str:
    lines = printed.splitlines()
    first = next(i for i, line in enumerate(lines) if "exception" in line.lower())
    return " ".join(line.strip() for line in lines[first:first + 8] if line.strip())[:1500]


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture what C++ code writes to file descriptors 1 and 2 (ITK prints its exceptions there).

    Python-level prints (antspyx's verbose command line) go to ``sys.stdout``, which need not be
    file descriptor 1 (pytest, notebooks): they are captured separately and come first.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    captured: list[str] = []
    python_output = io.StringIO()
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(python_output):
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(python_output.getvalue() + sink.read().decode(errors="replace"))
