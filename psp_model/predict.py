"""Predict one new case with a released fold ensemble: TP probability, fold spread, feature effects, map.

The case goes through the sites' own preprocessing functions (MR pipeline, CT + RTDOSE, registration,
lesion dose features, ``encode``), so a prediction sees exactly what evaluation saw. The MRI is
encoded once and every fold head reads the same tokens (with a frozen encoder; an encoder trained
per fold encodes once per fold).

Feature effects (per case, ours): for each raw clinical/dose feature, the ensemble probability with the
case's value minus the probability with the feature set to its reference -- the pooled training mean
for continuous features (z-score 0) and the reference category (the first allowed value in
``schema.CATEGORICAL``) for categories -- all other inputs kept. Positive = the case's value moves the
prediction towards TP. It is one model evaluation per feature (no sampling, reproducible), reads on
the probability scale, and matches the encoding's own reference point; it ignores interactions between
features (unlike SHAP, which the study reports over cohorts).

Map (multimodal head): the guided cross-attention weights (clinical queries over MRI tokens),
averaged over the M queries and the folds, token grid upsampled trilinearly to the volume and shown
relative to uniform attention (1 = every token weighted equally).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psp_model import schema
from psp_model.errors import CaseError, ConfigError, InputError, SignatureError
from psp_model.io import CorruptCheckpointError, load_verified_npz
from psp_model.layouts.case import Case
from psp_model.layouts.psp_case import read_psp_case
from psp_model.nets.encoder import MRIEncoder, encoder_fingerprint
from psp_model.nets.fusion import (
    ENCODER_MODES,
    VARIANTS,
    MultimodalHead,
    PSPClassifier,
    load_trainable_state,
)
from psp_model.preprocess.clinical import ClinicalRecord, FeatureManifest, encode, parse_clinical
from psp_model.preprocess.dose import DOSE_FEATURES
from psp_model.preprocess.nyul import NyulLandmarks
from psp_model.profiles import Profile, get_profile
from psp_model.sites import SiteConfig, load_site_config
from psp_model.train.device import pick_device

__all__ = ["CLINICAL_JSON", "Ensemble", "FeatureEffect", "Prediction", "load_case", "load_ensemble", "predict_case"]

CLINICAL_JSON = "clinical.json"
"""Optional per-case clinical values inside the case folder; preferred over the ``clinical.csv`` row."""

ENSEMBLE_FILE = "ensemble.json"
_ENSEMBLE_KEYS = ("profile", "head_variant", "folds", "encoder_hash", "feature_manifest", "nyul_landmarks")
_COPY_MODELS = "copy the whole models/ folder again from the server's run directory (model files must not be edited)"


@dataclass(frozen=True)
class Ensemble:
    """A released study model: the K fold classifiers and what their inputs need.

    ``models[k]`` is fold k's classifier; with ``encoder_mode == "ssl"`` they share one frozen encoder.
    """

    run_dir: Path
    profile: Profile
    head_variant: str
    encoder_mode: str
    encoder_hash: str
    manifest: FeatureManifest
    landmarks: NyulLandmarks
    models: tuple[PSPClassifier, ...]


@dataclass(frozen=True)
class FeatureEffect:
    """Ensemble P(TP) with the case's ``value`` minus P(TP) with ``reference`` (see module docstring)."""

    feature: str
    value: float | str
    reference: float | str | None
    effect: float
    note: str = ""

    @property
    def direction(self) -> str:
        return "towards TP" if self.effect > 0 else "towards PsP" if self.effect < 0 else "none"


@dataclass(frozen=True)
class Prediction:
    """One case's prediction; :meth:`to_json` is what ``psp-predict`` writes to ``prediction.json``."""

    case_id: str
    probability: float
    per_fold: tuple[float, ...]
    features: tuple[FeatureEffect, ...]
    clinical: dict[str, Any]
    dose: dict[str, float]
    clinical_source: str
    lesion_centre_voxel: tuple[int, int, int]
    checks: dict[str, float]
    model: dict[str, Any]
    map_png: Path | None = None
    map_kind: str | None = None

    @property
    def spread(self) -> dict[str, float]:
        """Sample sd (0 for one fold), min and max of the fold probabilities."""
        folds = np.asarray(self.per_fold)
        sd = float(folds.std(ddof=1)) if folds.size > 1 else 0.0
        return {"sd": sd, "min": float(folds.min()), "max": float(folds.max())}

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "positive_class": "TP",
            "probability": self.probability,
            "per_fold": list(self.per_fold),
            "spread": self.spread,
            "features": [{**asdict(f), "direction": f.direction} for f in self.features],
            "feature_effect_method": "P(TP) with the case's value minus P(TP) with the feature at its reference "
                                     "(training mean / reference category), other inputs kept",
            "map": {"png": None if self.map_png is None else str(self.map_png), "kind": self.map_kind},
            "lesion_centre_voxel": list(self.lesion_centre_voxel),
            "inputs": {"clinical": self.clinical, "dose": self.dose, "clinical_source": self.clinical_source},
            "checks": self.checks,
            "model": self.model,
        }

    def summary(self, *, top: int = 5) -> str:
        """A few readable lines: probability, fold spread, the strongest feature effects, the map."""
        s = self.spread
        lines = [
            f"case {self.case_id}: P(true progression) = {self.probability:.3f}   (P(pseudoprogression) = "
            f"{1 - self.probability:.3f})",
            f"  {len(self.per_fold)} fold models: {' '.join(f'{p:.3f}' for p in self.per_fold)}   "
            f"sd {s['sd']:.3f}, range {s['min']:.3f}-{s['max']:.3f}",
            f"  clinical values from {self.clinical_source}",
            "  top features (change in P(TP) against the feature's reference value):",
        ]
        for f in [f for f in self.features if f.effect != 0][:top] or self.features[:top]:
            lines.append(f"    {f.feature:<14} {_fmt(f.value):>12}  {f.effect:+.3f} {f.direction:<12} "
                         f"(reference {_fmt(f.reference)}){'  ' + f.note if f.note else ''}")
        if self.map_png is not None:
            lines.append(f"  {self.map_kind} map over the T1CE: {self.map_png}")
        else:
            lines.append(f"  no map: the {self.model['head_variant']} head has no attention over the MRI")
        return "\n".join(lines)


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.4g}"


def load_ensemble(run_dir: str | Path, *, trust: str | Path | None = None) -> Ensemble:
    """Read ``<run_dir>/models``: ``ensemble.json``, ``encoder.npz`` and ``fold_K.npz``, each SHA-256 checked.

    Args:
        run_dir: a finished study's run directory (or a copy of its ``models/`` parent).
        trust: the coordinator's ``model_signing.pub.pem``; when given, ``ensemble.json`` and every
            model file must carry a valid signature (``.sig``) by that key.

    Raises:
        ConfigError: missing folder or file, a file that does not match its SHA-256 or signature, or
            an ``ensemble.json`` that does not describe these files; the message names the file and the fix.
    """
    models = Path(run_dir) / "models"
    spec_path = models / ENSEMBLE_FILE
    if not spec_path.is_file():
        raise ConfigError([f"{spec_path} not found: {run_dir} holds no released models. Fix: pass --run the run "
                           "directory of a study that finished fine-tuning (it writes models/ensemble.json, "
                           "encoder.npz and fold_K.npz)."])
    spec = _read_spec(spec_path)
    folds = int(spec["folds"])
    files = [models / "encoder.npz", *(models / f"fold_{k}.npz" for k in range(folds))]
    if trust is not None:
        _verify_signatures([spec_path, *files], trust)
    arrays = [_load_model_file(path) for path in files]
    profile = get_profile(spec["profile"])
    try:
        manifest = FeatureManifest.from_json(spec["feature_manifest"])
        landmarks = NyulLandmarks.from_arrays({k: np.asarray(v) for k, v in spec["nyul_landmarks"].items()})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError([f"{spec_path}: unusable feature_manifest or nyul_landmarks ({exc}). "
                           f"Fix: {_COPY_MODELS}."]) from None
    encoder = MRIEncoder(profile.encoder)
    try:
        encoder.load_state_dict({k.removeprefix("encoder."): torch.as_tensor(v) for k, v in arrays[0].items()})
    except RuntimeError as exc:
        raise ConfigError([f"{files[0]} does not fit the {profile.name!r} encoder of {spec_path.name} ({exc}). "
                           f"Fix: {_COPY_MODELS}."]) from None
    if encoder_fingerprint(encoder) != spec["encoder_hash"]:
        raise ConfigError([f"{files[0]} is not the encoder {spec['encoder_hash'][:12]}... named in {spec_path}. "
                           f"Fix: {_COPY_MODELS}."])
    from psp_model.site_tasks import study_classifier

    classifiers = []
    for path, trainable in zip(files[1:], arrays[1:]):
        model = study_classifier(profile, spec["head_variant"], spec["encoder_mode"], len(manifest.features), encoder)
        try:
            load_trainable_state(model, {k: torch.as_tensor(v) for k, v in trainable.items()})
        except (ValueError, RuntimeError) as exc:
            raise ConfigError([f"{path} does not fit the {spec['head_variant']} head described in {spec_path} "
                               f"({exc}). Fix: {_COPY_MODELS}."]) from None
        classifiers.append(model.eval())
    return Ensemble(Path(run_dir), profile, spec["head_variant"], spec["encoder_mode"], spec["encoder_hash"],
                    manifest, landmarks, tuple(classifiers))


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path} is not readable JSON ({exc}). Fix: {_COPY_MODELS}."]) from None
    missing = [key for key in _ENSEMBLE_KEYS if key not in spec] if isinstance(spec, dict) else list(_ENSEMBLE_KEYS)
    if missing:
        raise ConfigError([f"{path} lacks key(s) {missing}. Fix: {_COPY_MODELS}."])
    spec.setdefault("encoder_mode", "ssl")  # run directories written before encoder modes existed
    problems = []
    if spec["head_variant"] not in VARIANTS:
        problems.append(f"head_variant {spec['head_variant']!r} is not one of {list(VARIANTS)}")
    if spec["encoder_mode"] not in ENCODER_MODES:
        problems.append(f"encoder_mode {spec['encoder_mode']!r} is not one of {list(ENCODER_MODES)}")
    if not (isinstance(spec["folds"], int) and spec["folds"] >= 1):
        problems.append(f"folds must be a positive integer, got {spec['folds']!r}")
    if problems:
        raise ConfigError([f"{path}: {p}. Fix: {_COPY_MODELS}." for p in problems])
    return spec


def _verify_signatures(paths: list[Path], trust: str | Path) -> None:
    from psp_model.signing import load_public_key, verify_file

    key = load_public_key(trust)
    for path in paths:
        if not path.is_file():
            raise ConfigError([f"{path} not found. Fix: {_COPY_MODELS}."])
        try:
            verify_file(path, key)
        except SignatureError as exc:
            raise ConfigError([str(exc)]) from None


def _load_model_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError([f"{path} not found (ensemble.json lists it). Fix: {_COPY_MODELS}."])
    try:
        return load_verified_npz(path, fix=f"Fix: {_COPY_MODELS}.")
    except CorruptCheckpointError as exc:
        raise ConfigError([str(exc)]) from None


def load_case(case_dir: str | Path) -> tuple[Case, str]:
    """The case in ``case_dir`` (``psp-case`` layout) with its clinical row, and where that row came from.

    ``<case_dir>/clinical.json`` (an object with the ``clinical.csv`` columns; ``label`` and
    ``case_id`` optional) wins over the case's row in the ``clinical.csv`` beside the case folder.
    Values are checked later, by ``parse_clinical``.

    Raises:
        CaseError: no such folder, no clinical values, a malformed ``clinical.json`` or ``clinical.csv``.
    """
    folder = Path(os.path.abspath(case_dir))
    case_id = folder.name
    if not folder.is_dir():
        raise CaseError(case_id, f"case folder {folder} not found. Fix: pass --case the folder holding "
                                 f"{schema.T1CE_FILE}, {schema.FLAIR_FILE}, {schema.LESION_FILE}, {schema.CT_DIR}/ "
                                 f"and {schema.RTDOSE_FILE}.")
    try:
        listing = read_psp_case(folder.parent)
    except ConfigError as exc:
        raise CaseError(case_id, "; ".join(exc.problems)) from None
    problem = next((p for p in listing.problems if p.case_id == case_id), None)
    if problem is not None:
        raise CaseError(case_id, f"{problem.reason}. Fix: correct {folder.parent / schema.CLINICAL_FILE}.")
    case = next((c for c in listing.cases if c.case_id == case_id), None)
    if case is None:
        raise CaseError(case_id, f"{folder} is not read as a case folder (a hidden folder?). Fix: rename it.")
    json_path = folder / CLINICAL_JSON
    if json_path.is_file():
        return replace(case, clinical=_clinical_json(case_id, json_path)), str(json_path)
    source = folder.parent / schema.CLINICAL_FILE
    if case.clinical is None:
        raise CaseError(case_id, f"no clinical values: neither {json_path} nor a row '{case_id}' in {source}. "
                                 f"Fix: write {CLINICAL_JSON} with the keys "
                                 f"{[c for c in schema.CLINICAL_COLUMNS if c not in ('case_id', 'label')]}.")
    return case, str(source)


def _clinical_json(case_id: str, path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CaseError(case_id, f"{path} is not readable JSON ({exc}). Fix: write one object, e.g. "
                                 '{"age": 61, "sex": "M", "idh": "wildtype", "mgmt": "unknown", '
                                 '"days_since_rt": 90}.') from None
    if not isinstance(raw, dict):
        raise CaseError(case_id, f"{path} must hold one JSON object of column -> value, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema.CLINICAL_COLUMNS))
    if unknown:
        raise CaseError(case_id, f"{path}: unknown key(s) {unknown}; allowed: {list(schema.CLINICAL_COLUMNS)}")
    if raw.get("case_id", case_id) != case_id:
        raise CaseError(case_id, f"{path} names case_id {raw['case_id']!r} but the folder is {case_id!r}. "
                                 "Fix: correct or drop its case_id.")
    row = {"label": ""}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            raise CaseError(case_id, f"{path}: {key} must be a string or a number, got {value!r}")
        row[key] = "" if value is None else str(value)
    return row


def predict_case(
    ensemble: Ensemble,
    case_dir: str | Path,
    *,
    site_config: SiteConfig | str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    deterministic: bool = True,
) -> Prediction:
    """Preprocess one ``psp-case`` folder as a site does and predict it with every fold of ``ensemble``.

    Args:
        ensemble: from :func:`load_ensemble`.
        case_dir: the case folder (see :func:`load_case` for where its clinical values come from).
        site_config: the site's YAML (or loaded config), for its enhancing lesion labels; default
            the BraTS convention ``(1, 4)``.
        out_dir: where ``<case_id>_attention.png`` goes; None writes nothing.
        device: ``auto``, ``cpu``, ``cuda``...
        deterministic: bit-identical MR-to-CT registration (one ITK thread), so a case always gets the
            same number; without it the lesion dose varies between runs (~3 % measured on the tiny grid).

    Raises:
        CaseError: the case cannot be predicted; the reason names the file or value and the fix.
        ConfigError: a site config of another layout, or ITK threads that forbid deterministic registration.
    """
    from psp_model.preprocess.mri import standardize_mr

    site = _site(site_config, case_dir)
    case, source = load_case(case_dir)
    record = parse_clinical(case.case_id, case.clinical, require_label=False)
    _check_files(case)
    mr = _preprocess_mr(case, site, ensemble.profile)
    dose, checks = _dose_features(case, site, ensemble.profile, deterministic)
    volume = torch.as_tensor(standardize_mr(mr["image"], mr["brain"], ensemble.landmarks))
    records, doses, effects = _feature_variants(record, dose, ensemble.manifest)
    probs, maps, n_encoded = _run_folds(ensemble, volume, encode(records, doses, ensemble.manifest), device)
    ensemble_probs = probs.mean(axis=0)
    features = sorted(
        (FeatureEffect(name, value, reference, 0.0 if row is None else float(ensemble_probs[0] - ensemble_probs[row]),
                       note) for name, value, reference, row, note in effects),
        key=lambda f: -abs(f.effect))
    centre = _lesion_centre(mr["lesion"], mr["brain"], site.enhancing_labels)
    prediction = Prediction(
        case_id=case.case_id,
        probability=float(ensemble_probs[0]),
        per_fold=tuple(float(p) for p in probs[:, 0]),
        features=tuple(features),
        clinical={k: v for k, v in asdict(record).items() if k not in ("case_id", "label")},
        dose=dose,
        clinical_source=source,
        lesion_centre_voxel=centre,
        checks=checks,
        model={"run_dir": str(ensemble.run_dir), "profile": ensemble.profile.name,
               "head_variant": ensemble.head_variant, "encoder_mode": ensemble.encoder_mode,
               "encoder_hash": ensemble.encoder_hash, "folds": len(ensemble.models),
               "device": str(pick_device(device)), "images_encoded": n_encoded},
    )
    if out_dir is None or maps is None:
        return prediction
    attention = torch.nn.functional.interpolate(maps.reshape(1, 1, *ensemble.profile.encoder.grid),
                                                size=tuple(volume.shape[1:]), mode="trilinear",
                                                align_corners=False)[0, 0].numpy()
    png = Path(out_dir) / f"{case.case_id}_attention.png"
    _write_map(png, mr["image"][0], mr["brain"], np.isin(mr["lesion"], site.enhancing_labels), attention, centre,
               title=f"{case.case_id}: P(TP) = {prediction.probability:.3f} "
                     f"(folds {prediction.spread['min']:.3f}-{prediction.spread['max']:.3f})")
    return replace(prediction, map_png=png, map_kind="guided cross-attention")


def _run_folds(ensemble: Ensemble, volume: torch.Tensor, clinical: np.ndarray, device: str
               ) -> tuple[np.ndarray, torch.Tensor | None, int]:
    """P(TP) ``(K, V)`` of every fold on the ``V`` clinical rows, the mean cross-attention over the tokens
    ``(N,)`` relative to uniform (None without a multimodal head), and how many times the MRI was encoded.

    Tokens go through the sites' own ``encode_cached`` and ``predict_proba``, so the numbers equal the
    evaluate phase's; a frozen encoder shared by the folds runs once.
    """
    from psp_model.train.finetune import ClassifierData, predict_proba
    from psp_model.train.token_cache import encode_cached

    target = pick_device(device)
    probs, maps, tokens_of = [], [], {}
    with tempfile.TemporaryDirectory(prefix="psp-predict-") as cache:
        for model in ensemble.models:
            tokens = None
            if model.encoder is not None:
                if id(model.encoder) not in tokens_of:
                    tokens_of[id(model.encoder)] = encode_cached(model.encoder, volume[None], ["case"],
                                                                 cache_dir=Path(cache), device=device)
                tokens = tokens_of[id(model.encoder)]
            images = None if tokens is None else tokens.expand(len(clinical), -1, -1)
            probs.append(predict_proba(model.head, ClassifierData(images, clinical, np.zeros(len(clinical))),
                                       device=device))
            if isinstance(model.head, MultimodalHead):
                with torch.inference_mode():
                    cross = model.head.to(target).attention_maps(
                        tokens.to(target), torch.as_tensor(clinical[:1]).to(target))["cross_attention"]
                maps.append(cross.float().mean(dim=1)[0].cpu())
    relative = torch.stack(maps).mean(dim=0) * maps[0].numel() if maps else None
    return np.stack(probs), relative, len(tokens_of)


def _site(site_config: SiteConfig | str | Path | None, case_dir: str | Path) -> SiteConfig:
    if site_config is None:
        return SiteConfig(name="predict", roles=("test",), layout="psp-case", root=Path(case_dir).parent)
    site = site_config if isinstance(site_config, SiteConfig) else load_site_config(site_config, require_root=False)
    if site.layout != "psp-case":
        raise ConfigError([f"{site.source or site.name}: layout {site.layout!r}: psp-predict reads cases in the "
                           "psp-case layout (MR + planning CT + RTDOSE). Fix: pass the config of a psp-case site, "
                           "or none."])
    return site


def _check_files(case: Case) -> None:
    """All inputs present, checked before the slow steps so that one message lists every missing file."""
    needed = [*case.mr.values(), case.lesion, case.rtdose]
    missing = [p.name for p in needed if not p.is_file()] + ([] if case.ct_dir.is_dir() else [f"{case.ct_dir.name}/"])
    if missing:
        raise CaseError(case.case_id, f"missing {', '.join(missing)} in {case.folder}. Fix: a psp-case folder holds "
                                      f"{schema.T1CE_FILE}, {schema.FLAIR_FILE}, {schema.LESION_FILE}, "
                                      f"{schema.CT_DIR}/ (planning CT DICOM) and {schema.RTDOSE_FILE}.")


def _preprocess_mr(case: Case, site: SiteConfig, profile: Profile) -> dict[str, Any]:
    """The sites' MR pipeline (``pipeline._compute_case``): raw grid first, Nyul applied afterwards."""
    from psp_model.preprocess.mri import preprocess_mr

    try:
        return preprocess_mr(case, profile.mr, None, lesion=True, enhancing_labels=site.enhancing_labels)
    except InputError as exc:
        raise CaseError(case.case_id, f"MR preprocessing: {exc}. Fix: correct or re-export this file "
                                      "(skull-stripped T1CE and FLAIR and the lesion map on one voxel grid, "
                                      "finite values).") from None


def _dose_features(case: Case, site: SiteConfig, profile: Profile, deterministic: bool
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Lesion dose features by the sites' own code path (planning CT, RTDOSE, registration, dose statistics)."""
    from psp_model.preprocess.pipeline import PreprocessSettings, case_dose_features
    from psp_model.preprocess.qc import CaseResult

    settings = PreprocessSettings(profile=profile.name, deterministic_registration=deterministic)
    result = CaseResult(case.case_id, "ok")
    try:
        features = case_dose_features(case, site, settings, result)
    except (InputError, OSError) as exc:
        raise CaseError(case.case_id, f"{result.stage or 'dose'}: {exc}. Fix: check the planning CT "
                                      f"({schema.CT_DIR}/) and {schema.RTDOSE_FILE} of this case.") from None
    dose = {name: features[name] for name in DOSE_FEATURES}
    checks = {k: float(v) for k, v in result.checks.items() if isinstance(v, (int, float))}
    checks["dose_coverage"] = features["coverage"]
    return dose, checks


def _feature_variants(record: ClinicalRecord, dose: dict[str, float], manifest: FeatureManifest):
    """The case plus one copy per usable raw feature set to its reference (module docstring).

    Returns records, dose dicts (row 0 = the case) and per raw feature ``(name, value, reference,
    row or None, note)``.
    """
    records, doses, effects = [record], [dose], []
    center = dict(zip(manifest.features, manifest.center))
    dropped = dict(manifest.dropped)
    scaled = [(name, getattr(record, name)) for name in schema.CONTINUOUS]
    scaled += [(f"dose_{name}", dose[name]) for name in DOSE_FEATURES]
    for name, value in scaled:
        if name not in center:
            effects.append((name, value, None, None, f"not used by the model: {dropped.get(name, 'dropped')}"))
            continue
        if name.startswith("dose_"):
            records.append(record)
            doses.append({**dose, name.removeprefix("dose_"): center[name]})
        else:
            records.append(replace(record, **{name: center[name]}))
            doses.append(dose)
        effects.append((name, value, center[name], len(records) - 1, ""))
    for name, levels in schema.CATEGORICAL.items():
        value, reference = getattr(record, name), levels[0]
        if value == reference:
            effects.append((name, value, reference, None, "the reference category"))
            continue
        note = "" if f"{name}={value}" in center else "level unseen in training: encoded like the reference"
        records.append(replace(record, **{name: reference}))
        doses.append(dose)
        effects.append((name, value, reference, len(records) - 1, note))
    return records, doses, effects


def _lesion_centre(lesion: np.ndarray, brain: np.ndarray, labels: tuple[int, ...]) -> tuple[int, int, int]:
    """Voxel at the centre of mass of the enhancing lesion (of any lesion label, else of the brain)."""
    from scipy import ndimage

    for mask in (np.isin(lesion, labels), lesion > 0, brain):
        if mask.any():
            return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))  # type: ignore[return-value]
    return tuple(n // 2 for n in lesion.shape)  # type: ignore[return-value]


def _write_map(path: Path, t1ce: np.ndarray, brain: np.ndarray, lesion: np.ndarray, attention: np.ndarray,
               centre: tuple[int, int, int], *, title: str) -> Path:
    """Axial, coronal and sagittal T1CE slices through ``centre`` with the map over the brain.

    Arrays are RAS-indexed ``(i, j, k)``; slices are shown in neurological convention (patient's
    right on the right), lesion outlined in cyan.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from psp_model.io import atomic_write

    i, j, k = centre
    views = [("axial", np.s_[:, :, k], ("R", "A")), ("coronal", np.s_[:, j, :], ("R", "S")),
             ("sagittal", np.s_[i, :, :], ("A", "S"))]
    opposite = {"R": "L", "A": "P", "S": "I"}
    inside = attention[brain]
    norm = Normalize(vmin=float(inside.min()), vmax=max(float(inside.max()), float(inside.min()) + 1e-6))
    background = t1ce[brain]
    grey = Normalize(vmin=float(np.percentile(background, 1)), vmax=float(np.percentile(background, 99.5)))
    figure = Figure(figsize=(11, 7.8), layout="constrained")
    axes = figure.subplots(2, 3)
    for column, (name, index, (right, up)) in enumerate(views):
        for row, ax in enumerate(axes[:, column]):
            ax.imshow(t1ce[index].T, origin="lower", cmap="gray", norm=grey, interpolation="bilinear")
            if row == 1:
                overlay = np.ma.masked_where(~brain[index].T, attention[index].T)
                image = ax.imshow(overlay, origin="lower", cmap="inferno", norm=norm, alpha=0.55,
                                  interpolation="bilinear")
            if lesion[index].any():
                ax.contour(lesion[index].T.astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            for x, y, text, align in ((0.02, 0.5, opposite[right], "left"), (0.98, 0.5, right, "right"),
                                      (0.5, 0.02, opposite[up], "center"), (0.5, 0.98, up, "center")):
                ax.text(x, y, text, transform=ax.transAxes, color="yellow", ha=align,
                        va="top" if y > 0.9 else "bottom" if y < 0.1 else "center", fontsize=11, fontweight="bold")
        axes[0, column].set_title(f"{name} (voxel {centre})" if column == 0 else name)
    axes[0, 0].set_ylabel("T1CE")
    axes[1, 0].set_ylabel("T1CE + attention")
    bar = figure.colorbar(image, ax=list(axes[1]), shrink=0.9)
    bar.set_label("attention relative to uniform\n(1 = every MRI token weighted equally)")
    figure.suptitle(f"{title}\nlesion outlined in cyan; guided cross-attention averaged over clinical queries "
                    "and folds")
    FigureCanvasAgg(figure)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
