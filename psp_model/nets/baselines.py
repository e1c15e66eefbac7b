"""The paper's comparison models (Gomaa et al. 2025, Table 2), rebuilt from their descriptions.

- Sun et al.: first-order + shape radiomics of the lesion on T1CE, plus clinical and dose features,
  into a random forest (``lesion_features`` + ``sun_classifier``).
- Jang et al. (Sci Rep 2018): a CNN-LSTM over 9 axial T1CE slices centred on the lesion, with the
  clinical features concatenated before the last FC layers (``jang_slices`` + ``JangCNNLSTM``);
  trains with ``psp_model.train.finetune.train_classifier`` like the main model.
- Akbari et al. (Cancer 2020): features of a pretrained network + radiomics into an SVM
  (``akbari_features`` + ``akbari_classifier``). Substitution (ours): no ImageNet CNN weights can be
  fetched at run time, so the pretrained network is the frozen SSL encoder (mean-pooled tokens).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage, stats
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from psp_model.errors import InputError

__all__ = [
    "SUN_FEATURE_NAMES",
    "lesion_features",
    "sun_classifier",
    "akbari_features",
    "akbari_classifier",
    "jang_slices",
    "JangCNNLSTM",
]

SUN_FEATURE_NAMES: tuple[str, ...] = (
    "mean", "std", "skewness", "kurtosis", "p10", "p25", "median", "p75", "p90", "energy", "entropy",
    "volume_mm3", "surface_mm2", "sphericity", "extent", "axis_major_mm", "axis_minor_mm", "axis_least_mm",
)

# Bins of the intensity histogram for entropy. The inputs are z-normalised, so pyradiomics' default
# fixed bin width (25 grey levels of raw MR) has no meaning here; a fixed count is used instead.
ENTROPY_BINS = 32


def _check_lesion(t1ce: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if t1ce.shape != mask.shape or t1ce.ndim != 3:
        raise InputError(f"T1CE {t1ce.shape} and lesion mask {mask.shape} must be 3-D volumes of the same shape")
    lesion = np.asarray(mask) > 0
    if not lesion.any():
        raise InputError("the lesion mask is empty; check the site's enhancing_labels and the segmentation")
    return lesion


def _surface_area(lesion: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Surface area from exposed voxel faces times 2/3.

    A staircase surface counts each face's area at |n_x| + |n_y| + |n_z| times the true area, which
    averages 3/2 over all normal directions, so 2/3 of the face area is unbiased for blob-like lesions
    (exact on spheres within a few percent; it under-reads axis-aligned boxes). scikit-image's
    marching cubes would be closer on boxes but is not a dependency of this project.
    """
    padded = np.pad(lesion, 1).astype(np.int8)
    sx, sy, sz = spacing
    face_area = (sy * sz, sx * sz, sx * sy)
    faces = sum(np.abs(np.diff(padded, axis=axis)).sum() * face_area[axis] for axis in range(3))
    return float(faces) * 2.0 / 3.0


def lesion_features(
    t1ce: np.ndarray, mask: np.ndarray, *, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """First-order and shape features of the lesion, in the order of ``SUN_FEATURE_NAMES``.

    Args:
        t1ce: T1 post-contrast volume ``(D, H, W)`` (z-normalised, as the model sees it).
        mask: lesion mask of the same shape (nonzero = lesion).
        spacing: voxel size in mm per axis.

    Principal axis lengths are full lengths of the ellipsoid with the same second moments
    (``2 sqrt(5 lambda)``), so a sphere of radius r gives 2r on all three axes.
    """
    lesion = _check_lesion(np.asarray(t1ce), np.asarray(mask))
    values = np.asarray(t1ce, dtype=np.float64)[lesion]
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    n = values.size
    std = values.std()
    skew = float(stats.skew(values)) if std > 0 else 0.0  # a constant lesion has no asymmetry
    kurt = float(stats.kurtosis(values, fisher=False)) if std > 0 else 0.0
    hist, _ = np.histogram(values, bins=ENTROPY_BINS)
    p = hist[hist > 0] / n
    entropy = float(-(p * np.log2(p)).sum())

    volume = n * float(np.prod(spacing_arr))
    surface = _surface_area(lesion, tuple(spacing_arr))
    sphericity = float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / surface)
    bbox = ndimage.find_objects(lesion.astype(np.int8))[0]
    extent = n / float(np.prod([s.stop - s.start for s in bbox]))
    coords = np.argwhere(lesion) * spacing_arr
    if n > 1:
        eigen = np.sort(np.clip(np.linalg.eigvalsh(np.cov(coords, rowvar=False)), 0, None))[::-1]
    else:
        eigen = np.zeros(3)
    axes = 2.0 * np.sqrt(5.0 * eigen)
    first_order = [values.mean(), std, skew, kurt, *np.percentile(values, [10, 25, 50, 75, 90]),
                   float((values**2).sum()), entropy]
    return np.asarray([*first_order, volume, surface, sphericity, extent, *axes], dtype=np.float64)


def sun_classifier(*, n_estimators: int = 500, random_state: int = 0) -> RandomForestClassifier:
    """Sun et al.'s model: a class-balanced random forest on ``[lesion_features, clinical + dose]`` rows."""
    return RandomForestClassifier(n_estimators=n_estimators, class_weight="balanced", random_state=random_state)


def akbari_features(tokens: np.ndarray | torch.Tensor, radiomics: np.ndarray) -> np.ndarray:
    """Rows ``(n, d + K)``: mean-pooled encoder tokens ``(n, N, d)`` next to radiomics ``(n, K)``."""
    tokens = np.asarray(tokens, dtype=np.float64)
    radiomics = np.asarray(radiomics, dtype=np.float64)
    if tokens.ndim != 3 or radiomics.ndim != 2 or tokens.shape[0] != radiomics.shape[0]:
        raise ValueError(f"expected tokens (n, N, d) and radiomics (n, K); got {tokens.shape} and {radiomics.shape}")
    return np.hstack([tokens.mean(axis=1), radiomics])


def akbari_classifier(*, cv: int = 5) -> Pipeline:
    """Akbari et al.'s model: standardised features -> class-balanced RBF SVM, probabilities by Platt
    scaling fitted on ``cv`` stratified folds (scikit-learn's replacement for ``SVC(probability=True)``)."""
    svm = SVC(kernel="rbf", class_weight="balanced")
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svm, method="sigmoid", cv=cv, ensemble=False))


def jang_slices(t1ce: np.ndarray, mask: np.ndarray, *, n_slices: int = 9) -> np.ndarray:
    """``n_slices`` axial slices ``(n_slices, D, H)`` centred on the lesion centroid.

    Volumes are RAS-oriented ``(D, H, W)`` = (i, j, k), so axial slices are ``[:, :, k]``. Near the top
    or bottom of the volume the window is shifted inside it rather than padded.
    """
    lesion = _check_lesion(np.asarray(t1ce), np.asarray(mask))
    depth = lesion.shape[2]
    if not 1 <= n_slices <= depth:
        raise InputError(f"n_slices must be between 1 and the volume's {depth} axial slices; got {n_slices}")
    centre = int(round(ndimage.center_of_mass(lesion)[2]))
    start = min(max(centre - n_slices // 2, 0), depth - n_slices)
    return np.moveaxis(np.asarray(t1ce, dtype=np.float32)[:, :, start : start + n_slices], 2, 0).copy()


class JangCNNLSTM(nn.Module):
    """CNN-LSTM of Jang et al.: a shared 2D CNN per slice -> LSTM over slices -> concat clinical -> FC -> logit.

    Args:
        n_clinical: clinical + dose features F.
        channels: output channels of the CNN's conv blocks (each conv 3x3 + GroupNorm + ReLU + max-pool 2).
        lstm_hidden: LSTM state size.
        fc_hidden: width of the FC layer after concatenation.
        dropout: dropout before the last layer.

    ``forward(slices (B, S, H, W), clinical (B, F)) -> (B,)`` TP logits.
    """

    def __init__(self, n_clinical: int, *, channels: tuple[int, ...] = (16, 32, 64), lstm_hidden: int = 64,
                 fc_hidden: int = 32, dropout: float = 0.3):
        super().__init__()
        if n_clinical < 0 or not channels or min(channels) < 1 or lstm_hidden < 1 or fc_hidden < 1:
            raise ValueError(
                f"JangCNNLSTM needs n_clinical >= 0 and positive sizes; got n_clinical={n_clinical}, "
                f"channels={channels}, lstm_hidden={lstm_hidden}, fc_hidden={fc_hidden}"
            )
        self.n_clinical = n_clinical
        blocks, c_in = [], 1
        for c_out in channels:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            blocks += [conv, nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.cnn = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.lstm = nn.LSTM(c_in, lstm_hidden, batch_first=True)
        self.classifier = nn.Sequential(
            nn.Linear(lstm_hidden + n_clinical, fc_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(fc_hidden, 1)
        )

    def forward(self, slices: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        if slices.ndim != 4 or clinical.ndim != 2 or clinical.shape != (slices.shape[0], self.n_clinical):
            raise ValueError(
                f"expected slices (B, S, H, W) and clinical (B, {self.n_clinical}); "
                f"got {tuple(slices.shape)} and {tuple(clinical.shape)}"
            )
        b, s, h, w = slices.shape
        features = self.cnn(slices.reshape(b * s, 1, h, w)).reshape(b, s, -1)
        _, (hidden, _) = self.lstm(features)
        return self.classifier(torch.cat([hidden[-1], clinical], dim=1)).squeeze(-1)
