"""MR preprocessing at a site: RAS, isotropic resampling, a fixed box around the brain, Nyul, z-score.

shared/notes/method.md, "Local preprocessing" step 1; the paper feeds a 2 x 160^3 volume at 1 mm
(T1CE, FLAIR) to the ViT (Gomaa et al., Sci Rep 2025).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)
from monai.utils import convert_to_dst_type

from psp_model import schema
from psp_model.errors import ConfigError, InputError
from psp_model.layouts.case import Case
from psp_model.preprocess.nyul import NyulLandmarks, NyulStandardized

__all__ = ["BrainMaskd", "GRID_TOLERANCE_MM", "MRConfig", "mr_transforms", "preprocess_mr", "standardize_mr"]

LESION = "lesion"
BRAIN = "brain"
IMAGE = "image"
GRID_TOLERANCE_MM = 0.01
"""Largest difference between two affines' entries (mm) still counted as the same voxel grid."""


@dataclass(frozen=True)
class MRConfig:
    """Geometry of the network's MR input.

    Args:
        spacing_mm: isotropic voxel size after resampling (paper: 1 mm).
        size: voxels per axis of the box around the brain (paper: 160^3 = a 160 mm field of view).
            The box should hold the whole lesion: ``preprocess_mr`` refuses a case whose lesion is cut.
    """

    spacing_mm: float = 1.0
    size: tuple[int, int, int] = (160, 160, 160)

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.spacing_mm, (int, float)) and np.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            problems.append(f"MRConfig.spacing_mm must be a positive number of mm, got {self.spacing_mm!r}")
        size = tuple(self.size)
        if len(size) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in size):
            problems.append(f"MRConfig.size must be three positive integers, got {self.size!r}")
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "size", tuple(int(n) for n in size))

    @classmethod
    def full(cls) -> MRConfig:
        """The paper's input: 1 mm, 160^3."""
        return cls(1.0, (160, 160, 160))

    @classmethod
    def demo(cls) -> MRConfig:
        """Same 160 mm field of view at 2.5 mm, 64^3: a CPU demo."""
        return cls(2.5, (64, 64, 64))

    @classmethod
    def tiny(cls) -> MRConfig:
        """Same 160 mm field of view at 5 mm, 32^3: tests and smoke runs."""
        return cls(5.0, (32, 32, 32))

    @classmethod
    def preset(cls, name: Literal["full", "demo", "tiny"]) -> MRConfig:
        """The profile called ``name``."""
        presets = {"full": cls.full, "demo": cls.demo, "tiny": cls.tiny}
        if name not in presets:
            raise ConfigError([f"MR profile {name!r} is not one of {list(presets)}"])
        return presets[name]()

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(n * self.spacing_mm for n in self.size)  # type: ignore[return-value]


class BrainMaskd(MapTransform):
    """Brain mask of skull-stripped MR: voxels where any of ``keys`` is > 0, stored as ``output_key``.

    Args:
        keys: the MR channels, each of shape ``(1, *spatial)``.
        output_key: where the boolean mask ``(1, *spatial)`` goes.
    """

    def __init__(self, keys: KeysCollection, output_key: str = BRAIN, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        images = [d[key] for key in self.key_iterator(d)]
        brain = torch.stack([torch.as_tensor(image) > 0 for image in images]).any(dim=0)
        d[self.output_key] = convert_to_dst_type(brain, images[0], dtype=torch.bool)[0]
        return d


def mr_transforms(config: MRConfig, landmarks: NyulLandmarks | None, *, lesion: bool = True) -> Compose:
    """The whole MR pipeline over ``{"t1ce": path, "flair": path, "lesion": path}``.

    Returns a dict with ``image`` ``(2, *config.size)`` (channels ``schema.MR_MODALITIES``),
    ``brain`` ``(1, *size)`` and, if ``lesion``, ``lesion`` ``(1, *size)``. With ``landmarks=None``
    the image keeps its resampled intensities (no Nyul, no z-score): what ``fit_nyul`` needs.
    """
    return Compose(_load(lesion) + _resample(config, lesion) + _crop(config, lesion) + _standardise(landmarks))


def preprocess_mr(
    case: Case, config: MRConfig, landmarks: NyulLandmarks | None, *, lesion: bool = True,
    enhancing_labels: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Read and preprocess one case's T1CE, FLAIR (and lesion), checking the inputs on the way.

    Args:
        case: the case; uses ``case.mr["t1ce"]``, ``case.mr["flair"]`` and ``case.lesion``.
        config: output geometry.
        landmarks: combined Nyul landmarks; None gives unstandardised intensities (to fit landmarks).
        lesion: False for cases without a lesion mask (self-supervised pretraining).
        enhancing_labels: labels of the enhancing lesion that must stay inside the crop (None: every
            label > 0). Oedema reaching past the box is kept as a loss of context, not an error.

    Returns:
        ``image`` float32 ``(2, *size)``, ``lesion`` uint8 ``size`` (None when ``lesion=False``),
        ``brain`` bool ``size``, ``affine`` float64 ``(4, 4)`` voxel -> RAS mm of the output grid.

    Raises:
        InputError: a missing, unreadable or truncated file; NaN/inf voxels; T1CE, FLAIR and lesion
            not on one voxel grid; a non-integer lesion map; an empty brain; a lesion cut by the box.
    """
    paths = _check_headers(case, lesion)
    d = _read(paths)
    d = _apply(_resample(config, lesion), d)
    if not bool(d[BRAIN].any()):
        raise InputError("empty brain: no voxel > 0 in t1ce or flair (expected skull-stripped MR with a 0 background)")
    before = _lesion_voxels(d[LESION], enhancing_labels) if lesion else 0
    d = _apply(_crop(config, lesion), d)
    if lesion:
        kept = _lesion_voxels(d[LESION], enhancing_labels)
        if kept < before:
            fov = config.field_of_view_mm
            fov_text = f"{fov[0]:g}" if len(set(fov)) == 1 else "x".join(f"{mm:g}" for mm in fov)
            raise InputError(f"lesion extends outside the {fov_text} mm crop: {before - kept} of {before} voxels "
                             "lost (check the lesion mask, or use a larger MRConfig.size)")
    d = _apply(_standardise(landmarks), d)
    return {
        IMAGE: np.asarray(d[IMAGE].numpy(), dtype=np.float32),
        LESION: np.asarray(d[LESION][0].numpy(), dtype=np.uint8) if lesion else None,
        BRAIN: np.asarray(d[BRAIN][0].numpy(), dtype=bool),
        "affine": np.asarray(d[IMAGE].affine.numpy(), dtype=np.float64),
    }


def standardize_mr(image: np.ndarray, brain: np.ndarray, landmarks: NyulLandmarks) -> np.ndarray:
    """Finish ``preprocess_mr(..., landmarks=None)`` output once the combined landmarks are known.

    A site reads its NIfTI once, sends landmarks fitted on the raw output, and later standardises the
    cached arrays; the result equals ``preprocess_mr(..., landmarks)["image"]``.

    Args:
        image: raw ``(2, *size)`` image (channels ``schema.MR_MODALITIES``).
        brain: brain mask, shape ``size``.
        landmarks: combined landmarks.

    Returns:
        float32 ``(2, *size)``: Nyul-standardised, then z-scored per channel inside the brain.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4 or image.shape[0] != len(schema.MR_MODALITIES) or image.shape[1:] != np.shape(brain):
        raise ValueError(f"standardize_mr needs image (2, *size) and brain (*size), got {image.shape} and "
                         f"{np.shape(brain)}")
    d: dict[str, Any] = {name: torch.from_numpy(image[i : i + 1].copy()) for i, name in enumerate(schema.MR_MODALITIES)}
    d[BRAIN] = torch.from_numpy(np.asarray(brain, dtype=bool)[None])
    return np.asarray(_apply(_standardise(landmarks), d)[IMAGE], dtype=np.float32)


def _apply(transforms: list, data: dict[str, Any]) -> dict[str, Any]:
    """Call the transforms one by one: ``Compose`` would wrap an ``InputError`` in a RuntimeError."""
    for transform in transforms:
        data = transform(data)
    return data


def _lesion_voxels(lesion: Any, labels: tuple[int, ...] | None) -> int:
    values = torch.as_tensor(lesion)
    inside = values > 0 if labels is None else torch.isin(values, torch.tensor(labels, dtype=values.dtype))
    return int(inside.sum())


def _keys(lesion: bool) -> list[str]:
    return [*schema.MR_MODALITIES, LESION] if lesion else list(schema.MR_MODALITIES)


def _load(lesion: bool) -> list:
    return [_loader(_keys(lesion))]


def _loader(keys: KeysCollection) -> LoadImaged:
    return LoadImaged(keys, reader="NibabelReader", image_only=True, dtype=np.float32)


def _resample(config: MRConfig, lesion: bool) -> list:
    keys = _keys(lesion)
    modes = ["bilinear"] * len(schema.MR_MODALITIES) + (["nearest"] if lesion else [])
    return [
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=None),
        Spacingd(keys, pixdim=config.spacing_mm, mode=modes, padding_mode="zeros", dtype=np.float32),
        BrainMaskd(schema.MR_MODALITIES, output_key=BRAIN),
    ]


def _crop(config: MRConfig, lesion: bool) -> list:
    keys = [*_keys(lesion), BRAIN]
    return [
        CropForegroundd(keys, source_key=BRAIN, start_coord_key=None, end_coord_key=None),
        ResizeWithPadOrCropd(keys, spatial_size=config.size),
    ]


def _standardise(landmarks: NyulLandmarks | None) -> list:
    modalities = list(schema.MR_MODALITIES)
    concat = [ConcatItemsd(modalities, name=IMAGE), DeleteItemsd(modalities)]
    if landmarks is None:
        return concat
    return [
        NyulStandardized(modalities, landmarks, mask_key=BRAIN),
        *concat,
        NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True),
    ]


def _check_headers(case: Case, lesion: bool) -> dict[str, Path]:
    """Fail on file-level problems from the headers alone, before any voxel is decompressed."""
    paths: dict[str, Path] = {}
    for modality in schema.MR_MODALITIES:
        if modality not in case.mr:
            raise InputError(f"no {modality} image listed for the case (found {sorted(case.mr)})")
        paths[modality] = Path(case.mr[modality])
    if lesion:
        if case.lesion is None:
            raise InputError("no lesion mask listed for the case")
        paths[LESION] = Path(case.lesion)
    headers = {}
    for key, path in paths.items():
        if not path.is_file():
            raise InputError(f"{key} file missing: {path}")
        try:
            image = nib.load(path)
        except Exception as error:  # nibabel raises several types for a bad header; all mean the same here
            raise InputError(f"{key} is not a readable NIfTI file: {path} ({error})") from error
        shape = image.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise InputError(f"{key} must be a 3D volume, got shape {shape}: {path}")
        headers[key] = (shape[:3], image.affine)
    reference = schema.MR_MODALITIES[0]
    for key in paths:
        if key != reference:
            _check_same_grid(reference, headers[reference], key, headers[key])
    return paths


def _check_same_grid(name_a: str, grid_a: tuple, name_b: str, grid_b: tuple) -> None:
    (shape_a, affine_a), (shape_b, affine_b) = grid_a, grid_b
    if shape_a != shape_b or not np.allclose(affine_a, affine_b, rtol=0, atol=GRID_TOLERANCE_MM):
        raise InputError(
            f"{name_a} and {name_b} are not on the same voxel grid (co-register them first): "
            f"{name_a} shape {shape_a}, affine {np.round(affine_a, 3).tolist()}; "
            f"{name_b} shape {shape_b}, affine {np.round(affine_b, 3).tolist()}"
        )


def _read(paths: dict[str, Path]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for key, path in paths.items():
        try:
            d.update(_loader(key)({key: str(path)}))
        except (EOFError, OSError, zlib.error, ValueError) as error:
            raise InputError(f"{key} is unreadable or truncated: {path} ({error})") from error
        bad = int((~torch.isfinite(d[key])).sum())
        if bad:
            raise InputError(f"{key} has {bad} NaN/inf voxels: {path}")
    if LESION in paths:
        values = torch.unique(d[LESION])
        if bool((values != values.round()).any()) or float(values.min()) < 0 or float(values.max()) > 255:
            raise InputError(f"lesion must hold integer labels 0..255, got values {values[:10].tolist()}: "
                             f"{paths[LESION]}")
    return d
