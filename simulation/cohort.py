"""Generate a synthetic multi-site cohort: two labelled ``psp-case`` sites and three public-style SSL sets.

Output under ``out``::

    burdenko/  uker/                 psp-case layout (psp_model.schema): per case t1ce, flair, lesion
                                     (NIfTI), ct/ (DICOM series), rtdose.dcm; clinical.csv per site
    brats2021/ upenn_gbm/ ucsf_pdgm/ public layouts (psp_model.layouts.public), unlabelled
    site_configs/<site>.yaml         valid for psp_model.sites.load_site_config (root relative)
    truth.csv                        the generating truth of every labelled case (never read by the pipeline)
    truth_summary.json               per-site counts and Bayes AUC; also marks the folder as a cohort

``truth.csv`` columns: ``site, case_id, label`` (1 = TP), ``p_tp, logit, u`` (pattern latent), the
clinical values, ``prescription_gy``, the PTV and lesion centres in the CT world (``ptv_x_mm`` ..,
``lesion_x_mm`` ..), the lesion's radius, rim thickness and oedema extent (mm), the exact lesion dose
features ``dose_mean, dose_min, dose_median, dose_d98, dose_coverage`` (what a perfect pipeline
computes: written lesion voxels with labels 1/4, mapped through ``mr_to_ct``, written dose sampled
trilinearly; see :func:`exact_dose_features`),
the rigid offset ``rot_x_deg, rot_y_deg, rot_z_deg`` (rotation vector) and ``tx_mm, ty_mm, tz_mm``, and
the 16 entries ``mr_to_ct_00 .. mr_to_ct_33`` (row-major) of the 4x4 RAS matrix with
``x_ct = mr_to_ct @ x_mr`` (x_mr: RAS world point of the written MR images; x_ct: the same point in
the CT/dose world).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from nibabel.affines import apply_affine
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy.ndimage import map_coordinates
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from psp_model import schema
from psp_model.layouts.public import UCSF_METADATA_FILE
from psp_model.preprocess.dose import lesion_dose_statistics, rtdose_to_nifti
from simulation import phantom
from simulation.dicom_writer import make_uid, write_ct_series, write_rtdose
from simulation.label_model import LabelModel, sample_clinical
from simulation.profiles import PROFILES, Profile, SiteSpec

__all__ = ["generate_cohort", "set_model_signing_key", "exact_dose_features", "case_ids", "truth_mr_to_ct",
           "TRUTH_FILE", "MR_TO_CT_COLUMNS", "SUMMARY_FILE", "SITE_CONFIG_DIR"]

TRUTH_FILE = "truth.csv"
MR_TO_CT_COLUMNS: tuple[str, ...] = tuple(f"mr_to_ct_{r}{c}" for r in range(4) for c in range(4))
SUMMARY_FILE = "truth_summary.json"
SITE_CONFIG_DIR = "site_configs"
GENERATOR = "psp-sim cohort"
ENHANCING_LABELS = (schema.BRATS_LABELS["necrosis"], schema.BRATS_LABELS["enhancing"])
_STREAMS = {"phantom": 0, "scanner": 1, "label": 2, "ct": 3}
_CLINICAL_TRUTH = ("age", "sex", "idh", "mgmt", "days_since_rt")
_DOSE_TRUTH = ("mean", "min", "median", "d98", "coverage")


def _rng(seed: int, site_index: int, case_index: int, stream: str) -> np.random.Generator:
    """Independent stream per (site, case, purpose): the seed tree, no global state."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(site_index, case_index, _STREAMS[stream])))


def case_ids(site: SiteSpec) -> list[str]:
    """Identifiers in the site's own naming (folder names for the public layouts)."""
    n = site.n_cases
    if site.layout == "brats2021":
        return [f"BraTS2021_{2 * i:05d}" for i in range(n)]
    if site.layout == "upenn-gbm":
        return [f"UPENN-GBM-{i + 1:05d}_11" for i in range(n)]
    if site.layout == "ucsf-pdgm":
        return [f"UCSF-PDGM-{i + 4:04d}" for i in range(n)]
    prefix = {"burdenko": "Burdenko-GBM"}.get(site.name, site.name.upper())
    return [f"{prefix}-{i + 1:03d}" for i in range(n)]


@dataclass(frozen=True)
class _CaseJob:
    out: Path
    seed: int
    voxel_mm: float
    dose_voxel_mm: float
    site: SiteSpec
    index: int
    case_id: str
    phantom_key: tuple[int, int]
    """(site index, case index) whose phantom this case shows (UCSF cases may repeat a BraTS one)."""
    label_model: LabelModel
    same_phantom_as: str = ""


def generate_cohort(
    out: Path,
    *,
    seed: int = 0,
    profile: Profile | str = "tiny",
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    label_model: LabelModel = LabelModel(),
) -> dict:
    """Write a cohort under ``out`` and return the summary also written to ``truth_summary.json``.

    Args:
        out: output folder; created if missing. A non-empty folder must hold a previous cohort
            (its outputs are replaced) unless ``force``.
        seed: the same seed gives byte-identical files; another seed another cohort.
        profile: a ``Profile`` or a name in ``PROFILES``.
        workers: processes generating cases in parallel (1 = in this process).
        force: write into a non-empty folder that is not a cohort (only the generator's own outputs
            are removed first; other files stay).
        progress: show a tqdm bar over cases.
        label_model: the generative model of the labels.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder that is not a cohort without ``force``.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; use one of {list(PROFILES)}")
        profile = PROFILES[profile]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    jobs = _jobs(out, seed, profile, label_model)
    _prepare_out(out, force=force)
    phantom.load_template(profile.voxel_mm)  # build the cache once, before any worker needs it

    if workers == 1:
        rows = [_make_case(job) for job in tqdm(jobs, desc="cases", unit="case", disable=not progress)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(tqdm(pool.map(_make_case, jobs), total=len(jobs), desc="cases", unit="case",
                             disable=not progress))

    for site in profile.sites:
        site_rows = [row for job, row in zip(jobs, rows) if job.site.name == site.name]
        if site.layout == "psp-case":
            assign_labels(site_rows, site.tp_fraction)
            _write_clinical(out / site.name, site_rows)
        if site.layout == "ucsf-pdgm":
            _write_ucsf_metadata(out / site.name, site_rows)
        _write_site_config(out, site)
    truth = [row for job, row in zip(jobs, rows) if job.site.layout == "psp-case"]
    _write_truth(out / TRUTH_FILE, truth)
    summary = _summary(profile, seed, truth, jobs, rows, label_model)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _prepare_out(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the cohort")
    if out.is_dir() and any(out.iterdir()):
        if not (_is_cohort(out) or force):
            raise FileExistsError(
                f"--out {out} is not empty and holds no previous cohort ({SUMMARY_FILE} missing); "
                "choose an empty or new folder, or pass --force to write into it anyway"
            )
        names = {site.name for profile in PROFILES.values() for site in profile.sites}
        for name in sorted(names) + [SITE_CONFIG_DIR]:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (TRUTH_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _is_cohort(out: Path) -> bool:
    try:
        return json.loads((out / SUMMARY_FILE).read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _jobs(out: Path, seed: int, profile: Profile, label_model: LabelModel) -> list[_CaseJob]:
    jobs = []
    by_layout = {site.layout: site for site in profile.sites}
    for site in profile.sites:
        for i, case_id in enumerate(case_ids(site)):
            key, same_as = (site.index, i), ""
            if i < site.ucsf_brats_duplicates:
                brats = by_layout.get("brats2021")
                if brats is None or i >= brats.n_cases:
                    raise ValueError(f"site {site.name}: {site.ucsf_brats_duplicates} BraTS duplicates need a "
                                     f"brats2021 site with at least that many cases")
                key, same_as = (brats.index, i), case_ids(brats)[i]
            jobs.append(_CaseJob(out, seed, profile.voxel_mm, profile.dose_voxel_mm, site, i, case_id, key,
                                 label_model, same_as))
    return jobs


def _make_case(job: _CaseJob) -> dict:
    if job.site.layout == "psp-case":
        return _psp_case(job)
    return _public_case(job)


def _psp_case(job: _CaseJob) -> dict:
    template = phantom.load_template(job.voxel_mm)
    site, folder = job.site, job.out / job.site.name / job.case_id
    rng = _rng(job.seed, *job.phantom_key, "phantom")
    clinical = {name: values[0].item() for name, values in sample_clinical(rng, 1).items()}
    u = float(rng.uniform())
    plan = phantom.sample_plan(rng, template)
    lesion = phantom.sample_lesion(rng, template, u, plan)
    mr_to_ct, params = phantom.sample_rigid(rng)
    partial = bool(rng.uniform() < site.partial_dose_fraction)

    images, labels, brain = phantom.render_mr(template, lesion, mr_to_ct, schema.MR_MODALITIES)
    scanner_rng = _rng(job.seed, site.index, job.index, "scanner")
    folder.mkdir(parents=True, exist_ok=True)
    for modality, file_name in (("t1ce", schema.T1CE_FILE), ("flair", schema.FLAIR_FILE)):
        image = phantom.scanner(scanner_rng, images[modality], brain, gain=site.gain, noise=site.noise, bias=site.bias)
        _save_nifti(image, template.affine, folder / file_name, site.orientation, site.mr_dtype)
    _save_nifti(labels, template.affine, folder / schema.LESION_FILE, site.orientation, "uint8")

    uid = f"psp-sim/{job.seed}/{site.name}/{job.case_id}"
    frame_of_reference = make_uid(f"{uid}/frame-of-reference")
    study = make_uid(f"{uid}/planning-study")
    write_ct_series(phantom.ct_hu(_rng(job.seed, site.index, job.index, "ct"), template), template.ct_affine,
                    folder / schema.CT_DIR, frame_of_reference_uid=frame_of_reference, study_uid=study,
                    patient_id=job.case_id, uid_seed=uid)
    dose_affine, dose_shape = phantom.dose_grid(rng, plan, lesion, spacing_mm=job.dose_voxel_mm, partial=partial)
    write_rtdose(phantom.plan_dose(plan, template, dose_affine, dose_shape), dose_affine, folder / schema.RTDOSE_FILE,
                 frame_of_reference_uid=frame_of_reference, study_uid=study, patient_id=job.case_id,
                 uid_seed=uid, bits=site.dose_bits)

    dose = exact_dose_features(folder / schema.LESION_FILE, folder / schema.RTDOSE_FILE, mr_to_ct)
    logit = float(job.label_model.logit(mgmt=[clinical["mgmt"]], idh=[clinical["idh"]],
                                        days_since_rt=clinical["days_since_rt"], d98=dose["d98"], u=u)[0])
    label_draw = float(_rng(job.seed, site.index, job.index, "label").uniform())
    row = {"site": site.name, "case_id": job.case_id, "label_draw": label_draw, "logit": logit, "u": u,
           **clinical, "prescription_gy": plan.prescription_gy}
    row.update(zip(("ptv_x_mm", "ptv_y_mm", "ptv_z_mm"), plan.centre.tolist()))
    row.update(zip(("lesion_x_mm", "lesion_y_mm", "lesion_z_mm"), lesion.centre.tolist()))
    row.update(lesion_radius_mm=lesion.radius_mm, rim_mm=lesion.rim_mm, oedema_mm=lesion.oedema_mm)
    row.update({f"dose_{name}": dose[name] for name in _DOSE_TRUTH})
    row.update(dict(zip(("rot_x_deg", "rot_y_deg", "rot_z_deg", "tx_mm", "ty_mm", "tz_mm"), params.tolist())))
    row.update(zip(MR_TO_CT_COLUMNS, mr_to_ct.ravel().astype(float).tolist()))
    return row


def truth_mr_to_ct(row: dict) -> np.ndarray:
    """The true follow-up MR world -> planning CT world transform (4, 4) of one ``truth.csv`` row."""
    return np.array([float(row[column]) for column in MR_TO_CT_COLUMNS]).reshape(4, 4)


def assign_labels(rows: list[dict], tp_fraction: float | None) -> None:
    """Give a site's cases their TP probability and label, at the site's base rate.

    P(TP) = sigmoid(logit + b): the label model's logit plus a site intercept ``b`` (sites differ in
    case mix) chosen so that the expected TP share is ``tp_fraction``. Each case's label is
    ``draw < P(TP)`` with its own uniform draw; with a target, the draws are read through a
    common monotone shift so that the realised TP count is the target rounded (a draw conditioned on
    the count, which keeps small sites near the published class balance). ``p_tp`` is written as
    the probability without that conditioning, the Bayes-optimal score.
    """
    logits = np.array([row["logit"] for row in rows], dtype=float)
    draws = np.array([row.pop("label_draw") for row in rows], dtype=float)
    offset = 0.0 if tp_fraction is None else _intercept_for(logits, tp_fraction)
    p_tp = 1.0 / (1.0 + np.exp(-(logits + offset)))
    labels = draws < p_tp
    if tp_fraction is not None:
        target = int(round(tp_fraction * len(rows)))
        margin = np.log(p_tp / (1 - p_tp)) - np.log(draws / (1 - draws))
        labels = np.zeros(len(rows), dtype=bool)
        labels[np.argsort(-margin)[:target]] = True
    for row, p, label in zip(rows, p_tp, labels):
        row.update(label=int(label), p_tp=float(p), logit=float(np.log(p / (1 - p))))


def _intercept_for(logits: np.ndarray, fraction: float) -> float:
    low, high = -20.0, 20.0
    for _ in range(100):
        middle = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + middle)))) < fraction:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def exact_dose_features(
    lesion_path: Path, dose_path: Path, mr_to_ct: np.ndarray, *, labels: tuple[int, ...] = ENHANCING_LABELS,
) -> dict[str, float]:
    """Lesion dose features a perfect pipeline computes, from the files as written.

    Lesion voxel centres (labels in ``labels``) -> RAS via the lesion's affine -> ``mr_to_ct`` -> dose
    voxel coordinates; covered = inside the outermost dose voxel centres; the dose is sampled
    trilinearly (``map_coordinates(order=1)``) at covered voxels only. Written independently of
    ``psp_model.preprocess.dose.dose_features`` so it can check it.
    """
    lesion_img = nib.load(lesion_path)
    voxels = np.argwhere(np.isin(np.asanyarray(lesion_img.dataobj), labels))
    dose_img = rtdose_to_nifti(dose_path)
    dose = np.asarray(dose_img.dataobj, dtype=np.float64)
    points = apply_affine(np.linalg.inv(dose_img.affine) @ mr_to_ct @ lesion_img.affine, voxels)
    covered = np.all((points >= -1e-6) & (points <= np.array(dose.shape) - 1 + 1e-6), axis=1)
    stats = lesion_dose_statistics(map_coordinates(dose, points[covered].T, order=1, mode="nearest"))
    stats["coverage"] = float(covered.mean()) if len(voxels) else float("nan")
    return stats


def _public_case(job: _CaseJob) -> dict:
    template = phantom.load_template(job.voxel_mm)
    site = job.site
    rng = _rng(job.seed, *job.phantom_key, "phantom")
    u = float(rng.uniform())
    lesion = phantom.sample_lesion(rng, template, u)
    head_pose, _ = phantom.sample_rigid(rng, max_angle_deg=5.0, max_shift_mm=5.0)
    modalities = ("t1", "t1ce", "t2", "flair")
    images, labels, brain = phantom.render_mr(template, lesion, head_pose, modalities)
    scanner_rng = _rng(job.seed, site.index, job.index, "scanner")
    cid = job.case_id
    root = job.out / site.name
    seg: Path | None
    if site.layout == "brats2021":
        folder, suffixes = root / cid, dict(zip(modalities, modalities))
        seg = folder / f"{cid}_seg.nii.gz"
    elif site.layout == "upenn-gbm":
        folder, suffixes = root / "images_structural" / cid, dict(zip(modalities, ("T1", "T1GD", "T2", "FLAIR")))
        # Automated segmentations exist for some studies only.
        seg = root / "automated_segm" / f"{cid}_automated_approx_segm.nii.gz" if job.index % 2 == 0 else None
    else:
        folder, suffixes = root / f"{cid}_nifti", dict(zip(modalities, ("T1", "T1c", "T2", "FLAIR")))
        seg = folder / f"{cid}_tumor_segmentation.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    for modality in modalities:
        image = phantom.scanner(scanner_rng, images[modality], brain, gain=site.gain, noise=site.noise, bias=site.bias)
        _save_nifti(image, template.affine, folder / f"{cid}_{suffixes[modality]}.nii.gz", site.orientation,
                    site.mr_dtype)
    if seg is not None:
        seg.parent.mkdir(parents=True, exist_ok=True)
        _save_nifti(labels, template.affine, seg, site.orientation, "uint8")
    return {"site": site.name, "case_id": cid, "u": u, "same_phantom_as": job.same_phantom_as}


def _save_nifti(data: np.ndarray, affine_ras: np.ndarray, path: Path, orientation: tuple[str, str, str],
                dtype: str) -> None:
    """Store in the site's on-disk axis order; the affine follows, so world positions do not change."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.round(data).astype(dtype)
    image = nib.Nifti1Image(data.astype(dtype), affine_ras)
    image = image.as_reoriented(ornt_transform(io_orientation(affine_ras), axcodes2ornt(orientation)))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _write_clinical(folder: Path, rows: list[dict]) -> None:
    names = {v: k for k, v in schema.LABELS.items()}
    with (folder / schema.CLINICAL_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=schema.CLINICAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: row[c] for c in schema.CLINICAL_COLUMNS if c != "label"},
                             "label": names[row["label"]]})


def _write_ucsf_metadata(folder: Path, rows: list[dict]) -> None:
    with (folder / UCSF_METADATA_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ID", "Sex", "Age at MRI", "WHO CNS Grade", "BraTS21 ID"])
        for i, row in enumerate(rows):
            short = f"UCSF-PDGM-{int(row['case_id'].rsplit('-', 1)[1]):03d}"
            writer.writerow([short, "MF"[i % 2], 50 + i % 30, 4, row["same_phantom_as"]])


def _write_site_config(out: Path, site: SiteSpec) -> None:
    config = {"name": site.name, "roles": list(site.roles), "layout": site.layout, "root": f"../{site.name}",
              "enhancing_labels": list(ENHANCING_LABELS)}
    (out / SITE_CONFIG_DIR).mkdir(exist_ok=True)
    (out / SITE_CONFIG_DIR / f"{site.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def set_model_signing_key(cohort_dir: Path, public_key: Path) -> list[Path]:
    """Make every site config of the cohort refuse models not signed by ``public_key``; return the configs.

    Kept apart from :func:`generate_cohort` so a reused cohort (or one from ``psp-sim cohort``) gets the
    key of the run that uses it; the path is written relative to each config, like ``root``.
    """
    configs = sorted((Path(cohort_dir) / SITE_CONFIG_DIR).glob("*.yaml"))
    for path in configs:
        config = yaml.safe_load(path.read_text())
        config["model_signing_key"] = os.path.relpath(Path(public_key).resolve(), path.parent.resolve())
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return configs


def _write_truth(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["site", "case_id"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(float(v)) if isinstance(v, (float, np.floating)) else v for k, v in row.items()})


def _bayes_auc(rows: list[dict]) -> float | None:
    labels = [row["label"] for row in rows]
    if len(set(labels)) < 2:
        return None  # undefined with one class; the summary says so through n and n_tp
    return float(roc_auc_score(labels, [row["p_tp"] for row in rows]))


def _summary(profile: Profile, seed: int, truth: list[dict], jobs: list[_CaseJob], rows: list[dict],
             label_model: LabelModel) -> dict:
    sites: dict[str, dict] = {}
    for site in profile.sites:
        site_rows = [row for job, row in zip(jobs, rows) if job.site.name == site.name]
        entry: dict = {"layout": site.layout, "roles": list(site.roles), "n": len(site_rows)}
        if site.layout == "psp-case":
            entry.update(n_tp=sum(row["label"] for row in site_rows), bayes_auc=_bayes_auc(site_rows),
                         full_dose_coverage=sum(row["dose_coverage"] == 1.0 for row in site_rows))
        else:
            entry["same_phantom_as"] = {row["case_id"]: row["same_phantom_as"] for row in site_rows
                                        if row["same_phantom_as"]}
        sites[site.name] = entry
    return {
        "generator": GENERATOR,
        "profile": profile.name,
        "seed": seed,
        "voxel_mm": profile.voxel_mm,
        "sites": sites,
        "bayes_auc_labelled": _bayes_auc(truth),
        "label_model": label_model.as_dict(),
        "mr_to_ct": "x_ct = mr_to_ct @ x_mr (4x4, RAS mm); truth.csv columns mr_to_ct_RC, row R, column C",
        "positive_class": "TP (label 1)",
    }
