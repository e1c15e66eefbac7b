"""A site's local preprocessing: every case to model inputs + dose/clinical features, with a QC report.

Per case (``psp-case`` layout): clinical row -> MR pipeline -> planning CT + RTDOSE -> rigid
registration of the T1CE to the CT -> lesion dose features. Public SSL layouts get the MR pipeline
only. A broken case becomes a QC row with its id and reason and the others go on. Outputs are keyed by
a hash of the case's inputs and the settings, so a rerun skips what is already done.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from psp_model import schema
from psp_model.errors import CaseError, InputError
from psp_model.io import atomic_save_npz, atomic_write_text, sha256_files
from psp_model.layouts import Case, read_site
from psp_model.preprocess.qc import CaseResult, write_qc_report
from psp_model.sites import SiteConfig

PIPELINE_VERSION = "6"
"""Bump when preprocessing changes what it writes: every cached case is then recomputed."""

FEATURE_COLUMNS: tuple[str, ...] = (
    *schema.CLINICAL_COLUMNS, "dose_mean", "dose_min", "dose_median", "dose_d98", "dose_coverage",
)
"""Columns of a site's local ``features.csv`` (never leaves the site)."""

_LABEL_SPELLING = {index: spelling for spelling, index in schema.LABELS.items()}


@dataclass(frozen=True)
class PreprocessSettings:
    """Study-wide preprocessing settings (every site must use the same ones).

    Args:
        profile: MR grid preset: ``full`` (1 mm, 160^3), ``demo`` or ``tiny`` (coarser, same field of view).
        min_dose_coverage: smallest fraction of the lesion that must lie inside the dose grid.
        deterministic_registration: bit-identical registration (single-threaded, slower).
    """

    profile: str = "full"
    min_dose_coverage: float = 0.95
    deterministic_registration: bool = False

    def cache_token(self) -> bytes:
        return json.dumps({**asdict(self), "version": PIPELINE_VERSION}, sort_keys=True).encode()


@dataclass
class SiteRun:
    """Everything a preprocessing run of one site produced."""

    results: list[CaseResult] = field(default_factory=list)
    qc_json: Path | None = None
    qc_markdown: Path | None = None
    features_csv: Path | None = None

    @property
    def n_ok(self) -> int:
        return sum(r.status == "ok" for r in self.results)


def case_paths(work_dir: Path, case_id: str) -> tuple[Path, Path]:
    """Where one case's model input (``.npz``) and result record (``.json``) live."""
    folder = Path(work_dir) / "cases"
    return folder / f"{case_id}.npz", folder / f"{case_id}.json"


def input_files(case: Case) -> list[Path]:
    """The files whose content determines a case's outputs (hashed for the cache key)."""
    files = [p for p in (*case.mr.values(), case.lesion, case.rtdose) if p is not None and p.is_file()]
    if case.ct_dir is not None and case.ct_dir.is_dir():
        files += sorted(p for p in case.ct_dir.iterdir() if p.is_file())
    return files


def preprocess_site(
    site: SiteConfig,
    settings: PreprocessSettings,
    *,
    out_dir: Path | None = None,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> SiteRun:
    """Preprocess every case of ``site`` into ``out_dir`` (default: the site's ``work_dir``)."""
    out_dir = Path(out_dir or site.work_dir)
    listing = read_site(site)
    results = [CaseResult(p.case_id, "error", p.reason, stage="layout") for p in listing.problems]
    labelled = bool({"train", "test"} & set(site.roles))
    jobs = [(case, site, settings, out_dir, labelled, force) for case in listing.cases]
    results += _run_all(jobs, workers=workers, progress=progress, site=site.name)
    if strict and any(r.status == "error" for r in results):
        first = next(r for r in results if r.status == "error")
        raise CaseError(first.case_id, f"{first.reason} (--strict makes any case error fatal)")
    run = SiteRun(results=results)
    run.qc_json, run.qc_markdown = write_qc_report(results, out_dir, site=site.name, settings=asdict(settings))
    if site.layout == "psp-case":
        run.features_csv = _write_features(results, out_dir / "features.csv")
    return run


def _run_all(jobs: list[tuple], *, workers: int, progress: bool, site: str) -> list[CaseResult]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"preprocess {site}", unit="case", disable=not progress)
    results: list[CaseResult] = []
    try:
        if workers <= 1:
            for job in jobs:
                results.append(_process_case(*job))
                bar.update()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_limit_threads, initargs=(threads,)) as pool:
                for future in as_completed([pool.submit(_process_case, *job) for job in jobs]):
                    results.append(future.result())
                    bar.update()
    finally:
        bar.close()
    return results


def _limit_threads(threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _process_case(
    case: Case, site: SiteConfig, settings: PreprocessSettings, out_dir: Path, labelled: bool, force: bool
) -> CaseResult:
    npz_path, json_path = case_paths(out_dir, case.case_id)
    clinical_token = json.dumps(case.clinical, sort_keys=True).encode()
    try:
        key = sha256_files(input_files(case), extra=settings.cache_token() + clinical_token +
                           json.dumps(sorted(site.enhancing_labels)).encode())
    except OSError as exc:
        return CaseResult(case.case_id, "error", f"cannot read an input file: {exc}", stage="inputs")
    if not force and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("key") == key and (previous["status"] == "error" or npz_path.is_file()):
            result = CaseResult(**previous["result"])
            result.cached = True
            return result
    result = _compute_case(case, site, settings, npz_path, labelled)
    atomic_write_text(json_path, json.dumps({"key": key, "status": result.status, "result": asdict(result)},
                                            indent=1, default=float))
    return result


def _compute_case(case: Case, site: SiteConfig, settings: PreprocessSettings, npz_path: Path,
                  labelled: bool) -> CaseResult:
    from psp_model.preprocess.clinical import parse_clinical
    from psp_model.preprocess.mri import MRConfig, preprocess_mr
    from psp_model.preprocess.nyul import fit_nyul

    result = CaseResult(case.case_id, "ok")
    stage = "clinical"
    try:
        record = None
        if site.layout == "psp-case" and labelled:
            record = parse_clinical(case.case_id, case.clinical, require_label=True)
        stage = "mri"
        mr = _timed(result, stage, lambda: preprocess_mr(case, MRConfig.preset(settings.profile), None,
                                                         lesion=labelled, enhancing_labels=site.enhancing_labels))
        landmarks = fit_nyul([mr["image"]], [mr["brain"]])
        if site.layout == "psp-case" and labelled:
            result.features.update(_features_row(case, record, case_dose_features(case, site, settings, result)))
        stage = "write"
        arrays = {"image": mr["image"].astype(np.float32), "brain": mr["brain"].astype(bool),
                  "affine": np.asarray(mr["affine"], float)}
        if mr["lesion"] is not None:
            arrays["lesion"] = mr["lesion"].astype(np.uint8)
        arrays.update({f"landmarks_{k}": v for k, v in landmarks.to_arrays().items()})
        atomic_save_npz(npz_path, arrays)
    except CaseError as exc:
        return CaseResult(case.case_id, "error", exc.reason, stage=result.stage or stage, seconds=result.seconds)
    except (InputError, OSError) as exc:
        return CaseResult(case.case_id, "error", str(exc), stage=result.stage or stage, seconds=result.seconds)
    result.stage = ""
    return result


def case_dose_features(case: Case, site: SiteConfig, settings: PreprocessSettings, result: CaseResult
                       ) -> dict[str, float]:
    """Lesion dose features (Gy) and coverage of one case: planning CT + RTDOSE, registration, statistics.

    The one code path for sites and ``psp-predict``; stage timings and registration checks go into
    ``result``. Raises ``CaseError``/``InputError`` with the reason.
    """
    import nibabel as nib

    from psp_model.preprocess.dicom import read_ct_series, read_frame_of_reference
    from psp_model.preprocess.dose import dose_features, rtdose_to_nifti
    from psp_model.preprocess.register import register_mr_to_ct

    _check_same_frame(read_frame_of_reference(case.ct_dir), read_frame_of_reference(case.rtdose))
    ct = _timed(result, "ct", lambda: read_ct_series(case.ct_dir))
    dose = _timed(result, "dose", lambda: rtdose_to_nifti(case.rtdose))
    t1ce = nib.load(case.mr["t1ce"])
    registration = _timed(result, "registration", lambda: register_mr_to_ct(
        t1ce, ct, deterministic=settings.deterministic_registration))
    result.checks.update({"translation_mm": float(registration.translation_mm),
                          "rotation_deg": float(registration.rotation_deg),
                          "brain_overlap": float(registration.brain_overlap)})
    lesion = nib.load(case.lesion)
    features = _timed(result, "dose_features", lambda: dose_features(
        dose, lesion, labels=site.enhancing_labels, lesion_to_dose=registration.mr_to_ct,
        min_coverage=settings.min_dose_coverage))
    if features.get("reason"):
        raise CaseError(case.case_id, features["reason"])
    result.checks["mr_to_ct"] = np.asarray(registration.mr_to_ct).round(6).tolist()
    return {k: float(features[k]) for k in ("mean", "min", "median", "d98", "coverage")}


def _features_row(case: Case, record, dose: dict[str, float]) -> dict[str, float | str | None]:
    """One row of the site's ``features.csv`` (clinical values + lesion dose features)."""
    return {
        "case_id": case.case_id,
        "label": _LABEL_SPELLING[record.label],
        "age": record.age,
        "sex": record.sex,
        "idh": record.idh,
        "mgmt": record.mgmt,
        "days_since_rt": record.days_since_rt,
        **{f"dose_{k}": value for k, value in dose.items()},
    }


def _check_same_frame(ct_frame: str, dose_frame: str) -> None:
    if ct_frame != dose_frame:
        raise InputError(f"RTDOSE and planning CT have different frames of reference "
                         f"({dose_frame} vs {ct_frame}); the dose cannot be placed on the CT")


def _timed(result: CaseResult, stage: str, work: Callable):
    result.stage = stage
    start = time.perf_counter()
    value = work()
    result.seconds[stage] = round(time.perf_counter() - start, 3)
    return value



def _write_features(results: list[CaseResult], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FEATURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in sorted(results, key=lambda r: r.case_id):
        if result.status == "ok" and result.features:
            writer.writerow({k: result.features.get(k) for k in FEATURE_COLUMNS})
    return atomic_write_text(path, buffer.getvalue())
