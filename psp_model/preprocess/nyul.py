"""Nyul histogram standardisation, fitted per site and combined by the server.

Nyul & Udupa, "On standardizing the MR image intensity scale", MRM 1999; the variant and the
numbers (13 percentiles, 1st/99th cut-offs, 0-100 scale) are torchio's ``HistogramStandardization``,
so landmarks from ``torchio.transforms.HistogramStandardization.train`` are interchangeable with ours.
Landmarks are a per-image average, so sites share landmark vectors plus image counts and the
server's count-weighted average equals fitting on all images at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from psp_model import schema
from psp_model.errors import InputError

__all__ = [
    "PERCENTILES",
    "STANDARD_RANGE",
    "NyulLandmarks",
    "NyulStandardized",
    "combine_landmarks",
    "fit_nyul",
    "image_landmarks",
    "standardize",
]

PERCENTILES: tuple[float, ...] = (1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99)
"""Percentiles of the brain intensities taken as landmarks (torchio's: cut-offs, deciles, quartiles)."""

STANDARD_RANGE: tuple[float, float] = (0.0, 100.0)
"""Where the 1st and 99th percentiles land on the standard scale."""

_N_IMAGES_KEY = "n_images"


@dataclass(frozen=True, eq=False)
class NyulLandmarks:
    """Standard-scale landmarks per modality and the number of images they average.

    Args:
        landmarks: modality -> landmark values on the standard scale, shape ``(len(PERCENTILES),)``,
            non-decreasing.
        n_images: how many images (cases) the landmarks average; the weight when combining sites.
    """

    landmarks: Mapping[str, np.ndarray]
    n_images: int

    def __post_init__(self) -> None:
        if int(self.n_images) < 1:
            raise ValueError(f"NyulLandmarks needs n_images >= 1, got {self.n_images}")
        if not self.landmarks:
            raise ValueError("NyulLandmarks needs landmarks for at least one modality, got none")
        frozen: dict[str, np.ndarray] = {}
        for modality, values in self.landmarks.items():
            array = np.array(values, dtype=np.float64)
            if array.shape != (len(PERCENTILES),):
                raise ValueError(f"landmarks of {modality!r} must have shape ({len(PERCENTILES)},), "
                                 f"got {array.shape}")
            if not np.all(np.isfinite(array)) or np.any(np.diff(array) < 0):
                raise ValueError(f"landmarks of {modality!r} must be finite and non-decreasing, got {array}")
            array.setflags(write=False)
            frozen[modality] = array
        object.__setattr__(self, "landmarks", frozen)
        object.__setattr__(self, "n_images", int(self.n_images))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.landmarks)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float arrays for sending: one landmark vector per modality and the image count."""
        arrays = {modality: values.copy() for modality, values in self.landmarks.items()}
        arrays[_N_IMAGES_KEY] = np.array([self.n_images], dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> NyulLandmarks:
        """Inverse of :meth:`to_arrays`."""
        if _N_IMAGES_KEY not in arrays:
            raise ValueError(f"Nyul landmark arrays lack {_N_IMAGES_KEY!r}; got keys {sorted(arrays)}")
        count = np.asarray(arrays[_N_IMAGES_KEY]).ravel()
        if count.size != 1 or count[0] != np.round(count[0]):
            raise ValueError(f"{_N_IMAGES_KEY!r} must be one whole number, got {count}")
        landmarks = {k: np.asarray(v) for k, v in arrays.items() if k != _N_IMAGES_KEY}
        return cls(landmarks=landmarks, n_images=int(count[0]))


def image_landmarks(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Percentile values of one image inside ``mask``, shape ``(len(PERCENTILES),)``."""
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must have the same shape")
    values = image[mask]
    if values.size == 0:
        raise InputError("the mask selects no voxel: no intensities to standardise")
    return np.percentile(values, PERCENTILES)


def fit_nyul(
    images: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    *,
    modalities: Sequence[str] = schema.MR_MODALITIES,
) -> NyulLandmarks:
    """Fit landmarks on a site's images (local: nothing per image leaves this function).

    Args:
        images: per case, the modalities as channels, shape ``(C, *spatial)``, ``C = len(modalities)``
            (the output of ``preprocess_mr(..., landmarks=None)["image"]``).
        masks: per case, the brain mask, shape ``spatial`` (or ``(1, *spatial)``).
        modalities: the channel names, in channel order.
    """
    sums = {modality: np.zeros(len(PERCENTILES)) for modality in modalities}
    n_images = 0
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        image = np.asarray(image)
        mask = np.asarray(mask, dtype=bool).reshape(image.shape[1:])
        if image.shape[0] != len(modalities):
            raise ValueError(f"image {index} has {image.shape[0]} channels, expected {len(modalities)} "
                             f"({list(modalities)})")
        if not mask.any():
            raise InputError(f"image {index}: the brain mask is empty")
        for channel, modality in enumerate(modalities):
            sums[modality] += _to_standard_scale(image_landmarks(image[channel], mask), f"image {index} {modality}")
        n_images += 1
    if n_images == 0:
        raise ValueError("fit_nyul needs at least one image, got none")
    return NyulLandmarks({modality: total / n_images for modality, total in sums.items()}, n_images)


def combine_landmarks(parts: Sequence[NyulLandmarks]) -> NyulLandmarks:
    """Count-weighted average of per-site landmarks: equal to fitting on all sites' images."""
    if not parts:
        raise ValueError("combine_landmarks needs at least one NyulLandmarks, got none")
    modalities = parts[0].modalities
    for part in parts[1:]:
        if set(part.modalities) != set(modalities):
            raise ValueError(f"cannot combine landmarks for {list(part.modalities)} with {list(modalities)}")
    total = sum(part.n_images for part in parts)
    landmarks = {
        modality: sum(part.landmarks[modality] * part.n_images for part in parts) / total
        for modality in modalities
    }
    return NyulLandmarks(landmarks, total)


def standardize(image: np.ndarray, landmarks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Map ``image`` piecewise linearly so its own percentiles land on ``landmarks``; 0 outside ``mask``.

    Beyond the 1st and 99th percentiles the end segments are extended (as in torchio). Unlike
    torchio's ``_normalize`` every landmark is used (torchio skips the quartiles), so an image's
    percentiles land exactly on the standard landmarks, and the background stays 0 so that a later
    ``NormalizeIntensity(nonzero=True)`` still sees only the brain.
    """
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    source = image_landmarks(image, mask)
    if source[-1] - source[0] <= 0:
        raise InputError(f"the image is constant inside the mask ({source[0]:g}): cannot standardise it")
    target = np.asarray(landmarks, dtype=np.float64)
    step = np.diff(source)
    slopes = np.divide(np.diff(target), step, out=np.zeros_like(step), where=step > 0)
    intercepts = target[:-1] - slopes * source[:-1]
    values = image[mask].astype(np.float64)
    segment = np.digitize(values, source[1:-1])
    out = np.zeros(image.shape, dtype=np.float32)
    out[mask] = slopes[segment] * values + intercepts[segment]
    return out


def _to_standard_scale(percentiles: np.ndarray, what: str) -> np.ndarray:
    low, high = percentiles[0], percentiles[-1]
    if high - low <= 0:
        raise InputError(f"{what}: 1st and 99th percentiles are equal ({low:g}); the image is constant "
                         "inside the brain mask")
    s1, s2 = STANDARD_RANGE
    return s1 + (percentiles - low) * (s2 - s1) / (high - low)


class NyulStandardized(MapTransform):
    """Dict transform: Nyul-standardise each key with its modality's landmarks inside ``mask_key``.

    Args:
        keys: image keys, each a modality named in ``landmarks``; arrays of shape ``(1, *spatial)``.
        landmarks: the (combined) landmarks.
        mask_key: key of the brain mask, shape ``(1, *spatial)``; voxels outside become 0.
        allow_missing_keys: MONAI's usual meaning.
    """

    def __init__(
        self,
        keys: KeysCollection,
        landmarks: NyulLandmarks,
        mask_key: str,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        unknown = [key for key in self.keys if key not in landmarks.landmarks]
        if unknown:
            raise ValueError(f"NyulStandardized: no landmarks for key(s) {unknown}; "
                             f"landmarks are for {list(landmarks.modalities)}")
        self.landmarks = landmarks
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        mask = np.asarray(d[self.mask_key]) > 0
        for key in self.key_iterator(d):
            image = d[key]
            array = np.asarray(image)
            if array.shape != mask.shape:
                raise ValueError(f"NyulStandardized: {key!r} has shape {array.shape}, mask {self.mask_key!r} "
                                 f"has {mask.shape}")
            try:
                out = standardize(array, self.landmarks.landmarks[key], mask)
            except InputError as error:
                raise InputError(f"{key}: {error}") from error
            d[key] = convert_to_dst_type(out, image, dtype=out.dtype)[0]
        return d
