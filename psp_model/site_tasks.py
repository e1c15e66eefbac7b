"""What a site does in each phase of a study, in plain Python; the ClientApp only packs messages.

Every function takes the global arrays the server sent and returns a :class:`Reply` holding only
what the allow-list in :mod:`psp_model.wire` permits: model arrays, aggregates over at least
``privacy.min_aggregate_count`` cases, and counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from psp_model import schema
from psp_model.evaluate.metrics import score_histograms
from psp_model.evaluate.shap_rank import clinical_shap, mean_abs_shap, subset_manifest
from psp_model.io import atomic_save_npz, atomic_write, atomic_write_text
from psp_model.nets.encoder import MRIEncoder, SSLAutoencoder, encoder_fingerprint
from psp_model.nets.fusion import (
    HeadConfig,
    PSPClassifier,
    build_classifier,
    load_trainable_state,
    trainable_state,
)
from psp_model.preprocess.clinical import (
    ClinicalRecord,
    FeatureManifest,
    encode,
    fit_clinical_stats,
)
from psp_model.preprocess.dose import DOSE_FEATURES
from psp_model.preprocess.nyul import NyulLandmarks
from psp_model.preprocess.pipeline import PreprocessSettings, SiteRun, preprocess_site
from psp_model.privacy import epsilon_spent, privatize_update
from psp_model.profiles import Profile, get_profile
from psp_model.site_data import SiteData, load_site_data
from psp_model.sites import SiteConfig
from psp_model.study import StudyConfig
from psp_model.train.finetune import (
    ClassifierData,
    FinetuneConfig,
    predict_proba,
    train_classifier,
)
from psp_model.train.checkpoint import load_checkpoint, save_checkpoint
from psp_model.train.ssl import SSLConfig, train_ssl
from psp_model.train.token_cache import encode_cached
from psp_model.wire import check_incoming_arrays, expected_from_state

NYUL_PREFIX = "nyul."
SHAP_MAX_EVALS = 100
"""Model evaluations per explained case: a seeded permutation estimate within ~0.004 of exact mean |SHAP|
(exact needs 2^features evaluations; measured in tests/test_shap_rank.py)."""


class PrivacyRefusal(RuntimeError):
    """The site's own policy forbids sending what was asked; the reason goes back, never the data."""


@dataclass
class Reply:
    """What one site sends back for one message."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    configs: dict[str, str | list[str]] = field(default_factory=dict)


def round_seed(seed: int, *parts: object) -> int:
    """A seed for one (phase, fold, round, site) that is the same in a resumed run."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def head_config(profile: Profile, n_features: int, variant: str) -> HeadConfig:
    """The trainable head of a study (server and sites build it identically)."""
    return HeadConfig(n_clinical=n_features, dim=profile.encoder.hidden_size, variant=variant)


def study_classifier(profile: Profile, head_variant: str, encoder_mode: str, n_features: int,
                     frozen_encoder: MRIEncoder | None) -> PSPClassifier:
    """A study's classifier before its trainable arrays are loaded (sites and ``psp-predict`` alike).

    The frozen ``ssl`` setting shares ``frozen_encoder``; ``transfer``/``scratch`` get their own encoder,
    whose weights come with each fold's trainable arrays.
    """
    config = head_config(profile, n_features, head_variant)
    if head_variant == "clinical-only":
        return build_classifier(config, None)
    if encoder_mode == "ssl":
        return build_classifier(config, frozen_encoder, encoder_mode="ssl",
                                encoder_weights=frozen_encoder.state_dict())
    encoder = MRIEncoder(profile.encoder)
    weights = encoder.state_dict() if encoder_mode == "transfer" else None
    return build_classifier(config, encoder, encoder_mode=encoder_mode, encoder_weights=weights)


def initial_finetune_state(study: StudyConfig, manifest: FeatureManifest, fold: int,
                           encoder_arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Seeded initial trainable arrays of fold ``fold`` (built on the server).

    With the frozen SSL encoder (``encoder-mode=ssl``) only ``head.*``; with ``transfer`` also the
    SSL ``encoder.*`` arrays (``encoder_arrays``), with ``scratch`` a seeded random encoder.
    """
    profile = get_profile(study.profile)
    torch.manual_seed(round_seed(study.seed, "head-init", fold))
    config = head_config(profile, len(manifest.features), study.head_variant)
    encoder = None if study.head_variant == "clinical-only" else MRIEncoder(profile.encoder)
    weights = None
    if encoder is not None and study.encoder_mode != "scratch":
        if encoder_arrays is None:
            raise ValueError(f"encoder-mode {study.encoder_mode!r} starts from the SSL encoder: pass its arrays")
        weights = {k.removeprefix("encoder."): torch.as_tensor(v) for k, v in encoder_arrays.items()}
    mode = study.encoder_mode if encoder is not None else "ssl"
    model = build_classifier(config, encoder, encoder_mode=mode, encoder_weights=weights)
    return {k: v.numpy().copy() for k, v in trainable_state(model).items()}


def initial_ssl_state(study: StudyConfig) -> dict[str, np.ndarray]:
    """Seeded initial encoder + decoder arrays (built on the server)."""
    torch.manual_seed(round_seed(study.seed, "ssl-init"))
    model = SSLAutoencoder(get_profile(study.profile).encoder)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def landmarks_to_arrays(landmarks: NyulLandmarks) -> dict[str, np.ndarray]:
    return {NYUL_PREFIX + k: v for k, v in landmarks.to_arrays().items()}


def landmarks_from_arrays(arrays: dict[str, np.ndarray]) -> NyulLandmarks:
    return NyulLandmarks.from_arrays({k[len(NYUL_PREFIX):]: v for k, v in arrays.items() if k.startswith(NYUL_PREFIX)})


@dataclass
class LocalSite:
    """One site's view of a study: its config, the study settings, its preprocessed data."""

    site: SiteConfig
    study: StudyConfig
    progress: bool = False
    installed: dict[str, Installed] = field(default_factory=dict, repr=False, compare=False)
    """Installed study models loaded in this process, by encoder hash (with their classifier inputs)."""

    @cached_property
    def profile(self) -> Profile:
        return get_profile(self.study.profile)

    @property
    def labelled(self) -> bool:
        return bool({"train", "test"} & set(self.site.roles))

    def prepare(self) -> SiteRun:
        """Preprocess what is not cached yet (a no-op when everything is)."""
        return preprocess_site(self.site, PreprocessSettings(profile=self.study.profile), progress=self.progress)

    @cached_property
    def data(self) -> SiteData:
        """The preprocessed cases (``prepare`` runs in the ``stats`` phase, before any other)."""
        return load_site_data(self.site, labelled=self.labelled)

    def require_count(self, n: int, what: str) -> None:
        """Refuse any aggregate of fewer cases than the site's policy allows."""
        minimum = self.site.privacy.min_aggregate_count
        if n < minimum:
            raise PrivacyRefusal(f"site {self.site.name} refuses to send {what}: it would come from {n} case(s), "
                                 f"fewer than its privacy.min_aggregate_count = {minimum}")

    def release_update(self, trained: dict[str, np.ndarray], received: dict[str, np.ndarray],
                       metrics: dict[str, float]) -> dict[str, np.ndarray]:
        """Apply the site's differential-privacy policy to a model update about to leave.

        Clips and noises the update, counts it in the site's ledger for this study and reports the
        epsilon spent so far (``dp-epsilon``: a function of the policy and the count only).
        """
        dp = self.site.privacy.dp
        if dp is None:
            return trained
        released, _ = privatize_update(trained, received, dp)
        ledger_path = Path(self.site.work_dir) / "privacy" / "dp_ledger.json"
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        # Locked: a site may train several folds at once (one process each), and no release may go uncounted.
        with open(ledger_path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
            study_key = f"{self.study.run_dir}#seed={self.study.seed}"
            ledger[study_key] = ledger.get(study_key, 0) + 1
            atomic_write_text(ledger_path, json.dumps(ledger, indent=2))
        metrics["dp-epsilon"] = epsilon_spent(dp, ledger[study_key])
        return released

    def install_dir(self, encoder_hash: str) -> Path:
        return Path(self.site.work_dir) / "models" / encoder_hash

    def optimizer_dir(self, encoder_hash: str, fold: int, features: list[str] | None) -> Path:
        """Where the site keeps its fine-tuning optimiser state for one fold of this study (never sent).

        Keyed by what decides the training (not the run directory), so a study resumed from a moved
        run directory finds its state; two studies with equal keys compute the same states anyway.
        """
        key = json.dumps([self.study.training_settings(), encoder_hash, fold, features], sort_keys=True)
        return Path(self.site.work_dir) / "optimizer" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def folds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This site's own stratified folds (train index, validation index), seeded by the study."""
        labels = self.data.labels
        counts = np.bincount(labels, minlength=2)
        if counts.min() < self.study.folds:
            raise PrivacyRefusal(f"site {self.site.name} has {counts[1]} TP and {counts[0]} PsP cases: too few "
                                 f"for {self.study.folds} stratified folds")
        splitter = StratifiedKFold(self.study.folds, shuffle=True, random_state=round_seed(self.study.seed, "folds"))
        return list(splitter.split(np.zeros(len(labels)), labels))


def site_statistics(local: LocalSite) -> Reply:
    """Phase ``stats``: Nyul landmarks, clinical sums and class counts.

    A test site sends its counts only (for the cohort table): nothing it holds may shape training.
    """
    run = local.prepare()
    reply = Reply(configs={"site-name": local.site.name, "site-roles": list(local.site.roles)})
    reply.metrics.update({"n-cases-ok": float(run.n_ok), "n-cases-error": float(len(run.results) - run.n_ok)})
    data = local.data
    local.require_count(len(data), "statistics")
    reply.metrics["num-examples"] = float(len(data))
    reply.configs["data-hash"] = hashlib.sha256("\n".join(sorted(data.input_keys)).encode()).hexdigest()
    if data.records is not None:
        labels = data.labels
        reply.metrics.update({"n-tp": float(labels.sum()), "n-psp": float(len(labels) - labels.sum())})
        reply.metrics.update(cohort_aggregates(data.records, data.dose))
    if "test" in local.site.roles:
        return reply
    reply.arrays.update(landmarks_to_arrays(data.local_landmarks()))
    if data.records is not None:
        stats = fit_clinical_stats(data.records, data.dose)
        reply.arrays.update({f"clinical.{k}": v for k, v in stats.to_arrays().items()})
    return reply


def cohort_aggregates(records: list[ClinicalRecord], dose: list[dict[str, float]]) -> dict[str, float]:
    """The cohort table's numbers for one site (the paper's Table 1): means, SDs and category counts."""
    continuous = {name: [getattr(r, name) for r in records] for name in schema.CONTINUOUS}
    continuous.update({f"dose_{name}": [case[name] for case in dose] for name in DOSE_FEATURES})
    aggregates: dict[str, float] = {}
    for name, values in continuous.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            aggregates[f"cohort.{name}.mean"] = float(values.mean())
            aggregates[f"cohort.{name}.sd"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    for name, levels in schema.CATEGORICAL.items():
        for level in levels:
            aggregates[f"cohort.{name}.{level}"] = float(sum(getattr(r, name) == level for r in records))
    return aggregates


def ssl_update(local: LocalSite, arrays: dict[str, np.ndarray], landmarks: NyulLandmarks, *, round_: int) -> Reply:
    """Phase ``ssl``: local epochs of context restoration + contrastive learning from the global weights."""
    data = local.data
    local.require_count(len(data), "an SSL update")
    model = SSLAutoencoder(local.profile.encoder)
    check_incoming_arrays(arrays, expected_from_state(model.state_dict()), what="the SSL model (encoder + decoder)")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    volumes = [torch.as_tensor(v) for v in data.standardized(landmarks)]
    config = SSLConfig(lr=local.study.ssl_lr, batch_size=min(local.study.batch_size, len(volumes)),
                       epochs=local.study.ssl_local_epochs, temperature=local.study.ssl_temperature,
                       device=local.study.device, precision=local.study.precision,
                       seed=round_seed(local.study.seed, "ssl", round_, local.site.name))
    history = train_ssl(model, volumes, config, progress=local.progress)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    metrics = {"num-examples": float(len(volumes)), "train-loss": float(history[-1])}
    return Reply(arrays=local.release_update(state, arrays, metrics), metrics=metrics)


def install_study_model(local: LocalSite, encoder_arrays: dict[str, np.ndarray], landmarks: NyulLandmarks,
                        manifest: FeatureManifest) -> Reply:
    """Keep the frozen encoder, landmarks and feature manifest at the site (sent once, not per round)."""
    encoder = MRIEncoder(local.profile.encoder)
    check_incoming_arrays(encoder_arrays, expected_from_state(encoder.state_dict(), prefix="encoder."),
                          what="the frozen encoder")
    encoder.load_state_dict({k.removeprefix("encoder."): torch.as_tensor(v) for k, v in encoder_arrays.items()})
    fingerprint = encoder_fingerprint(encoder)
    folder = local.install_dir(fingerprint)
    atomic_write(folder / "encoder.pt", lambda tmp: torch.save(encoder.state_dict(), tmp))
    atomic_save_npz(folder / "landmarks.npz", landmarks.to_arrays())
    atomic_write_text(folder / "manifest.json", manifest.to_json())
    return Reply(metrics={"num-examples": float(len(local.data))}, configs={"encoder-hash": fingerprint})


@dataclass
class Installed:
    """A study model installed at a site: frozen encoder, landmarks, manifest, and its image inputs."""

    encoder: MRIEncoder
    landmarks: NyulLandmarks
    manifest: FeatureManifest
    images: torch.Tensor | None = None
    images_ready: bool = False


def load_installed(local: LocalSite, encoder_hash: str) -> Installed:
    """The installed encoder, landmarks and manifest (loaded once per process and verified)."""
    if encoder_hash not in local.installed:
        local.installed[encoder_hash] = _read_installed(local, encoder_hash)
    return local.installed[encoder_hash]


def _read_installed(local: LocalSite, encoder_hash: str) -> Installed:
    folder = local.install_dir(encoder_hash)
    if not (folder / "encoder.pt").is_file():
        raise FileNotFoundError(f"site {local.site.name} has no installed encoder {encoder_hash[:12]}...: the server "
                                "must send it (phase 'install') before fine-tuning or evaluation")
    encoder = MRIEncoder(local.profile.encoder)
    encoder.load_state_dict(torch.load(folder / "encoder.pt", weights_only=True))
    if encoder_fingerprint(encoder) != encoder_hash:
        raise RuntimeError(f"installed encoder in {folder} does not match its fingerprint: delete the folder and rerun")
    with np.load(folder / "landmarks.npz") as npz:
        landmarks = NyulLandmarks.from_arrays({k: npz[k] for k in npz.files})
    return Installed(encoder, landmarks, FeatureManifest.from_json((folder / "manifest.json").read_text()))


def classifier_inputs(local: LocalSite, installed: Installed, features: list[str] | None = None
                       ) -> tuple[torch.Tensor | None, np.ndarray, FeatureManifest]:
    """The image input, the encoded clinical matrix and the manifest that encoded it.

    ``features`` keeps only those raw clinical/dose features (feature selection); the image input
    (cached frozen-encoder tokens, volumes when the encoder trains, None for clinical-only) is
    computed once per installed model and process.
    """
    manifest = installed.manifest if features is None else subset_manifest(installed.manifest, features)
    if not installed.images_ready:
        installed.images, installed.images_ready = _image_inputs(local, installed), True
    return installed.images, encode(local.data.records, local.data.dose, manifest), manifest


def _image_inputs(local: LocalSite, installed: Installed) -> torch.Tensor | None:
    data = local.data
    if local.study.head_variant == "clinical-only":
        return None
    if local.study.encoder_mode != "ssl":
        return torch.as_tensor(data.standardized(installed.landmarks))
    landmarks_digest = hashlib.sha256(json.dumps(
        {k: np.asarray(v).tolist() for k, v in installed.landmarks.to_arrays().items()}, sort_keys=True).encode())
    keys = [hashlib.sha256(f"{key}/{landmarks_digest.hexdigest()}".encode()).hexdigest() for key in data.input_keys]
    return encode_cached(installed.encoder, _StandardizedVolumes(data, installed.landmarks), keys,
                         cache_dir=Path(local.site.work_dir) / "token_cache", device=local.study.device)


class _StandardizedVolumes(Sequence):
    """Model inputs standardised on access: the token cache only reads the volumes it must encode."""

    def __init__(self, data: SiteData, landmarks: NyulLandmarks) -> None:
        self.data, self.landmarks = data, landmarks

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.as_tensor(self.data.standardized_case(index, self.landmarks))


def fold_classifier(local: LocalSite, installed: Installed, manifest: FeatureManifest,
                    trainable: dict[str, np.ndarray], *, what: str) -> PSPClassifier:
    """The study's classifier holding the global ``trainable`` arrays (head, and encoder unless frozen)."""
    model = study_classifier(local.profile, local.study.head_variant, local.study.encoder_mode,
                             len(manifest.features), installed.encoder)
    check_incoming_arrays(trainable, expected_from_state(trainable_state(model)), what=what)
    load_trainable_state(model, {k: torch.as_tensor(v) for k, v in trainable.items()})
    return model


def finetune_update(local: LocalSite, head_arrays: dict[str, np.ndarray], *, fold: int, round_: int,
                    encoder_hash: str, proximal_mu: float = 0.0, features: list[str] | None = None) -> Reply:
    """Phase ``finetune``: local epochs on this site's training part of fold ``fold``.

    ``head_arrays`` are the global trainable arrays: the head, plus the encoder unless it is frozen.
    ``features`` restricts the clinical/dose inputs (feature selection); None keeps all.
    """
    installed = load_installed(local, encoder_hash)
    tokens, clinical, manifest = classifier_inputs(local, installed, features)
    train_index, val_index = local.folds()[fold]
    local.require_count(len(train_index), "a fine-tuning update")
    labels = local.data.labels
    model = fold_classifier(local, installed, manifest, head_arrays, what=f"the fold-{fold} model")

    def subset(index: np.ndarray) -> ClassifierData:
        return ClassifierData(None if tokens is None else tokens[index], clinical[index], labels[index])

    config = FinetuneConfig(lr=local.study.finetune_lr, epochs=local.study.finetune_local_epochs,
                            batch_size=local.study.batch_size, patience=None, device=local.study.device,
                            precision=local.study.precision,
                            seed=round_seed(local.study.seed, "finetune", fold, round_, local.site.name))
    state_dir = local.optimizer_dir(encoder_hash, fold, features) if local.study.keep_site_optimizer else None
    result = train_classifier(model, subset(train_index), None, config, progress=local.progress,
                              proximal_mu=proximal_mu, optimizer_state=_previous_optimizer_state(state_dir, round_))
    if state_dir is not None:
        _keep_optimizer_state(state_dir, round_, result.optimizer_state)
    val = subset(val_index)
    probs = np.clip(predict_proba(model, val, device=local.study.device), 1e-7, 1 - 1e-7)
    val_loss = float(-np.mean(labels[val_index] * np.log(probs) + (1 - labels[val_index]) * np.log(1 - probs)))
    metrics = {"num-examples": float(result.num_examples), "train-loss": float(result.metrics["train_loss"]),
               "val-loss": val_loss, "val-n": float(len(val_index))}
    trained = {k: v.detach().cpu().numpy() for k, v in result.state.items()}
    return Reply(arrays=local.release_update(trained, head_arrays, metrics), metrics=metrics)


def _saved_rounds(folder: Path) -> dict[int, Path]:
    return {int(path.stem.removeprefix("round-")): path for path in folder.glob("round-*.pt")}


def _previous_optimizer_state(folder: Path | None, round_: int) -> dict | None:
    """The state saved after the site's latest earlier round: a repeated (resumed) round reads the same one."""
    earlier = {r: path for r, path in _saved_rounds(folder).items() if r < round_} if folder is not None else {}
    return load_checkpoint(earlier[max(earlier)])["optimizer"] if earlier else None


def _keep_optimizer_state(folder: Path, round_: int, state: dict | None) -> None:
    """Save this round's state; keep only it and the one before (which a resumed repeat of this round needs)."""
    save_checkpoint({"optimizer": state}, folder / f"round-{round_}.pt")
    for r, path in _saved_rounds(folder).items():
        if r not in (round_, round_ - 1):
            path.unlink(missing_ok=True)


def evaluate_site(local: LocalSite, fold_heads: list[dict[str, np.ndarray]], *, encoder_hash: str,
                  features: list[str] | None = None) -> Reply:
    """Phase ``evaluate``: per-class score histograms.

    Test sites: the soft-voting ensemble of all folds and each fold's model on every case.
    Training sites: fold k's model on their own validation part of fold k (cross-validation).
    """
    installed = load_installed(local, encoder_hash)
    tokens, clinical, manifest = classifier_inputs(local, installed, features)
    labels = local.data.labels
    reply = Reply(configs={"site-name": local.site.name})
    if "test" in local.site.roles:
        local.require_count(len(labels), "evaluation aggregates")
        data = ClassifierData(tokens, clinical, labels)
        per_fold = np.stack([
            predict_proba(fold_classifier(local, installed, manifest, h, what=f"the fold-{k} model"), data,
                          device=local.study.device) for k, h in enumerate(fold_heads)])
        ensemble = per_fold.mean(axis=0)
        reply.arrays["hist.ensemble"] = score_histograms(ensemble, labels)
        reply.metrics["brier-sum.ensemble"] = float(np.sum((ensemble - labels) ** 2))
        for k, probs in enumerate(per_fold):
            reply.arrays[f"hist.fold-{k}"] = score_histograms(probs, labels)
            reply.metrics[f"brier-sum.fold-{k}"] = float(np.sum((probs - labels) ** 2))
    else:
        withheld = 0
        for k, ((_, val_index), head) in enumerate(zip(local.folds(), fold_heads)):
            if len(val_index) < local.site.privacy.min_aggregate_count:
                withheld += 1  # this fold's aggregate would come from too few cases; the other folds still go
                continue
            data = ClassifierData(None if tokens is None else tokens[val_index], clinical[val_index],
                                  labels[val_index])
            probs = predict_proba(fold_classifier(local, installed, manifest, head, what=f"the fold-{k} model"), data,
                                  device=local.study.device)
            reply.arrays[f"hist.fold-{k}"] = score_histograms(probs, labels[val_index])
            reply.metrics[f"brier-sum.fold-{k}"] = float(np.sum((probs - labels[val_index]) ** 2))
        reply.metrics["folds-withheld"] = float(withheld)
        if withheld == len(fold_heads):
            raise PrivacyRefusal(f"site {local.site.name} refuses to send validation aggregates: every fold has fewer "
                                 f"than its privacy.min_aggregate_count = {local.site.privacy.min_aggregate_count} "
                                 "cases")
    reply.metrics.update({"num-examples": float(len(labels)), "n-tp": float(labels.sum()),
                          "n-psp": float(len(labels) - labels.sum())})
    return reply


def shap_update(local: LocalSite, fold_heads: list[dict[str, np.ndarray]], *, encoder_hash: str) -> Reply:
    """Phase ``shap``: mean |SHAP| per clinical/dose feature over this site's validation folds.

    Fold k's model explains the site's validation part of fold k against its training part (the
    background rows never leave); only the mean over cases and the case count are sent.
    """
    installed = load_installed(local, encoder_hash)
    tokens, clinical, manifest = classifier_inputs(local, installed)
    labels = local.data.labels

    def subset(index: np.ndarray) -> ClassifierData:
        return ClassifierData(None if tokens is None else tokens[index], clinical[index], labels[index])

    parts = []
    for k, ((train_index, val_index), head) in enumerate(zip(local.folds(), fold_heads)):
        model = fold_classifier(local, installed, manifest, head, what=f"the fold-{k} model")
        parts.append(clinical_shap(model, subset(val_index), subset(train_index), manifest, device=local.study.device,
                                   seed=round_seed(local.study.seed, "shap", k, local.site.name),
                                   max_evals=SHAP_MAX_EVALS))
    values = np.concatenate(parts)
    local.require_count(len(values), "SHAP aggregates")
    return Reply(arrays={"shap.mean_abs": mean_abs_shap(values)},
                 metrics={"num-examples": float(len(values))}, configs={"site-name": local.site.name})
