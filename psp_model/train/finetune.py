"""Phase-2 local training of a classifier (one site): the loop the federation calls for E local epochs.

Works for any module ``model(images, clinical) -> (B,) logits``: ``PSPClassifier`` on volumes or on
cached tokens, and the CNN-LSTM baseline on slices. Positive class = true progression (TP).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from psp_model.errors import ConfigError
from psp_model.nets.fusion import load_trainable_state, trainable_state
from psp_model.train.checkpoint import load_checkpoint, save_checkpoint
from psp_model.train.device import Precision, autocast, pick_device, resolve_precision, seed_everything

__all__ = ["FinetuneConfig", "ClassifierData", "TrainResult", "train_classifier", "predict_proba"]

log = logging.getLogger(__name__)

# Settings that change the result; a checkpoint written under other values cannot be resumed.
_RESUME_KEYS = ("lr", "weight_decay", "batch_size", "grad_accumulation", "precision", "seed", "class_weighting")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of ``train_classifier``.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (0.1: strong, since a site has tens of training cases).
        epochs: maximum number of epochs (the federation passes its local epochs E). On ~80 cases at lr
            1e-4, batch 8, the multimodal head's pooled CV AUC was 0.78-0.79 after 15-30 epochs and 0.71
            after 100 (overfitting), hence 30.
        batch_size: examples per forward pass; 4, as the study's ``StudyConfig.batch_size``. At 8 a
            60-case site (48 training cases per fold) gets 180 optimiser steps in 30 epochs at lr 1e-4,
            too few for the multimodal head to read even an oracle image signal (the label model's
            pattern latent copied into every token: +0.01 pooled CV AUC over permuted tokens; at 4:
            +0.06; measured on the site of tests/test_variants.py).
        grad_accumulation: forward passes per optimiser step (effective batch = batch_size x this).
        patience: epochs without a better validation score before stopping; ``None`` never stops early.
        precision: ``auto`` (bf16 on CUDA when supported, else fp16; fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        device: ``auto`` or a torch device name.
        seed: seeds initial state, shuffling and dropout (per epoch, so resuming reproduces the run).
        class_weighting: ``pos_weight = n_negative / n_positive`` from the local training labels.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-1
    epochs: int = 30
    batch_size: int = 4
    grad_accumulation: int = 1
    patience: int | None = 10
    precision: Precision = "auto"
    device: str = "auto"
    seed: int = 0
    class_weighting: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"FinetuneConfig.lr must be a finite number > 0; got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"FinetuneConfig.weight_decay must be a finite number >= 0; got {self.weight_decay}")
        for name in ("epochs", "batch_size", "grad_accumulation"):
            if getattr(self, name) < 1:
                problems.append(f"FinetuneConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            problems.append(f"FinetuneConfig.patience must be >= 1 or None (no early stopping); got {self.patience}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"FinetuneConfig.precision must be auto, fp32, bf16 or fp16; got {self.precision!r}")
        if problems:
            raise ConfigError(problems)


@dataclass
class ClassifierData:
    """One site's examples.

    ``images``: volumes ``(n, C, D, H, W)``, cached tokens ``(n, N, d)``, slices ``(n, S, H, W)``, or
    ``None`` (clinical-only); ``clinical``: ``(n, F)`` float32; ``labels``: ``(n,)`` 0/1 (1 = TP).
    """

    images: torch.Tensor | np.ndarray | None
    clinical: torch.Tensor | np.ndarray
    labels: torch.Tensor | np.ndarray

    def __post_init__(self) -> None:
        self.clinical = torch.as_tensor(np.asarray(self.clinical, dtype=np.float32))
        self.labels = torch.as_tensor(np.asarray(self.labels, dtype=np.float32))
        if self.images is not None:
            self.images = torch.as_tensor(self.images, dtype=torch.float32)
        n = self.labels.shape[0]
        if self.labels.ndim != 1 or not torch.isin(self.labels, torch.tensor([0.0, 1.0])).all():
            raise ValueError(f"labels must be a (n,) array of 0/1 (1 = TP); got shape {tuple(self.labels.shape)} "
                             f"with values {torch.unique(self.labels)[:5].tolist()}")
        if self.clinical.ndim != 2 or self.clinical.shape[0] != n:
            raise ValueError(f"clinical must have shape ({n}, F) to match {n} labels; got {tuple(self.clinical.shape)}")
        if not torch.isfinite(self.clinical).all():
            raise ValueError("clinical holds NaN or inf; impute or encode missing values before training")
        if self.images is not None and self.images.shape[0] != n:
            raise ValueError(f"images hold {self.images.shape[0]} examples but there are {n} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(
        self, index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        images = None if self.images is None else self.images[index].to(device)
        return images, self.clinical[index].to(device), self.labels[index].to(device)


@dataclass
class TrainResult:
    """What a local training run hands back: the trainable state (best epoch when validated), metrics,
    the per-epoch history and the number of training examples (the FedAvg weight)."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    num_examples: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    optimizer_state: dict | None = field(default=None, repr=False)
    """AdamW's state after the last epoch: a federated site passes it back in its next round."""


def _auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC, or ``None`` when the labels hold one class (AUC is undefined there)."""
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, probs))


def _pos_weight(labels: torch.Tensor) -> tuple[float, bool]:
    positives = float(labels.sum())
    negatives = float(len(labels)) - positives
    if positives == 0 or negatives == 0:
        warnings.warn(
            f"training labels hold one class only ({int(positives)} TP, {int(negatives)} PsP); "
            "class weighting skipped (pos_weight = 1)",
            stacklevel=3,
        )
        return 1.0, False
    return negatives / positives, True


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def _logits(model: nn.Module, data: ClassifierData, batch_size: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    was_training = model.training
    model.to(device).eval()
    out = [torch.zeros(0)]
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            images, clinical, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
            with autocast(device, dtype):
                out.append(model(images, clinical).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def predict_proba(
    model: nn.Module, data: ClassifierData, *, batch_size: int = 16, device: str = "auto", precision: Precision = "auto"
) -> np.ndarray:
    """TP probabilities ``(n,)`` of ``model`` on ``data`` (eval mode, no gradients)."""
    target = pick_device(device)
    logits = _logits(model, data, batch_size, target, resolve_precision(target, precision))
    return torch.sigmoid(logits).numpy().astype(np.float64)


def _evaluate(model: nn.Module, data: ClassifierData, loss_fn: nn.Module, config: FinetuneConfig,
              device: torch.device, dtype: torch.dtype) -> tuple[float, float | None]:
    logits = _logits(model, data, config.batch_size, device, dtype)
    loss = float(loss_fn(logits, data.labels))
    return loss, _auc(data.labels.numpy(), torch.sigmoid(logits).numpy())


def _load_checkpoint(path: Path, config: FinetuneConfig) -> dict:
    payload = load_checkpoint(path)
    saved = payload["config"]
    now = asdict(config)
    changed = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in _RESUME_KEYS if saved[k] != now[k]]
    if changed:
        raise ConfigError([f"cannot resume {path} with other settings ({'; '.join(changed)}); "
                           "restore them or start without resume"])
    return payload


def _train_epoch(model: nn.Module, data: ClassifierData, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, loss_fn: nn.Module, config: FinetuneConfig,
                 device: torch.device, dtype: torch.dtype,
                 proximal: tuple[float, list[torch.Tensor]] | None = None) -> float:
    """One shuffled pass with gradient accumulation; returns the mean training loss.

    ``proximal = (mu, reference)`` adds FedProx's ``mu / 2 * ||w - w_global||^2`` over the trainable
    parameters (in the optimised loss, not in the reported one).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = torch.randperm(len(data))
    steps = math.ceil(len(data) / config.batch_size)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for step in range(steps):
        images, clinical, labels = data.batch(order[step * config.batch_size : (step + 1) * config.batch_size], device)
        with autocast(device, dtype):
            logits = model(images, clinical)
        loss = loss_fn(logits.float(), labels)
        objective = loss
        if proximal is not None:
            mu, reference = proximal
            objective = loss + mu / 2 * sum(((p - r) ** 2).sum() for p, r in zip(trainable, reference))
        scaler.scale(objective / config.grad_accumulation).backward()
        total += float(loss.detach()) * len(labels)
        if (step + 1) % config.grad_accumulation == 0 or step + 1 == steps:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return total / len(data)


def train_classifier(
    model: nn.Module,
    train_data: ClassifierData,
    val_data: ClassifierData | None,
    config: FinetuneConfig,
    *,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    proximal_mu: float = 0.0,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train the trainable part of ``model`` in place and return its state and metrics.

    Loss: ``BCEWithLogitsLoss`` with ``pos_weight`` from the local class counts. With ``val_data``,
    each epoch is scored by validation AUC (ties broken by validation loss); when the validation set
    holds one class AUC is undefined, so the score falls back to validation loss and
    ``metrics["val_auc_defined"]`` is 0. Early stopping after ``patience`` epochs without a better
    score; the best epoch's weights are restored. Without ``val_data`` all epochs run and the last
    weights are kept (the federated local-epochs case).

    ``checkpoint_path``: written atomically after every epoch; ``resume=True`` continues from it
    (same settings required) and reproduces the uninterrupted run.

    ``proximal_mu`` > 0: FedProx's proximal term towards the weights the model starts from (the
    global model of the round).

    ``optimizer_state``: AdamW's moments from this site's previous round (``TrainResult.optimizer_state``),
    so that R rounds of E epochs are one optimisation rather than R cold restarts.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0; got {proximal_mu}")
    if len(train_data) == 0:
        raise ValueError("train_data is empty; a site needs at least one labelled example to train")
    device = pick_device(config.device)
    dtype = resolve_precision(device, config.precision)
    seed_everything(config.seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; check the encoder mode and the head")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    proximal = (proximal_mu, [p.detach().clone() for p in params]) if proximal_mu > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    pos_weight, weighted = _pos_weight(train_data.labels) if config.class_weighting else (1.0, False)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    eval_loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))

    start_epoch, history, best_score, best_state, best_epoch, bad_epochs = 0, [], None, None, -1, 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        payload = _load_checkpoint(Path(checkpoint_path), config)
        load_trainable_state(model, payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        start_epoch, history = payload["epoch"] + 1, payload["history"]
        best_score, best_state, best_epoch, bad_epochs = (
            payload["best_score"], payload["best_state"], payload["best_epoch"], payload["bad_epochs"])
        log.info("resumed %s at epoch %d", checkpoint_path, start_epoch)

    n = len(train_data)
    stopped_early = False
    bar = tqdm(range(start_epoch, config.epochs), disable=not progress, desc="fine-tune", unit="epoch")
    for epoch in bar:
        if config.patience is not None and val_data is not None and bad_epochs >= config.patience:
            stopped_early = True
            break
        torch.manual_seed(_epoch_seed(config.seed, epoch))
        train_loss = _train_epoch(model, train_data, optimizer, scaler, loss_fn, config, device, dtype, proximal)
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
        if val_data is not None:
            val_loss, val_auc = _evaluate(model, val_data, eval_loss_fn, config, device, dtype)
            row.update(val_loss=val_loss, val_auc=math.nan if val_auc is None else val_auc,
                       val_auc_defined=float(val_auc is not None))
            score = (-val_loss,) if val_auc is None else (val_auc, -val_loss)
            if best_score is None or tuple(score) > tuple(best_score):
                best_score, best_state, best_epoch, bad_epochs = score, trainable_state(model), epoch, 0
            else:
                bad_epochs += 1
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if checkpoint_path is not None:
            save_checkpoint({
                "epoch": epoch, "history": history, "config": asdict(config),
                "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "best_score": best_score, "best_state": best_state,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            }, checkpoint_path)
    bar.close()

    if best_state is not None:
        load_trainable_state(model, best_state)
    else:
        best_epoch = history[-1]["epoch"] if history else -1
    metrics: dict[str, float] = {
        "num-examples": float(n),
        "train_loss": history[-1]["train_loss"] if history else math.nan,
        "epochs_run": float(len(history)),
        "best_epoch": float(best_epoch),
        "stopped_early": float(stopped_early),
        "pos_weight": pos_weight,
        "class_weighted": float(weighted),
    }
    if val_data is not None and best_epoch >= 0:
        best_row = next(r for r in history if r["epoch"] == best_epoch)
        metrics.update(val_loss=best_row["val_loss"], val_auc_defined=best_row["val_auc_defined"])
        if best_row["val_auc_defined"]:
            metrics["val_auc"] = best_row["val_auc"]
    return TrainResult(state=trainable_state(model), metrics=metrics, num_examples=n,
                       history=history, best_epoch=best_epoch, optimizer_state=optimizer.state_dict())
