"""The local fine-tuning loop: frozen encoder, early stopping, resume, class weighting, modality ablation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psp_model.errors import ConfigError
from psp_model.nets.encoder import EncoderConfig, MRIEncoder
from psp_model.nets.fusion import HeadConfig, PSPClassifier, build_classifier, build_head, trainable_state
from psp_model.train.finetune import ClassifierData, FinetuneConfig, predict_proba, train_classifier

CPU = {"device": "cpu", "precision": "fp32"}


def _tokens_problem(n: int, seed: int, *, n_tokens: int = 8, dim: int = 16):
    """Label = 1[clinical feature + image-token feature + noise > 0]; each alone carries half the signal."""
    rng = np.random.default_rng(seed)
    c, z = rng.normal(size=n), rng.normal(size=n)
    labels = (c + z + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    clinical = np.column_stack([c, rng.normal(size=(n, 2))]).astype(np.float32)
    tokens = rng.normal(size=(n, n_tokens, dim)).astype(np.float32)
    tokens[:, :, 0] += 1.5 * z[:, None]
    return ClassifierData(tokens, clinical, labels)


def _frozen_token_model(variant: str, seed: int = 0, dim: int = 16) -> PSPClassifier:
    """A classifier trained on cached tokens: a stand-in frozen encoder is never called."""
    torch.manual_seed(seed)
    head = build_head(HeadConfig(n_clinical=3, dim=dim, num_heads=2, dropout=0.0, fc_hidden=32, variant=variant))
    encoder = torch.nn.Linear(1, dim)  # never run: inputs are tokens
    encoder.hidden_size = dim
    return PSPClassifier(head, None if variant == "clinical-only" else encoder, encoder_mode="ssl")


def _small_volumes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2), dtype=np.float32)
    volumes = rng.normal(size=(n, 2, 32, 32, 32)).astype(np.float32)
    volumes[labels == 1] += 0.5
    return ClassifierData(volumes, rng.normal(size=(n, 2)).astype(np.float32), labels)


@pytest.mark.parametrize(("mode", "changes"), [("ssl", False), ("transfer", True), ("scratch", True)])
def test_encoder_frozen_only_in_ssl_mode(mode, changes):
    torch.manual_seed(0)
    encoder = MRIEncoder(EncoderConfig.tiny())
    weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = build_classifier(HeadConfig(n_clinical=2, dim=encoder.hidden_size), encoder, encoder_mode=mode,
                             encoder_weights=None if mode == "scratch" else weights)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    result = train_classifier(model, _small_volumes(4, 0), None,
                              FinetuneConfig(epochs=1, batch_size=2, lr=1e-2, **CPU), progress=False)
    same = [torch.equal(model.encoder.state_dict()[k], weights[k]) for k in weights]
    assert (not all(same)) if changes else all(same)
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())
    assert all(k.startswith("head.") for k in result.state) != changes
    assert result.num_examples == 4 and result.metrics["num-examples"] == 4


def test_multimodal_beats_single_modalities_on_synthetic_tokens():
    train, val = _tokens_problem(400, 0), _tokens_problem(300, 1)
    config = FinetuneConfig(epochs=30, batch_size=32, lr=3e-3, weight_decay=0.0, patience=10, **CPU)
    auc = {}
    for variant in ("multimodal", "clinical-only", "mri-only"):
        result = train_classifier(_frozen_token_model(variant), train, val, config, progress=False)
        auc[variant] = result.metrics["val_auc"]
    assert auc["multimodal"] > max(auc["clinical-only"], auc["mri-only"]) + 0.05, auc
    assert auc["clinical-only"] > 0.65 and auc["mri-only"] > 0.65, auc


def test_early_stopping_restores_the_best_epoch():
    train = _tokens_problem(64, 2)
    val = ClassifierData(train.images, train.clinical, 1 - train.labels)  # learning the task hurts validation
    model = _frozen_token_model("multimodal")
    config = FinetuneConfig(epochs=40, batch_size=16, lr=1e-2, patience=3, **CPU)
    result = train_classifier(model, train, val, config, progress=False)
    aucs = [row["val_auc"] for row in result.history]
    assert result.metrics["stopped_early"] == 1.0 and len(result.history) < 40
    assert result.best_epoch == int(np.argmax(aucs)) and result.best_epoch < len(aucs) - 1
    assert aucs[-1] < result.metrics["val_auc"]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(val.labels.numpy(), predict_proba(model, val, device="cpu")) == pytest.approx(max(aucs))


def test_resume_equals_uninterrupted_run(tmp_path):
    train, val = _tokens_problem(48, 3), _tokens_problem(32, 4)
    head_cfg = HeadConfig(n_clinical=3, dim=16, num_heads=2, dropout=0.2)

    def fresh():
        torch.manual_seed(7)
        encoder = torch.nn.Linear(1, 16)
        encoder.hidden_size = 16
        return PSPClassifier(build_head(head_cfg), encoder)

    config = FinetuneConfig(epochs=6, batch_size=8, grad_accumulation=2, lr=5e-3, patience=None, **CPU)
    full = train_classifier(fresh(), train, val, config, progress=False)

    path = tmp_path / "ckpt.pt"
    train_classifier(fresh(), train, val, FinetuneConfig(**{**config.__dict__, "epochs": 3}),
                     checkpoint_path=path, progress=False)
    resumed = train_classifier(fresh(), train, val, config, checkpoint_path=path, resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == list(range(6))
    assert resumed.history == full.history
    assert all(torch.equal(resumed.state[k], full.state[k]) for k in full.state)

    with pytest.raises(ConfigError, match=r"cannot resume .*ckpt.pt with other settings \(lr: checkpoint 0.005, now"):
        train_classifier(fresh(), train, val, FinetuneConfig(**{**config.__dict__, "lr": 1e-3}),
                         checkpoint_path=path, resume=True, progress=False)


def test_gradient_accumulation_matches_a_larger_batch():
    train = _tokens_problem(32, 5)
    results = []
    for batch, accumulation in ((8, 2), (16, 1)):
        model = _frozen_token_model("multimodal", seed=3)
        config = FinetuneConfig(epochs=2, batch_size=batch, grad_accumulation=accumulation, lr=1e-3, **CPU)
        results.append(train_classifier(model, train, None, config, progress=False).state)
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-6)


def test_class_weighting_balances_an_uninformative_model():
    rng = np.random.default_rng(6)
    labels = np.array([1.0] * 10 + [0.0] * 90, dtype=np.float32)
    data = ClassifierData(None, rng.normal(size=(100, 3)).astype(np.float32) * 0.01, labels)
    means = {}
    for weighting in (True, False):
        model = _frozen_token_model("clinical-only")
        config = FinetuneConfig(epochs=60, batch_size=50, lr=1e-2, weight_decay=0.0, class_weighting=weighting, **CPU)
        result = train_classifier(model, data, None, config, progress=False)
        means[weighting] = predict_proba(model, data, device="cpu").mean()
        assert result.metrics["pos_weight"] == (9.0 if weighting else 1.0)
    assert means[True] == pytest.approx(0.5, abs=0.1) and means[False] == pytest.approx(0.1, abs=0.05), means


def test_single_class_sets_do_not_crash():
    data = _tokens_problem(24, 8)
    one_class = ClassifierData(data.images, data.clinical, np.ones(24, dtype=np.float32))
    config = FinetuneConfig(epochs=3, batch_size=8, patience=1, **CPU)
    with pytest.warns(UserWarning, match=r"one class only \(24 TP, 0 PsP\); class weighting skipped"):
        result = train_classifier(_frozen_token_model("multimodal"), one_class, one_class, config, progress=False)
    assert result.metrics["val_auc_defined"] == 0.0 and "val_auc" not in result.metrics
    assert result.metrics["class_weighted"] == 0.0
    assert all(math.isnan(r["val_auc"]) and math.isfinite(r["val_loss"]) for r in result.history)


def test_federated_local_epochs_return_state_metrics_and_count():
    data = _tokens_problem(20, 9)
    model = _frozen_token_model("multimodal")
    result = train_classifier(model, data, None, FinetuneConfig(epochs=2, batch_size=8, patience=None, **CPU),
                              progress=False)
    assert len(result.history) == 2 and result.best_epoch == 1
    assert set(result.state) == set(trainable_state(model)) and all(k.startswith("head.") for k in result.state)
    assert result.num_examples == 20
    probs = predict_proba(model, data, device="cpu")
    assert probs.shape == (20,) and ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"lr must be a finite number > 0; got 0.0"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"epochs": 0}, r"epochs must be >= 1"),
        ({"grad_accumulation": 0}, r"grad_accumulation must be >= 1"),
        ({"patience": 0}, r"patience must be >= 1 or None"),
        ({"precision": "fp8"}, r"precision must be auto, fp32, bf16 or fp16"),
    ],
)
def test_finetune_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_classifier_data_rejects_bad_arrays():
    clinical = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels must be a \(n,\) array of 0/1"):
        ClassifierData(None, clinical, np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"clinical must have shape \(4, F\) to match 4 labels; got \(3, 2\)"):
        ClassifierData(None, clinical[:3], np.zeros(4))
    with pytest.raises(ValueError, match="clinical holds NaN or inf"):
        ClassifierData(None, np.full((4, 2), np.nan), np.zeros(4))
    with pytest.raises(ValueError, match="images hold 3 examples but there are 4 labels"):
        ClassifierData(np.zeros((3, 5, 8)), clinical, np.zeros(4))


def test_train_classifier_rejects_empty_data_and_frozen_models():
    empty = ClassifierData(None, np.zeros((0, 3), dtype=np.float32), np.zeros(0))
    with pytest.raises(ValueError, match="train_data is empty"):
        train_classifier(_frozen_token_model("clinical-only"), empty, None, FinetuneConfig(**CPU), progress=False)
    model = _frozen_token_model("clinical-only").requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        train_classifier(model, _tokens_problem(4, 0), None, FinetuneConfig(**CPU), progress=False)


def test_bf16_autocast_trains_and_predicts():
    data = _tokens_problem(16, 10)
    model = _frozen_token_model("multimodal")
    result = train_classifier(model, data, data, FinetuneConfig(epochs=1, batch_size=8, device="cpu", precision="bf16"),
                              progress=False)
    assert math.isfinite(result.metrics["train_loss"]) and math.isfinite(result.metrics["val_loss"])
    assert all(v.dtype == torch.float32 for v in result.state.values() if v.is_floating_point())


def _distance_moved(proximal_mu: float) -> float:
    data = _tokens_problem(24, 5)
    model = _frozen_token_model("multimodal")
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    train_classifier(model, data, None, FinetuneConfig(lr=1e-2, weight_decay=0.0, epochs=5, batch_size=8,
                                                       patience=None, **CPU), progress=False, proximal_mu=proximal_mu)
    return float(sum(((v - start[k]) ** 2).sum() for k, v in trainable_state(model).items()) ** 0.5)


def test_fedprox_term_keeps_local_weights_near_the_global_model():
    assert _distance_moved(100.0) < 0.5 * _distance_moved(0.0)
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        _distance_moved(-1.0)


def test_optimizer_state_carries_adamw_moments_into_the_next_call():
    data = _tokens_problem(24, seed=3)
    config = FinetuneConfig(epochs=2, batch_size=8, patience=None, seed=1, **CPU)
    first = train_classifier(_frozen_token_model("multimodal"), data, None, config, progress=False)
    steps = lambda result: {int(s["step"]) for s in result.optimizer_state["state"].values()}  # noqa: E731
    assert steps(first) == {2 * 3}
    cold = train_classifier(_frozen_token_model("multimodal"), data, None, config, progress=False)
    warm = train_classifier(_frozen_token_model("multimodal"), data, None, config, progress=False,
                            optimizer_state=first.optimizer_state)
    assert steps(warm) == {4 * 3}
    assert any(not torch.equal(warm.state[k], cold.state[k]) for k in cold.state)
