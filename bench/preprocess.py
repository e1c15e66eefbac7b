"""Preprocessing benchmark: seconds and peak memory per case, per stage, on MNI phantoms with known truth.

    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py --profile full --cases 3 \\
        --schedules default,quick,rigid --threads 2 --json bench/results/preprocess_full_cpu.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py --pipeline --profile full --cases 3 --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py --cohort out/demo/cohort --threads 1 \\
        --json bench/results/registration_demo_cpu.json

``--pipeline`` times the real site pipeline (``psp_model.preprocess.pipeline.preprocess_site``) end
to end on a synthetic training site written in the profile's resolution: DICOM CT and RTDOSE
reading, the MR pipeline, registration and dose features, per stage, plus the process's peak memory.

``--cohort`` registers every case with a planning CT of a generated cohort (``psp-sim cohort`` or a
``psp-sim run`` folder's ``cohort/``), deterministically with the default schedule, and compares the
lesion dose features and the lesion's registration error with ``truth.csv``: the accuracy claim at the
cohort's own resolution, case by case.

Each case is a phantom from :mod:`simulation.phantom` at the profile's voxel size: a follow-up T1CE
moved by a random rigid offset (up to 10 deg / 15 mm), with a lesion, bias field and noise, and the
raw-HU planning CT; both cropped to a 160 mm cube around the brain (160^3 MR voxels at ``full``).
Stages run one after the other on each case; each row of the table is one stage (and variant).
Wall seconds depend on what else runs on the machine: the report gives the load average and the
process CPU seconds too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psp_model.preprocess.register import RegistrationConfig, register_mr_to_ct  # noqa: E402
from simulation import phantom  # noqa: E402
from simulation.cohort import ENHANCING_LABELS, truth_mr_to_ct  # noqa: E402
from simulation.profiles import PROFILES  # noqa: E402

CROP_MM = 160.0
DOSE_FEATURES = ("mean", "min", "median", "d98")
"""The lesion dose features compared with ``truth.csv``'s ``dose_<name>`` columns."""
SCHEDULES: dict[str, Callable[[], RegistrationConfig]] = {
    "default": RegistrationConfig,
    "rigid": RegistrationConfig.ants_rigid,
    "quick": RegistrationConfig.ants_quick_rigid,
}


@dataclass(frozen=True)
class Case:
    case_id: str
    t1ce: nib.Nifti1Image
    ct: nib.Nifti1Image
    mr_to_ct: np.ndarray
    brain_points: np.ndarray
    """RAS mm (MR world) of the brain voxels, for target registration errors."""


def make_case(seed: int, voxel_mm: float) -> Case:
    rng = np.random.default_rng(seed)
    template = phantom.load_template(voxel_mm)
    mr_to_ct, _ = phantom.sample_rigid(rng)
    lesion = phantom.sample_lesion(rng, template, rng.uniform())
    images, _, brain = phantom.render_mr(template, lesion, mr_to_ct, ("t1ce",))
    t1ce = phantom.scanner(rng, images["t1ce"], brain, gain=1000.0, noise=0.03, bias=0.15)
    ct = phantom.ct_hu(rng, template).astype(np.float32)
    centre_ct = template.voxel_centres(np.asarray(template.brain) > 0.5).mean(axis=0)
    centre_mr = np.linalg.solve(mr_to_ct, [*centre_ct, 1.0])[:3]
    t1ce_image = _crop(t1ce, template.affine, centre_mr)
    brain_image = _crop(np.asarray(brain), template.affine, centre_mr)
    voxels = np.argwhere(np.asarray(brain_image.dataobj) > 0.5)
    points = voxels @ brain_image.affine[:3, :3].T + brain_image.affine[:3, 3]
    return Case(f"phantom-{seed}", t1ce_image, _crop(ct, template.ct_affine, centre_ct), mr_to_ct, points)


def _crop(data: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray) -> nib.Nifti1Image:
    """The CROP_MM cube around a world point (clipped to the volume), as a new image."""
    centre = np.linalg.solve(affine, [*centre_mm, 1.0])[:3]
    half = CROP_MM / 2.0 / np.linalg.norm(affine[:3, :3], axis=0)
    lower = np.clip(np.round(centre - half).astype(int), 0, data.shape)
    upper = np.clip(np.round(centre + half).astype(int), 0, data.shape)
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ lower + affine[:3, 3]
    box = tuple(slice(a, b) for a, b in zip(lower, upper))
    return nib.Nifti1Image(np.ascontiguousarray(data[box]), cropped)


def registration_stage(schedule: str) -> Callable[[Case], dict]:
    config = SCHEDULES[schedule]()

    def run(case: Case) -> dict:
        result = register_mr_to_ct(case.t1ce, case.ct, config=config)
        points = np.c_[case.brain_points, np.ones(len(case.brain_points))].T
        errors = np.linalg.norm((result.mr_to_ct @ points - case.mr_to_ct @ points)[:3], axis=0)
        return {"tre_mean_mm": float(errors.mean()), "tre_max_mm": float(errors.max()),
                "rotation_deg": result.rotation_deg, "brain_overlap": result.brain_overlap}

    return run


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each stage gets its own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status: this benchmark needs Linux")


def measure(stage: Callable[[Case], dict], case: Case) -> dict:
    _reset_peak_rss()
    base = _rss_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    extra = stage(case)
    return {"case": case.case_id, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
            "peak_rss_mib": _rss_mib("VmHWM"), "rss_before_mib": base, **extra}


def summarise(name: str, runs: list[dict]) -> dict:
    row = {"stage": name, "cases": len(runs)}
    for key in runs[0]:
        if key != "case":
            values = np.array([run[key] for run in runs], dtype=float)
            row[key] = float(values.max() if key.endswith(("_max_mm", "_rss_mib")) else values.mean())
    return row


def print_table(rows: list[dict]) -> None:
    columns = ["stage", "cases", "seconds", "cpu_seconds", "peak_rss_mib", "rss_before_mib", "tre_mean_mm",
               "tre_max_mm"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full",
                        help="voxel size of the phantoms (full = 1 mm, 160^3 MR crop); default full")
    parser.add_argument("--cases", type=int, default=3, help="number of phantom cases; default 3")
    parser.add_argument("--schedules", default="default",
                        help=f"comma-separated registration schedules out of {sorted(SCHEDULES)}; default 'default'")
    parser.add_argument("--threads", type=int, default=2, help="ITK threads (set before ants is imported); default 2")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first case; default 100")
    parser.add_argument("--json", type=Path, help="also write the rows and every run to this JSON file")
    parser.add_argument("--pipeline", action="store_true",
                        help="time the whole site pipeline per stage on a generated synthetic site instead")
    parser.add_argument("--cohort", type=Path,
                        help="a generated cohort folder: register each of its CT cases and compare with truth.csv instead")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.schedules.split(",")) - set(SCHEDULES))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; choose from {sorted(SCHEDULES)}")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if args.cohort:
        return cohort_accuracy(args.cohort, args.json)
    if args.pipeline:
        return pipeline_benchmark(args.profile, args.cases, args.seed, args.json)

    voxel_mm = PROFILES[args.profile].voxel_mm
    stages = {f"registration[{s}]": registration_stage(s) for s in args.schedules.split(",")}
    print(f"profile {args.profile} ({voxel_mm:g} mm), {args.cases} cases, ITK threads {args.threads}, "
          f"stages {list(stages)}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in stages}
    load_before = os.getloadavg()
    for index in range(args.cases):
        case = make_case(args.seed + index, voxel_mm)
        for name, stage in stages.items():
            runs[name].append(measure(stage, case))
            print(f"  {case.case_id} {name}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in runs[name][-1].items() if isinstance(v, float)), flush=True)
    rows = [summarise(name, stage_runs) for name, stage_runs in runs.items()]
    print_table(rows)
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}; {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({
            "profile": args.profile, "voxel_mm": voxel_mm, "threads": args.threads, "load_average": load,
            "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows, "runs": runs,
        }, indent=2))


def _write_site(out: Path, profile: str, cases: int, seed: int) -> None:
    from dataclasses import replace

    from simulation.cohort import generate_cohort
    from simulation.profiles import Profile

    spec = PROFILES[profile]
    site = replace(spec.site("burdenko"), n_cases=cases)
    generate_cohort(out, seed=seed, profile=Profile(f"{profile}-bench", spec.voxel_mm, sites=(site,)), progress=False)


def pipeline_benchmark(profile: str, cases: int, seed: int, json_path: Path | None) -> None:
    """Per-stage seconds of ``preprocess_site`` (the cohort is written in a child process)."""
    import resource
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
    from psp_model.sites import load_site_config

    with tempfile.TemporaryDirectory() as tmp:
        with ProcessPoolExecutor(1) as pool:
            pool.submit(_write_site, Path(tmp), profile, cases, seed).result()
        site = load_site_config(Path(tmp) / "site_configs" / "burdenko.yaml")
        load_before = os.getloadavg()
        started, cpu_started = time.perf_counter(), time.process_time()
        run = preprocess_site(site, PreprocessSettings(profile=profile), progress=False)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        accuracy = _accuracy(run.results, Path(tmp) / "truth.csv")
    ok = [r for r in run.results if r.status == "ok"]
    stages = sorted({stage for r in ok for stage in r.seconds})
    rows = [{"stage": stage, "mean_s": float(np.mean([r.seconds[stage] for r in ok])),
             "max_s": float(np.max([r.seconds[stage] for r in ok]))} for stage in stages]
    per_case = [sum(r.seconds.values()) for r in ok]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"profile {profile}: {len(ok)} of {len(run.results)} cases ok, wall {wall:.1f} s "
          f"({wall / max(len(run.results), 1):.1f} s per case incl. reading and writing); process CPU "
          f"{cpu / max(len(run.results), 1):.1f} s per case (ITK threads included)")
    print("| stage | mean s | max s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['mean_s']:.2f} | {row['max_s']:.2f} |")
    print(f"| **total per case (stages)** | {np.mean(per_case):.2f} | {np.max(per_case):.2f} |")
    print(f"peak RSS of the process: {peak_mib:.0f} MiB; load average before {load_before}, after {os.getloadavg()}")
    print("against truth.csv: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    if json_path:
        json_path.write_text(json.dumps({"profile": profile, "cases": len(run.results), "ok": len(ok), "wall_s": wall,
                                         "cpu_s_per_case": cpu / max(len(run.results), 1),
                                         "stages": rows, "per_case_s": per_case, "peak_rss_mib": peak_mib,
                                         "accuracy": accuracy,
                                         "load_average": [load_before, os.getloadavg()]}, indent=2))


def _accuracy(results, truth_csv: Path) -> dict[str, float]:
    """Worst registration error (mean over a 120 mm cube around the origin) and dose-feature errors.

    Dose errors are absolute (Gy): median and max per feature, and the share of cases with every
    feature within 0.5 Gy of truth.csv.
    """
    import csv

    truth = {row["case_id"]: row for row in csv.DictReader(truth_csv.open())}
    grid = np.stack(np.meshgrid(*[np.linspace(-60, 60, 5)] * 3), -1).reshape(-1, 3)
    points = np.c_[grid, np.ones(len(grid))]
    tre, dose = [], []
    for result in results:
        if result.status != "ok":
            continue
        row = truth[result.case_id]
        true = truth_mr_to_ct(row)
        found = np.array(result.checks["mr_to_ct"])
        tre.append(float(np.linalg.norm((points @ true.T - points @ found.T)[:, :3], axis=1).mean()))
        dose.append([abs(result.features[f"dose_{k}"] - float(row[f"dose_{k}"])) for k in DOSE_FEATURES])
    errors = np.array(dose)
    return {"max_mean_tre_mm": max(tre), "max_dose_error_gy": float(errors.max()),
            "median_dose_error_gy": float(np.median(errors.max(axis=1))),
            "cases_within_0.5_gy": float(np.mean(errors.max(axis=1) <= 0.5)),
            **{f"{k}_median_gy": float(np.median(errors[:, i])) for i, k in enumerate(DOSE_FEATURES)},
            **{f"{k}_max_gy": float(errors[:, i].max()) for i, k in enumerate(DOSE_FEATURES)}}


def cohort_accuracy(cohort: Path, json_path: Path | None) -> None:
    """Per covered CT case: lesion TRE max (mm), worst of the four dose-feature errors (Gy), registration CPU s."""
    import csv

    from psp_model import schema
    from psp_model.preprocess.dicom import read_ct_series
    from psp_model.preprocess.dose import dose_features, rtdose_to_nifti
    from psp_model.preprocess.pipeline import PreprocessSettings

    config, rows, min_coverage = RegistrationConfig(), [], PreprocessSettings().min_dose_coverage
    for row in csv.DictReader((cohort / "truth.csv").open()):
        folder = cohort / row["site"] / row["case_id"]
        if not (folder / schema.CT_DIR).is_dir():
            continue
        if float(row["dose_coverage"]) < min_coverage:
            print(f"  {row['case_id']}: lesion {float(row['dose_coverage']):.0%} inside the dose grid, not a covered "
                  "case (the pipeline reports it in QC)", flush=True)
            continue
        t1ce, lesion = nib.load(folder / schema.T1CE_FILE), nib.load(folder / schema.LESION_FILE)
        ct, dose = read_ct_series(folder / schema.CT_DIR), rtdose_to_nifti(folder / schema.RTDOSE_FILE)
        voxels = np.argwhere(np.isin(np.asanyarray(lesion.dataobj), ENHANCING_LABELS))
        points = np.c_[nib.affines.apply_affine(lesion.affine, voxels), np.ones(len(voxels))]
        cpu_started = time.process_time()
        found = register_mr_to_ct(t1ce, ct, config=config, deterministic=True).mr_to_ct
        cpu = time.process_time() - cpu_started
        tre = np.linalg.norm((points @ (found - truth_mr_to_ct(row)).T)[:, :3], axis=1).max()
        features = dose_features(dose, lesion, labels=ENHANCING_LABELS, lesion_to_dose=found)
        error = max(abs(features[k] - float(row[f"dose_{k}"])) for k in DOSE_FEATURES)
        rows.append({"case_id": row["case_id"], "lesion_tre_max_mm": float(tre), "dose_error_gy": float(error),
                     "cpu_s": cpu})
        print(f"  {row['case_id']}: lesion TRE max {tre:.3f} mm, worst dose feature {error:.3f} Gy, {cpu:.1f} CPU s",
              flush=True)
    errors = np.array([r["dose_error_gy"] for r in rows])
    summary = {"cases": len(rows), "within_0.5_gy": int((errors <= 0.5).sum()), "worst_gy": float(errors.max()),
               "median_lesion_tre_max_mm": float(np.median([r["lesion_tre_max_mm"] for r in rows])),
               "cpu_s_per_case": float(np.mean([r["cpu_s"] for r in rows]))}
    print(f"{summary['within_0.5_gy']} / {summary['cases']} CT cases with all four lesion dose features within 0.5 Gy "
          f"(worst {summary['worst_gy']:.2f} Gy); median lesion TRE max {summary['median_lesion_tre_max_mm']:.2f} mm; "
          f"{summary['cpu_s_per_case']:.1f} CPU s per registration")
    if json_path:
        json_path.write_text(json.dumps({"cohort": str(cohort), **summary, "machine": platform.platform(),
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
