"""``psp-sim ablate``: the paper's Tables 2-4 on the synthetic federation, next to the Bayes AUC.

Table 2 (baselines): the proposed model (federated, and the same model trained centrally) against
Jang et al. (CNN-LSTM), Akbari et al. (CNN features + radiomics -> SVM) and Sun et al. (radiomics +
clinical -> random forest). The baselines train centrally on the pooled training sites: a random
forest or an SVM cannot be FedAvg-ed, and the point of the table is the models, not the federation.
Table 3 (modalities): MRI-only, clinical-only, multimodal heads, each a federated study.
Table 4 (encoders): the ViT trained end to end from scratch, fine-tuned from the SSL weights
("transfer"), or frozen after SSL (proposed), each a federated study.

Every variant reuses the main run's config and released SSL encoder (no SSL repeated) and writes
into ``<out>/ablation/<variant>/``; a variant with results is not rerun.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from sklearn.metrics import roc_auc_score

from psp_model.io import atomic_write_text
from psp_model.nets.baselines import (
    JangCNNLSTM,
    akbari_classifier,
    akbari_features,
    jang_slices,
    lesion_features,
    sun_classifier,
)
from psp_model.preprocess.clinical import FeatureManifest
from psp_model.preprocess.nyul import NyulLandmarks
from psp_model.preprocess.pipeline import case_paths
from psp_model.site_tasks import (
    LocalSite,
    classifier_inputs,
    load_installed,
    round_seed,
)
from psp_model.study import StudyConfig
from psp_model.train.finetune import (
    ClassifierData,
    FinetuneConfig,
    predict_proba,
    train_classifier,
)
from server.run_dir import load_verified_npz
from simulation.central import (
    CENTRAL_FILE,
    Inputs,
    central_reference,
    cross_validate,
    install_everywhere,
    local_sites,
    summarise,
)
from simulation.cohort import TRUTH_FILE
from simulation.federation import simulate_study
from simulation.run_cmd import run

__all__ = ["BASELINE_NAMES", "TABLES", "VARIANTS", "ablate", "bayes_auc"]

TABLES: tuple[str, ...] = ("baselines", "modalities", "encoders")
ABLATION_FILE = "ablation.json"

JANG_LR = 1e-3
"""The CNN-LSTM learns from random initialisation (no frozen encoder), so it gets Adam's usual 1e-3
rather than the head's 1e-4, with the study's total fine-tuning epochs."""

PROPOSED = "Proposed (SSL ViT + clinical, guided cross-attention)"


@dataclass(frozen=True)
class FederatedVariant:
    """One federated ablation study: the main run's config with another head or encoder mode."""

    name: str
    table: str
    method: str
    note: str
    head_variant: str = "multimodal"
    encoder_mode: str = "ssl"


VARIANTS: tuple[FederatedVariant, ...] = (
    FederatedVariant("mri-only", "modalities", "MRI only (SSL ViT tokens, attention head)", "federated",
                     head_variant="mri-only"),
    FederatedVariant("clinical-only", "modalities", "Clinical + dose only (4-layer FC)", "federated",
                     head_variant="clinical-only"),
    FederatedVariant("scratch", "encoders", "ViT end-to-end (random init)",
                     "federated; the encoder trains and travels", encoder_mode="scratch"),
    FederatedVariant("transfer", "encoders", "ViT transfer learning (SSL init, fine-tuned)",
                     "federated; the encoder trains and travels (paper: survival pretraining)",
                     encoder_mode="transfer"),
)

BASELINE_NAMES: dict[str, str] = {
    "jang": "CNN-LSTM: Jang et al.",
    "akbari": "CNN-SVM: Akbari et al. (SSL encoder as the CNN)",
    "sun": "Random forest: Sun et al.",
}
BASELINE_NOTES: dict[str, str] = {
    "jang": "central, pooled",
    "akbari": "central, pooled (an SVM cannot be FedAvg-ed)",
    "sun": "central, pooled (a random forest cannot be FedAvg-ed)",
}


def ablate(
    profile: Annotated[str, typer.Option(
        help="Cohort/study profile of the main run: tiny (a smoke run) or demo (the README's study).")] = "demo",
    out: Annotated[Path, typer.Option(
        help="The psp-sim run folder: <out>/run is reused when it holds a finished run, else produced first.")
                   ] = Path("out/demo"),
    only: Annotated[str, typer.Option(
        help="Comma-separated tables: baselines (Table 2: three baselines and the central reference, trained "
             "centrally), modalities (Table 3: two federated studies), encoders (Table 4: two federated studies, "
             "the slowest, since the encoder trains on volumes).")] = ",".join(TABLES),
    seed: Annotated[int, typer.Option(help="Seed of the main run when it must be produced.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Cases preprocessed in parallel per site (main run).")] = 2,
) -> None:
    """Ablations and baselines shaped like the paper's Tables 2-4, with the cohort's Bayes AUC.

    Writes <out>/ablation.md, <out>/run/ablation.json and <out>/run/central.json (the central reference).

    Resumable: a variant with results is reused, an interrupted federated one continues.
    """
    tables = _tables(only)
    if profile not in ("tiny", "demo"):
        raise typer.BadParameter(f"{profile!r} is not one of ['tiny', 'demo']", param_hint="--profile")
    out = out.resolve()
    study = _main_run(profile, out, seed, workers)
    typer.echo(f"ablate: tables {', '.join(tables)}; main run {out / 'run'} "
               f"({study.folds} folds, {study.finetune_rounds} x {study.finetune_local_epochs} fine-tuning epochs)")
    started = time.perf_counter()
    cohort_dir, run_dir = Path(study.cohort_dir), out / "run"
    main_metrics = json.loads((run_dir / "metrics.json").read_text())
    results: dict[str, tuple[dict, str, str]] = {"proposed": (main_metrics, PROPOSED, "federated (main run)")}
    if "baselines" in tables:
        results["central"] = (_step("central reference", run_dir / CENTRAL_FILE,
                                    lambda: central_reference(cohort_dir, run_dir, study)),
                              "Proposed, trained centrally", "central, pooled (same folds and epochs)")
        inputs = _LazyBaselineInputs(cohort_dir, run_dir, study)
        for name, method in BASELINE_NAMES.items():
            folder = out / "ablation" / name
            results[name] = (_step(f"baseline {name}", folder / "metrics.json",
                                   lambda name=name, folder=folder: _run_baseline(name, inputs, study, folder)),
                             method, BASELINE_NOTES[name])
    for variant in VARIANTS:
        if variant.table in tables:
            folder = out / "ablation" / variant.name
            results[variant.name] = (_step(f"{variant.name} (federated)", folder / "metrics.json",
                                           lambda variant=variant, folder=folder: _run_variant(variant, study,
                                                                                                run_dir, folder)),
                                     variant.method, variant.note)
    bayes = bayes_auc(cohort_dir, study)
    ablation = _write_tables(run_dir, tables, results, bayes)
    report = _write_markdown(out, study, ablation, results, bayes)
    typer.echo(f"\nablate done in {time.perf_counter() - started:.0f} s")
    typer.echo(f"tables:  {report}")
    typer.echo(f"json:    {run_dir / ABLATION_FILE}")


def _tables(only: str) -> list[str]:
    chosen = [t.strip() for t in only.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TABLES]
    if unknown or not chosen:
        raise typer.BadParameter(f"{unknown or only!r}: choose among {', '.join(TABLES)}, comma-separated",
                                 param_hint="--only")
    return [t for t in TABLES if t in chosen]


def _main_run(profile: str, out: Path, seed: int, workers: int) -> StudyConfig:
    """The finished main run's study config, running ``psp-sim run`` first when there is none."""
    run_dir = out / "run"
    if not (run_dir / "metrics.json").is_file():
        typer.echo(f"main run: none finished in {run_dir}; running psp-sim run --profile {profile}")
        run(profile=profile, out=out, seed=seed, workers=workers, resume=True)
    study = StudyConfig.from_run_config(json.loads((run_dir / "config.json").read_text()),
                                        where=str(run_dir / "config.json"))
    if study.profile != profile:
        raise typer.BadParameter(f"{run_dir} holds a {study.profile!r} run; pass --profile {study.profile} "
                                 "or another --out", param_hint="--profile")
    return study


def _step(title: str, result_path: Path, work: Callable[[], dict]) -> dict:
    """Run one variant unless its result file exists; print what happened."""
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        typer.echo(f"  {title}: finished before, reused ({_auc_text(result)})")
        return result
    typer.echo(f"  {title}: running...")
    started = time.perf_counter()
    result = work()
    typer.echo(f"  {title}: {_auc_text(result)} in {time.perf_counter() - started:.0f} s")
    return result


def _auc_text(metrics: dict) -> str:
    pooled = metrics.get("test", {}).get("ensemble_pooled", {})
    return f"test AUC {_fmt(pooled.get('auc'))}"


def _run_variant(variant: FederatedVariant, study: StudyConfig, run_dir: Path, folder: Path) -> dict:
    """A federated study without SSL: the main run's encoder is copied in as the released one."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    for path in (run_dir / "models").glob("encoder.*"):
        shutil.copy2(path, models / path.name)
    simulate_study(replace(study, run_dir=str(folder), phases="stats,finetune,evaluate", resume=True,
                           head_variant=variant.head_variant, encoder_mode=variant.encoder_mode))
    return json.loads((folder / "metrics.json").read_text())


class _LazyBaselineInputs:
    """Per labelled site: encoded clinical, frozen-encoder tokens, lesion radiomics and Jang's slices.

    Computed on first use only, so a rerun whose baselines are all finished loads no data.
    """

    def __init__(self, cohort_dir: Path, run_dir: Path, study: StudyConfig) -> None:
        self.cohort_dir, self.run_dir, self.study = cohort_dir, run_dir, study
        self._value: tuple[list[LocalSite], dict[str, dict[str, np.ndarray | torch.Tensor]]] | None = None

    def get(self) -> tuple[list[LocalSite], dict[str, dict[str, np.ndarray | torch.Tensor]]]:
        if self._value is None:
            self._value = self._load()
        return self._value

    def _load(self) -> tuple[list[LocalSite], dict[str, dict[str, np.ndarray | torch.Tensor]]]:
        released = json.loads((self.run_dir / "models" / "ensemble.json").read_text())
        landmarks = NyulLandmarks.from_arrays({k: np.asarray(v) for k, v in released["nyul_landmarks"].items()})
        manifest = FeatureManifest.from_json(released["feature_manifest"])
        study = replace(self.study, head_variant="multimodal", encoder_mode="ssl")
        sites = local_sites(self.cohort_dir, study)
        encoder_hash = install_everywhere(sites, load_verified_npz(self.run_dir / "models" / "encoder.npz"),
                                          landmarks, manifest)
        features = {}
        for site in sites:
            if not {"train", "test"} & set(site.site.roles):
                continue
            tokens, clinical, _ = classifier_inputs(site, load_installed(site, encoder_hash))
            radiomics, slices = _lesion_inputs(site, landmarks)
            features[site.site.name] = {"tokens": tokens, "clinical": clinical, "radiomics": radiomics,
                                        "slices": slices}
        return sites, features


def _lesion_inputs(site: LocalSite, landmarks: NyulLandmarks) -> tuple[np.ndarray, np.ndarray]:
    """Sun's radiomics ``(n, 18)`` and Jang's 9 axial slices ``(n, 9, D, H)`` of the standardised T1CE."""
    radiomics, slices = [], []
    for index, case_id in enumerate(site.data.case_ids):
        with np.load(case_paths(Path(site.site.work_dir), case_id)[0]) as arrays:
            lesion, affine = arrays["lesion"], arrays["affine"]
        t1ce = site.data.standardized_case(index, landmarks)[0]
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        radiomics.append(lesion_features(t1ce, lesion, spacing=spacing))
        slices.append(jang_slices(t1ce, lesion))
    return np.stack(radiomics), np.stack(slices)


def _run_baseline(name: str, lazy: _LazyBaselineInputs, study: StudyConfig, folder: Path) -> dict:
    """Cross-validate one baseline on the pooled training sites; write ``<folder>/metrics.json``."""
    sites, features = lazy.get()
    epochs = study.finetune_rounds * study.finetune_local_epochs

    if name == "sun":
        inputs = {s: (np.hstack([f["radiomics"], f["clinical"]]),) for s, f in features.items()}

        def fit(x: Inputs, y: np.ndarray, fold: int) -> Callable[[Inputs], np.ndarray]:
            forest = sun_classifier(random_state=round_seed(study.seed, "sun", fold) % 2**31).fit(x[0], y)
            return lambda data: forest.predict_proba(data[0])[:, 1]
    elif name == "akbari":
        inputs = {s: (akbari_features(f["tokens"], f["radiomics"]),) for s, f in features.items()}

        def fit(x: Inputs, y: np.ndarray, fold: int) -> Callable[[Inputs], np.ndarray]:
            svm = akbari_classifier(cv=int(min(5, np.bincount(y, minlength=2).min()))).fit(x[0], y)
            return lambda data: svm.predict_proba(data[0])[:, 1]
    else:
        inputs = {s: (f["slices"], f["clinical"]) for s, f in features.items()}

        def fit(x: Inputs, y: np.ndarray, fold: int) -> Callable[[Inputs], np.ndarray]:
            seed = round_seed(study.seed, "jang", fold)
            torch.manual_seed(seed)
            model = JangCNNLSTM(x[1].shape[1])
            train_classifier(model, ClassifierData(x[0], x[1], y), None,
                             FinetuneConfig(lr=JANG_LR, epochs=epochs, batch_size=study.batch_size, patience=None,
                                            device=study.device, precision=study.precision, seed=seed),
                             progress=False)
            return lambda data: predict_proba(model, ClassifierData(data[0], data[1], np.zeros(len(data[1]))),
                                              device=study.device)

    metrics = summarise(sites, cross_validate(sites, inputs, fit, study.folds), study.folds)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def bayes_auc(cohort_dir: Path, study: StudyConfig) -> float | None:
    """AUC of the generator's own P(TP) on the test sites' usable cases (truth.csv): the ceiling."""
    sites = [s for s in local_sites(cohort_dir, study) if "test" in s.site.roles]
    usable = {(s.site.name, case_id) for s in sites for case_id in s.data.case_ids}
    with (cohort_dir / TRUTH_FILE).open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (r["site"], r["case_id"]) in usable]
    labels = [int(r["label"]) for r in rows]
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, [float(r["p_tp"]) for r in rows]))


def _number(value: object) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _row(metrics: dict, method: str, note: str, bayes: float | None) -> dict:
    pooled = metrics["test"]["ensemble_pooled"]
    auc_folds = metrics["test"].get("folds", {}).get("auc", {})
    return {
        "method": method,
        "auc": _number(pooled.get("auc")),
        "auc_ci": [_number(pooled.get("auc_ci_low")), _number(pooled.get("auc_ci_high"))],
        "accuracy": _number(pooled.get("accuracy")),
        "sensitivity": _number(pooled.get("sensitivity")),
        "specificity": _number(pooled.get("specificity")),
        "auc_folds_mean": _number(auc_folds.get("mean")),
        "auc_folds_sd": _number(auc_folds.get("sd")),
        "bayes_auc": bayes,
        "note": note,
    }


_TABLE_ROWS: dict[str, tuple[str, ...]] = {
    "baselines": ("jang", "akbari", "sun", "central", "proposed"),
    "modalities": ("mri-only", "clinical-only", "proposed"),
    "encoders": ("scratch", "transfer", "proposed"),
}
"""Row order of each table (the paper's: baselines first, the proposed model last)."""


def _write_tables(run_dir: Path, tables: list[str], results: dict, bayes: float | None) -> dict:
    """Update ``<run_dir>/ablation.json``: the chosen tables are replaced, others kept."""
    path = run_dir / ABLATION_FILE
    ablation = json.loads(path.read_text()) if path.is_file() else {"tables": {}}
    for table in tables:
        ablation["tables"][table] = [_row(*results[key], bayes) for key in _TABLE_ROWS[table]]
    if "modalities" in tables:
        ablation.setdefault("histograms", {})["modalities"] = _modality_curves(run_dir)
    atomic_write_text(path, json.dumps(ablation, indent=2))
    return ablation


def _modality_curves(run_dir: Path) -> dict[str, list]:
    """The test sites' pooled ensemble histogram of each input modality (the report's ROC per modality)."""
    variants = run_dir.parent / "ablation"
    sources = {"MRI only": variants / "mri-only", "clinical only": variants / "clinical-only",
               "multimodal (proposed)": run_dir}
    curves = {}
    for label, folder in sources.items():
        path = folder / "histograms.json"
        if path.is_file() and "ensemble" in (test := json.loads(path.read_text()).get("test", {})):
            curves[label] = test["ensemble"]
    return curves


_TITLES = {
    "baselines": "Table 2 — proposed model vs the paper's baselines",
    "modalities": "Table 3 — input modality",
    "encoders": "Table 4 — how the ViT encoder is trained",
}


def _write_markdown(out: Path, study: StudyConfig, ablation: dict, results: dict, bayes: float | None) -> Path:
    lines = [f"# Ablations and baselines: profile `{study.profile}`, synthetic cohort", "",
             (f"External test site(s), soft-voting ensemble of the {study.folds} fold models (AUC with its 95 % "
              "DeLong interval); `folds` = mean ± sd of the single fold models' AUC. Bayes AUC = the generator's "
              "own P(TP) on the same test cases (truth.csv): what no model can beat."), ""]
    central_path = out / "run" / CENTRAL_FILE
    if central_path.is_file():
        federated = results["proposed"][0]["test"]["ensemble_pooled"].get("auc")
        central = json.loads(central_path.read_text())["test"]["ensemble_pooled"].get("auc")
        if _number(federated) is not None and _number(central):
            lines += [(f"Federated / central AUC: {federated:.3f} / {central:.3f} = {federated / central:.3f} "
                       "(target >= 0.97)."), ""]
    for table in (t for t in TABLES if t in ablation["tables"]):
        lines += [f"## {_TITLES[table]}", "",
                  "| Method | AUC [95% CI] | AUC folds | Accuracy | Sensitivity | Specificity | Bayes AUC | Note |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in ablation["tables"][table]:
            low, high = row["auc_ci"]
            lines.append(f"| {row['method']} | {_fmt(row['auc'])} [{_fmt(low)}, {_fmt(high)}] | "
                         f"{_fmt(row['auc_folds_mean'])} ± {_fmt(row['auc_folds_sd'])} | {_fmt(row['accuracy'])} | "
                         f"{_fmt(row['sensitivity'])} | {_fmt(row['specificity'])} | {_fmt(row['bayes_auc'])} | "
                         f"{row['note']} |")
        lines.append("")
    return atomic_write_text(out / "ablation.md", "\n".join(lines))


def _fmt(value: object) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.3f}"

