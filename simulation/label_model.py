"""The known generative model of the labels: P(TP) from clinical values, lesion dose and the MR pattern.

Usable without any image: ``sample_cases`` draws clinical values, an image-free stand-in for the lesion
D98 and the pattern latent, then labels. The cohort generator uses the same ``LabelModel`` but with the
D98 measured on the written lesion and dose (so the label follows what a perfect pipeline can see).

The logit is linear in :func:`design_matrix` (one-hot MGMT and IDH, log days since RT, D98, pattern u),
so a logistic regression on those features can reach the Bayes AUC; sex and age carry no signal
(negative controls for the feature ranking).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from psp_model import schema

__all__ = [
    "LabelModel",
    "ClinicalPrior",
    "DESIGN_COLUMNS",
    "sample_clinical",
    "sample_d98",
    "sample_cases",
    "design_matrix",
]


@dataclass(frozen=True)
class LabelModel:
    """Logit of P(TP) (positive class = true progression).

    Args:
        intercept: logit at the reference values (MGMT unknown, IDH unknown, 90 days, D98 at
            ``dose_ref_gy``, u = 0.5).
        mgmt: logit shift per MGMT status; methylated tumours respond to RT (-> PsP).
        idh: logit shift per IDH status; a weak signal only.
        log_days_weight: weight of ``log(days_since_rt / early_days)``; early scans (< ~90 days) -> PsP.
        early_days: the days since RT at which the time term is zero.
        dose_weight: weight per ``dose_scale_gy`` of lesion D98 above ``dose_ref_gy``; high dose -> PsP.
        dose_ref_gy: D98 at which the dose term is zero.
        dose_scale_gy: Gy per unit of the dose term.
        pattern_weight: weight of ``2u - 1``, the MR pattern (u = 1 nodular/solid with wide oedema -> TP;
            u = 0 thin diffuse rim around a necrotic core -> PsP).
    """

    intercept: float = 0.55
    mgmt: dict[str, float] = field(
        default_factory=lambda: {"methylated": -1.3, "unmethylated": 0.6, "unknown": 0.0})
    idh: dict[str, float] = field(
        default_factory=lambda: {"mutant": -0.4, "wildtype": 0.1, "unknown": 0.0})
    log_days_weight: float = 1.1
    early_days: float = 90.0
    dose_weight: float = -0.6
    dose_ref_gy: float = 40.0
    dose_scale_gy: float = 10.0
    pattern_weight: float = 2.4

    def logit(self, *, mgmt, idh, days_since_rt, d98, u) -> np.ndarray:
        """Vectorised logit; categorical arguments are arrays of ``schema.CATEGORICAL`` spellings."""
        mgmt_term = np.array([self.mgmt[v] for v in np.atleast_1d(mgmt)], dtype=float)
        idh_term = np.array([self.idh[v] for v in np.atleast_1d(idh)], dtype=float)
        days = np.asarray(days_since_rt, dtype=float)
        if np.any(days <= 0):
            raise ValueError(f"days_since_rt must be > 0, got min {days.min()}")
        d98 = np.asarray(d98, dtype=float)
        if np.any(~np.isfinite(d98)):
            raise ValueError("d98 has NaN values: the lesion had no voxel inside the dose grid")
        return (
            self.intercept
            + mgmt_term
            + idh_term
            + self.log_days_weight * np.log(days / self.early_days)
            + self.dose_weight * (d98 - self.dose_ref_gy) / self.dose_scale_gy
            + self.pattern_weight * (2.0 * np.asarray(u, dtype=float) - 1.0)
        )

    def p_tp(self, **features) -> np.ndarray:
        """P(TP) = sigmoid(logit)."""
        return 1.0 / (1.0 + np.exp(-self.logit(**features)))

    def as_dict(self) -> dict:
        """Coefficients as plain values (written to ``truth_summary.json``)."""
        return {
            "intercept": self.intercept, "mgmt": dict(self.mgmt), "idh": dict(self.idh),
            "log_days_weight": self.log_days_weight, "early_days": self.early_days,
            "dose_weight": self.dose_weight, "dose_ref_gy": self.dose_ref_gy,
            "dose_scale_gy": self.dose_scale_gy, "pattern_weight": self.pattern_weight,
        }


@dataclass(frozen=True)
class ClinicalPrior:
    """Distribution of the clinical values (categories as in ``schema.CATEGORICAL``)."""

    sex: dict[str, float] = field(default_factory=lambda: {"F": 0.4, "M": 0.6})
    idh: dict[str, float] = field(default_factory=lambda: {"mutant": 0.1, "wildtype": 0.75, "unknown": 0.15})
    mgmt: dict[str, float] = field(
        default_factory=lambda: {"methylated": 0.4, "unmethylated": 0.45, "unknown": 0.15})
    age_mean: float = 58.0
    age_sd: float = 12.0
    age_range: tuple[float, float] = (18.0, 90.0)
    days_range: tuple[float, float] = (20.0, 500.0)
    """days since RT: log-uniform over this range (about half the scans are early, < 90 days)."""


def sample_clinical(rng: np.random.Generator, n: int, prior: ClinicalPrior = ClinicalPrior()) -> dict[str, np.ndarray]:
    """Clinical values as written to ``clinical.csv``: integer age and days, category strings."""
    out: dict[str, np.ndarray] = {}
    for name in ("sex", "idh", "mgmt"):
        probs = getattr(prior, name)
        if set(probs) != set(schema.CATEGORICAL[name]):
            raise ValueError(f"ClinicalPrior.{name} has categories {sorted(probs)}, "
                             f"expected {sorted(schema.CATEGORICAL[name])} (schema.CATEGORICAL)")
        values = list(probs)
        out[name] = np.array(values)[rng.choice(len(values), size=n, p=np.array(list(probs.values())))]
    out["age"] = np.round(np.clip(rng.normal(prior.age_mean, prior.age_sd, n), *prior.age_range)).astype(int)
    low, high = np.log(prior.days_range)
    out["days_since_rt"] = np.round(np.exp(rng.uniform(low, high, n))).astype(int)
    return out


def sample_d98(rng: np.random.Generator, n: int, prescription_gy: np.ndarray | float = 60.0) -> np.ndarray:
    """Image-free stand-in for the lesion D98: deep in the PTV, marginal, or far from it.

    A mixture fitted by eye to the D98 / prescription of 300 phantom lesions (``simulation.phantom``
    placement, analytic dose): 54 % >= 0.9, 16 % 0.3-0.9, 30 % < 0.3.
    """
    rx = np.broadcast_to(np.asarray(prescription_gy, dtype=float), (n,))
    kind = rng.choice(3, size=n, p=[0.54, 0.16, 0.30])
    fraction = np.choose(kind, [rng.uniform(0.9, 1.02, n), rng.uniform(0.3, 0.9, n), rng.uniform(0.05, 0.3, n)])
    return rx * fraction


def sample_cases(rng: np.random.Generator, n: int, model: LabelModel = LabelModel()) -> dict[str, np.ndarray]:
    """Clinical values, D98, pattern u, logit, p_tp and a Bernoulli label (1 = TP) for ``n`` cases."""
    table = sample_clinical(rng, n)
    table["d98"] = sample_d98(rng, n, rng.choice([54.0, 59.4, 60.0], size=n, p=[0.2, 0.2, 0.6]))
    table["u"] = rng.uniform(0.0, 1.0, n)
    table["logit"] = model.logit(mgmt=table["mgmt"], idh=table["idh"], days_since_rt=table["days_since_rt"],
                                 d98=table["d98"], u=table["u"])
    table["p_tp"] = 1.0 / (1.0 + np.exp(-table["logit"]))
    table["label"] = (rng.uniform(size=n) < table["p_tp"]).astype(int)
    return table


DESIGN_COLUMNS: tuple[str, ...] = (
    "mgmt_methylated", "mgmt_unmethylated", "idh_mutant", "idh_wildtype",
    "sex_M", "age", "log_days_since_rt", "d98", "u",
)
"""Columns of :func:`design_matrix`; the logit is linear in them (sex and age with weight 0)."""


def design_matrix(table: dict[str, np.ndarray], columns: tuple[str, ...] = DESIGN_COLUMNS) -> np.ndarray:
    """Features in which the logit is linear, shape (n, len(columns)); pick a subset for ablations."""
    derived = {
        "mgmt_methylated": table["mgmt"] == "methylated",
        "mgmt_unmethylated": table["mgmt"] == "unmethylated",
        "idh_mutant": table["idh"] == "mutant",
        "idh_wildtype": table["idh"] == "wildtype",
        "sex_M": table["sex"] == "M",
        "age": table["age"],
        "log_days_since_rt": np.log(np.asarray(table["days_since_rt"], dtype=float)),
        "d98": table["d98"],
        "u": table["u"],
    }
    unknown = [c for c in columns if c not in derived]
    if unknown:
        raise ValueError(f"unknown design column(s) {unknown}; use any of {list(derived)}")
    return np.column_stack([np.asarray(derived[c], dtype=float) for c in columns])
