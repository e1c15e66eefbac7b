"""What a site does in each phase of a study, in plain Python; the ClientApp only packs messages.

Every function takes the global arrays the server sent and returns a :class:`Reply` holding only
what the allow-list in :mod:`psp_model.wire` permits: model arrays, aggregates over at least
``privacy.min_aggregate_count`` cases, and counts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from psp_model.evaluate.metrics import score_histograms
from psp_model.io import atomic_save_npz, atomic_write, atomic_write_text
from psp_model.nets.encoder import MRIEncoder, SSLAutoencoder, encoder_fingerprint
from psp_model.nets.fusion import HeadConfig, build_classifier, load_trainable_state
from psp_model.preprocess.clinical import FeatureManifest, encode, fit_clinical_stats
from psp_model.preprocess.nyul import NyulLandmarks
from psp_model.preprocess.pipeline import PreprocessSettings, SiteRun, preprocess_site
from psp_model.profiles import Profile, get_profile
from psp_model.site_data import SiteData, load_site_data
from psp_model.sites import SiteConfig
from psp_model.study import StudyConfig
from psp_model.train.finetune import ClassifierData, FinetuneConfig, predict_proba, train_classifier
from psp_model.train.ssl import SSLConfig, train_ssl
from psp_model.train.token_cache import encode_cached

NYUL_PREFIX = "nyul."


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


def initial_head_state(study: StudyConfig, manifest: FeatureManifest, fold: int) -> dict[str, np.ndarray]:
    """Seeded initial ``head.*`` arrays of fold ``fold`` (built on the server)."""
    profile = get_profile(study.profile)
    torch.manual_seed(round_seed(study.seed, "head-init", fold))
    config = head_config(profile, len(manifest.features), study.head_variant)
    encoder = None if study.head_variant == "clinical-only" else MRIEncoder(profile.encoder)
    model = build_classifier(config, encoder, encoder_mode="scratch")
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k.startswith("head.")}


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

    def install_dir(self, encoder_hash: str) -> Path:
        return Path(self.site.work_dir) / "models" / encoder_hash

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
    if data.records is not None:
        labels = data.labels
        reply.metrics.update({"n-tp": float(labels.sum()), "n-psp": float(len(labels) - labels.sum())})
    if "test" in local.site.roles:
        return reply
    reply.arrays.update(landmarks_to_arrays(data.local_landmarks()))
    if data.records is not None:
        stats = fit_clinical_stats(data.records, data.dose)
        reply.arrays.update({f"clinical.{k}": v for k, v in stats.to_arrays().items()})
    return reply


def ssl_update(local: LocalSite, arrays: dict[str, np.ndarray], landmarks: NyulLandmarks, *, round_: int) -> Reply:
    """Phase ``ssl``: local epochs of context restoration + contrastive learning from the global weights."""
    data = local.data
    local.require_count(len(data), "an SSL update")
    model = SSLAutoencoder(local.profile.encoder)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
    volumes = [torch.as_tensor(v) for v in data.standardized(landmarks)]
    config = SSLConfig(lr=local.study.ssl_lr, batch_size=min(local.study.batch_size, len(volumes)),
                       epochs=local.study.ssl_local_epochs, temperature=local.study.ssl_temperature,
                       device=local.study.device, precision=local.study.precision,
                       seed=round_seed(local.study.seed, "ssl", round_, local.site.name))
    history = train_ssl(model, volumes, config, progress=local.progress)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return Reply(arrays=state, metrics={"num-examples": float(len(volumes)), "train-loss": float(history[-1])})


def install_study_model(local: LocalSite, encoder_arrays: dict[str, np.ndarray], landmarks: NyulLandmarks,
                        manifest: FeatureManifest) -> Reply:
    """Keep the frozen encoder, landmarks and feature manifest at the site (sent once, not per round)."""
    encoder = MRIEncoder(local.profile.encoder)
    encoder.load_state_dict({k.removeprefix("encoder."): torch.as_tensor(v) for k, v in encoder_arrays.items()})
    fingerprint = encoder_fingerprint(encoder)
    folder = local.install_dir(fingerprint)
    atomic_write(folder / "encoder.pt", lambda tmp: torch.save(encoder.state_dict(), tmp))
    atomic_save_npz(folder / "landmarks.npz", landmarks.to_arrays())
    atomic_write_text(folder / "manifest.json", manifest.to_json())
    return Reply(metrics={"num-examples": float(len(local.data))}, configs={"encoder-hash": fingerprint})


@dataclass
class _Installed:
    encoder: MRIEncoder
    landmarks: NyulLandmarks
    manifest: FeatureManifest


def _load_installed(local: LocalSite, encoder_hash: str) -> _Installed:
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
    return _Installed(encoder, landmarks, FeatureManifest.from_json((folder / "manifest.json").read_text()))


def _classifier_inputs(local: LocalSite, installed: _Installed) -> tuple[torch.Tensor | None, np.ndarray]:
    """Cached encoder tokens (or None for clinical-only) and the encoded clinical matrix."""
    data = local.data
    clinical = encode(data.records, data.dose, installed.manifest)
    if local.study.head_variant == "clinical-only":
        return None, clinical
    landmarks_digest = hashlib.sha256(json.dumps(
        {k: np.asarray(v).tolist() for k, v in installed.landmarks.to_arrays().items()}, sort_keys=True).encode())
    keys = [hashlib.sha256(f"{key}/{landmarks_digest.hexdigest()}".encode()).hexdigest() for key in data.input_keys]
    tokens = encode_cached(installed.encoder, _StandardizedVolumes(data, installed.landmarks), keys,
                           cache_dir=Path(local.site.work_dir) / "token_cache", device=local.study.device)
    return tokens, clinical


class _StandardizedVolumes(Sequence):
    """Model inputs standardised on access: the token cache only reads the volumes it must encode."""

    def __init__(self, data: SiteData, landmarks: NyulLandmarks) -> None:
        self.data, self.landmarks = data, landmarks

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.as_tensor(self.data.standardized_case(index, self.landmarks))


def _classifier(local: LocalSite, installed: _Installed, head_arrays: dict[str, np.ndarray]):
    config = head_config(local.profile, len(installed.manifest.features), local.study.head_variant)
    encoder = None if local.study.head_variant == "clinical-only" else installed.encoder
    weights = None if encoder is None else encoder.state_dict()
    model = build_classifier(config, encoder, encoder_mode="ssl", encoder_weights=weights)
    load_trainable_state(model, {k: torch.as_tensor(v) for k, v in head_arrays.items()})
    return model


def finetune_update(local: LocalSite, head_arrays: dict[str, np.ndarray], *, fold: int, round_: int,
                    encoder_hash: str, proximal_mu: float = 0.0) -> Reply:
    """Phase ``finetune``: local epochs of the head on this site's training part of fold ``fold``."""
    installed = _load_installed(local, encoder_hash)
    tokens, clinical = _classifier_inputs(local, installed)
    train_index, val_index = local.folds()[fold]
    local.require_count(len(train_index), "a fine-tuning update")
    labels = local.data.labels
    model = _classifier(local, installed, head_arrays)

    def subset(index: np.ndarray) -> ClassifierData:
        return ClassifierData(None if tokens is None else tokens[index], clinical[index], labels[index])

    config = FinetuneConfig(lr=local.study.finetune_lr, epochs=local.study.finetune_local_epochs,
                            batch_size=local.study.batch_size, patience=None, device=local.study.device,
                            precision=local.study.precision,
                            seed=round_seed(local.study.seed, "finetune", fold, round_, local.site.name))
    result = train_classifier(model, subset(train_index), None, config, progress=local.progress,
                              proximal_mu=proximal_mu)
    val = subset(val_index)
    probs = np.clip(predict_proba(model, val, device=local.study.device), 1e-7, 1 - 1e-7)
    val_loss = float(-np.mean(labels[val_index] * np.log(probs) + (1 - labels[val_index]) * np.log(1 - probs)))
    return Reply(
        arrays={k: v.detach().cpu().numpy() for k, v in result.state.items()},
        metrics={"num-examples": float(result.num_examples), "train-loss": float(result.metrics["train_loss"]),
                 "val-loss": val_loss, "val-n": float(len(val_index))},
    )


def evaluate_site(local: LocalSite, fold_heads: list[dict[str, np.ndarray]], *, encoder_hash: str) -> Reply:
    """Phase ``evaluate``: per-class score histograms.

    Test sites: the soft-voting ensemble of all folds and each fold's model on every case.
    Training sites: fold k's model on their own validation part of fold k (cross-validation).
    """
    installed = _load_installed(local, encoder_hash)
    tokens, clinical = _classifier_inputs(local, installed)
    labels = local.data.labels
    reply = Reply(configs={"site-name": local.site.name})
    if "test" in local.site.roles:
        local.require_count(len(labels), "evaluation aggregates")
        data = ClassifierData(tokens, clinical, labels)
        per_fold = np.stack([predict_proba(_classifier(local, installed, h), data, device=local.study.device)
                             for h in fold_heads])
        reply.arrays["hist.ensemble"] = score_histograms(per_fold.mean(axis=0), labels)
        for k, probs in enumerate(per_fold):
            reply.arrays[f"hist.fold-{k}"] = score_histograms(probs, labels)
    else:
        for k, ((_, val_index), head) in enumerate(zip(local.folds(), fold_heads)):
            local.require_count(len(val_index), f"validation aggregates of fold {k}")
            data = ClassifierData(None if tokens is None else tokens[val_index], clinical[val_index],
                                  labels[val_index])
            probs = predict_proba(_classifier(local, installed, head), data, device=local.study.device)
            reply.arrays[f"hist.fold-{k}"] = score_histograms(probs, labels[val_index])
    reply.metrics.update({"num-examples": float(len(labels)), "n-tp": float(labels.sum()),
                          "n-psp": float(len(labels) - labels.sum())})
    return reply
