"""The canonical on-disk case layout (``psp-case``): file names, clinical columns and their values.

Both the synthetic cohort writer and the readers use these names, so they live only here.
"""

from __future__ import annotations

CLINICAL_FILE = "clinical.csv"
T1CE_FILE = "t1ce.nii.gz"
FLAIR_FILE = "flair.nii.gz"
LESION_FILE = "lesion.nii.gz"
CT_DIR = "ct"
RTDOSE_FILE = "rtdose.dcm"

CLINICAL_COLUMNS: tuple[str, ...] = ("case_id", "label", "age", "sex", "idh", "mgmt", "days_since_rt")
"""Columns of ``clinical.csv``, in order."""

LABELS: dict[str, int] = {"TP": 1, "PsP": 0}
"""Label spelling -> class index. Positive class = true progression. An empty label = unlabelled."""

CATEGORICAL: dict[str, tuple[str, ...]] = {
    "sex": ("F", "M"),
    "idh": ("mutant", "wildtype", "unknown"),
    "mgmt": ("methylated", "unmethylated", "unknown"),
}
"""Categorical clinical columns and their allowed values; ``unknown`` is a category of its own."""

CONTINUOUS: tuple[str, ...] = ("age", "days_since_rt")
"""Continuous clinical columns (z-scored with federated statistics)."""

MR_MODALITIES: tuple[str, ...] = ("t1ce", "flair")
"""MR channels the model sees, in channel order."""

BRATS_LABELS = {"necrosis": 1, "oedema": 2, "enhancing": 4}
"""BraTS 2021 label convention, also used by the synthetic cohort's lesion maps."""
