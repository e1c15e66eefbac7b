"""The centralised reference: the study's models trained on the pooled data of every training site.

Simulation only: no real machine holds every hospital's cases. It answers "what does federation
cost?" — the federated ensemble's AUC next to the same model trained centrally for the same epochs
(``central.json``) — and times the same training for the overhead benchmark (bench/federation.py).

Fold k of the pooled data is the union of every training site's own fold k (``LocalSite.folds``):
stratified by class and site, and exactly the federated run's split, so the two differ only in
where the training happens. Inputs, models and evaluation are the sites' own code
(:mod:`psp_model.site_tasks`), so the comparison cannot drift from what the sites run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from psp_model.evaluate.metrics import score_histograms
from psp_model.nets.encoder import SSLAutoencoder
from psp_model.preprocess.clinical import (
    ClinicalStats,
    FeatureManifest,
    build_manifest,
    fit_clinical_stats,
)
from psp_model.preprocess.nyul import NyulLandmarks, combine_landmarks
from psp_model.site_tasks import (
    LocalSite,
    fold_classifier,
    classifier_inputs,
    load_installed,
    initial_finetune_state,
    initial_ssl_state,
    install_study_model,
    round_seed,
)
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig
from psp_model.train.finetune import (
    ClassifierData,
    FinetuneConfig,
    predict_proba,
    train_classifier,
)
from psp_model.train.ssl import SSLConfig, train_ssl
from server.run_dir import RunDir, load_verified_npz
from server.study_runner import SiteEvaluation, metrics_from_pooled, pool_evaluations
from simulation.cohort import SITE_CONFIG_DIR

__all__ = [
    "CENTRAL_FILE",
    "central_heads",
    "central_reference",
    "central_seconds",
    "central_ssl",
    "cross_validate",
    "install_everywhere",
    "local_sites",
    "summarise",
]

CENTRAL_FILE = "central.json"

Inputs = tuple[np.ndarray | torch.Tensor | None, ...]
"""Per-case arrays of one site, all indexed by case along axis 0 (``None`` for an absent input)."""

FitPredict = Callable[[Inputs, np.ndarray, int], Callable[[Inputs], np.ndarray]]
"""``fit(pooled training inputs, labels, fold) -> predict(inputs) -> TP probabilities (n,)``."""


def local_sites(cohort_dir: Path, study: StudyConfig) -> list[LocalSite]:
    """Every site of ``<cohort_dir>/site_configs``, as the simulated SuperNodes see it, sorted by name."""
    paths = sorted((Path(cohort_dir) / SITE_CONFIG_DIR).glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no site configs in {Path(cohort_dir) / SITE_CONFIG_DIR}; generate a cohort first")
    return [LocalSite(load_site_config(path), study) for path in paths]


def _with_role(sites: Sequence[LocalSite], role: str) -> list[LocalSite]:
    return [s for s in sites if role in s.site.roles]


def central_ssl(sites: Sequence[LocalSite], study: StudyConfig) -> tuple[dict[str, np.ndarray], NyulLandmarks]:
    """SSL pretraining on the pooled volumes of the ``ssl`` sites for ``ssl_rounds x ssl_local_epochs``.

    Landmarks combine the ssl and training sites' own (as the federated ``stats`` phase does).
    Returns the ``encoder.*`` arrays and the landmarks.
    """
    landmarks = combine_landmarks([s.data.local_landmarks() for s in sites if "test" not in s.site.roles])
    volumes = [torch.as_tensor(v) for s in _with_role(sites, "ssl") for v in s.data.standardized(landmarks)]
    model = SSLAutoencoder(sites[0].profile.encoder)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in initial_ssl_state(study).items()})
    train_ssl(model, volumes, SSLConfig(lr=study.ssl_lr, batch_size=min(study.batch_size, len(volumes)),
                                        epochs=study.ssl_rounds * study.ssl_local_epochs,
                                        temperature=study.ssl_temperature, device=study.device,
                                        precision=study.precision, seed=round_seed(study.seed, "central-ssl")),
              progress=False)
    encoder = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return encoder, landmarks


def install_everywhere(sites: Sequence[LocalSite], encoder: dict[str, np.ndarray], landmarks: NyulLandmarks,
                       manifest: FeatureManifest) -> str:
    """Install encoder, landmarks and manifest at the training and test sites; returns the encoder hash."""
    replies = [install_study_model(s, encoder, landmarks, manifest) for s in sites
               if {"train", "test"} & set(s.site.roles)]
    return str(replies[0].configs["encoder-hash"])


def _take(inputs: Inputs, index: np.ndarray) -> Inputs:
    return tuple(None if a is None else a[index] for a in inputs)


def _pool(parts: Sequence[Inputs]) -> Inputs:
    def concat(arrays: list) -> np.ndarray | torch.Tensor | None:
        if arrays[0] is None:
            return None
        if isinstance(arrays[0], torch.Tensor):
            return torch.cat(arrays)
        return np.concatenate(arrays)

    return tuple(concat([p[i] for p in parts]) for i in range(len(parts[0])))


def cross_validate(sites: Sequence[LocalSite], inputs: dict[str, Inputs], fit: FitPredict, folds: int
                   ) -> dict[str, SiteEvaluation]:
    """Train one model per fold on the pooled training parts; evaluate as the sites do in phase ``evaluate``.

    Training sites: fold k's model on their own validation part of fold k (``fold-K``). Test sites:
    every fold's model (``fold-K``) and their soft-voting ensemble (``ensemble``). Histograms and
    Brier sums, as the federated replies carry them (see :func:`summarise`).
    """
    train, test = _with_role(sites, "train"), _with_role(sites, "test")
    if not train:
        raise ValueError("no site with role 'train' in the cohort: nothing to train centrally")
    splits = {s.site.name: s.folds() for s in train}
    evaluations = {s.site.name: SiteEvaluation({}) for s in (*train, *test)}

    def record(site: LocalSite, key: str, probs: np.ndarray, labels: np.ndarray) -> None:
        evaluations[site.site.name].histograms[key] = score_histograms(probs, labels)
        evaluations[site.site.name].brier_sums[key] = float(np.sum((probs - labels) ** 2))

    test_probs: dict[str, list[np.ndarray]] = {s.site.name: [] for s in test}
    for fold in range(folds):
        pooled = _pool([_take(inputs[s.site.name], splits[s.site.name][fold][0]) for s in train])
        labels = np.concatenate([s.data.labels[splits[s.site.name][fold][0]] for s in train])
        predict = fit(pooled, labels, fold)
        for s in train:
            val = splits[s.site.name][fold][1]
            record(s, f"fold-{fold}", predict(_take(inputs[s.site.name], val)), s.data.labels[val])
        for s in test:
            test_probs[s.site.name].append(predict(inputs[s.site.name]))
            record(s, f"fold-{fold}", test_probs[s.site.name][-1], s.data.labels)
    for s in test:
        record(s, "ensemble", np.mean(test_probs[s.site.name], axis=0), s.data.labels)
    return evaluations


def summarise(sites: Sequence[LocalSite], evaluations: dict[str, SiteEvaluation], folds: int) -> dict:
    """``metrics.json``-shaped results from :func:`cross_validate`, pooled as the server pools replies."""
    pooled = pool_evaluations(evaluations, [s.site.name for s in _with_role(sites, "test")],
                              [s.site.name for s in _with_role(sites, "train")], folds)
    return metrics_from_pooled(pooled, folds)


def central_heads(sites: Sequence[LocalSite], study: StudyConfig, encoder: dict[str, np.ndarray],
                  encoder_hash: str) -> dict[str, SiteEvaluation]:
    """The study's classifier (``head-variant``, ``encoder-mode``) trained on pooled folds; histograms per site.

    Each fold starts from the federated run's initial arrays and trains ``finetune_rounds x
    finetune_local_epochs`` epochs in one go, with one optimiser (as each site keeps its own across rounds).
    """
    labelled = [s for s in sites if {"train", "test"} & set(s.site.roles)]
    installed = {s.site.name: load_installed(s, encoder_hash) for s in labelled}
    inputs = {s.site.name: classifier_inputs(s, installed[s.site.name])[:2] for s in labelled}
    reference = labelled[0]
    manifest = installed[reference.site.name].manifest

    def fit(pooled: Inputs, labels: np.ndarray, fold: int) -> Callable[[Inputs], np.ndarray]:
        model = fold_classifier(reference, installed[reference.site.name], manifest,
                            initial_finetune_state(study, manifest, fold, encoder), what="the central model")
        config = FinetuneConfig(lr=study.finetune_lr, epochs=study.finetune_rounds * study.finetune_local_epochs,
                                batch_size=study.batch_size, patience=None, device=study.device,
                                precision=study.precision, seed=round_seed(study.seed, "central", fold))
        train_classifier(model, ClassifierData(*pooled, labels), None, config, progress=False)
        return lambda x: predict_proba(model, ClassifierData(*x, np.zeros(len(x[1]))), device=study.device)

    return cross_validate(sites, inputs, fit, study.folds)


def central_reference(cohort_dir: Path, run_dir: Path, study: StudyConfig) -> dict:
    """Train the run's model centrally on pooled training data; write and return ``<run_dir>/central.json``.

    Uses the run's released encoder, landmarks and feature manifest (``models/``), the study's
    folds, head variant, encoder mode and total fine-tuning epochs. The result has the shape of
    ``metrics.json`` (``test.ensemble_pooled``, ``validation.folds``...) plus ``epochs`` and ``seconds``.
    """
    run = RunDir(Path(run_dir))
    released = run.read_json("models/ensemble.json")
    encoder = load_verified_npz(run.root / "models" / "encoder.npz")
    landmarks = NyulLandmarks.from_arrays({k: np.asarray(v) for k, v in released["nyul_landmarks"].items()})
    manifest = FeatureManifest.from_json(released["feature_manifest"])
    started = time.perf_counter()
    sites = local_sites(cohort_dir, study)
    encoder_hash = install_everywhere(sites, encoder, landmarks, manifest)
    if encoder_hash != released["encoder_hash"]:
        raise RuntimeError(f"{run.root / 'models' / 'encoder.npz'} does not match ensemble.json's encoder_hash: "
                           "the run's models are inconsistent; rerun its study")
    result = summarise(sites, central_heads(sites, study, encoder, encoder_hash), study.folds)
    result.update(epochs=study.finetune_rounds * study.finetune_local_epochs,
                  train_sites=[s.site.name for s in _with_role(sites, "train")],
                  seconds=time.perf_counter() - started)
    run.write_json(CENTRAL_FILE, result)
    return result


def central_seconds(cohort_dir: Path, study: StudyConfig) -> dict[str, float]:
    """Wall seconds of the whole study trained centrally (pooled SSL, then pooled folds), one process.

    Keys ``ssl``, ``finetune`` (all folds, with the new encoder's token encoding and the folds'
    predictions) and ``study`` (everything, data loading included), to set against ``timings.json``.
    """
    started = time.perf_counter()
    sites = local_sites(cohort_dir, study)
    for site in sites:
        site.data  # noqa: B018 -- read the cases now, so the phase timings exclude it (as the federated ones do)
    ssl_started = time.perf_counter()
    encoder, landmarks = central_ssl(sites, study)
    ssl_seconds = time.perf_counter() - ssl_started
    train = _with_role(sites, "train")
    manifest = build_manifest(ClinicalStats.combine([fit_clinical_stats(s.data.records, s.data.dose) for s in train]))
    finetune_started = time.perf_counter()
    encoder_hash = install_everywhere(sites, encoder, landmarks, manifest)
    summarise(sites, central_heads(sites, study, encoder, encoder_hash), study.folds)
    finished = time.perf_counter()
    return {"ssl": ssl_seconds, "finetune": finished - finetune_started, "study": finished - started}
