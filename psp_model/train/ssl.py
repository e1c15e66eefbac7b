"""Phase-1 self-supervised pretraining of the MRI encoder (one site's local training).

Follows MONAI's published recipe (tutorials/self_supervised_pretraining, ``ViTAutoEnc``): two
augmented views of each volume, each with an inner or outer cutout (``RandCoarseDropoutd``) then
``RandCoarseShuffled``; loss = L1(recon of view 1, original) and MONAI's ``ContrastiveLoss`` between
the flattened reconstructions of both views (computed as ``contrastive_loss``: same values, far
cheaper). The tutorial's hole sizes are for 96^3 crops; they are scaled here to the volume size.

``train_ssl`` is a plain function over ``(C, D, H, W)`` tensors so the federation can run E local
epochs from the global weights and read ``model.state_dict()`` afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.transforms import Compose, CopyItemsd, OneOf, RandCoarseDropoutd, RandCoarseShuffled
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from psp_model.nets.encoder import SSLAutoencoder
from psp_model.train.checkpoint import load_checkpoint, save_checkpoint
from psp_model.train.device import Precision, autocast, pick_device, resolve_precision

__all__ = ["SSLConfig", "contrastive_loss", "ssl_forward", "ssl_loss", "ssl_optimizer", "ssl_transforms", "train_ssl"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "psp-ssl-checkpoint/1"
_TUTORIAL_SIDE = 96  # the MONAI tutorial's crop size, to which its hole sizes refer
# Settings that change the loss curve; a checkpoint made with other values cannot be resumed.
_RESUME_KEYS = ("lr", "batch_size", "temperature", "grad_accum_steps", "precision", "seed", "loss_mix")


@dataclass(frozen=True)
class SSLConfig:
    """Options of ``train_ssl``.

    Args:
        lr: Adam learning rate (tutorial: 1e-4).
        batch_size: volumes per micro-batch (tutorial: 4); the contrastive loss contrasts within it.
        epochs: total epochs (with ``resume``, training continues up to this number).
        temperature: ``ContrastiveLoss`` temperature (tutorial notebook 0.05; its README says 0.005).
        grad_accum_steps: micro-batches per optimizer step (effective batch = batch_size x this; the
            contrastive term still only sees one micro-batch).
        precision: ``auto`` = bf16 (or fp16) autocast on CUDA, fp32 on CPU; ``bf16`` on a CPU with
            bf16 instructions is ~3x faster at the same loss curve (bench/README.md).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        seed: seeds view augmentation, batch order and dropout (model init is the caller's).
        loss_mix: ``tutorial`` = L1 + contrastive x L1 (the tutorial's "adjust the CL loss by recon
            loss"); ``sum`` = L1 + contrastive.
    """

    lr: float = 1e-4
    batch_size: int = 4
    epochs: int = 1
    temperature: float = 0.05
    grad_accum_steps: int = 1
    precision: Precision = "auto"
    device: str = "auto"
    seed: int = 0
    loss_mix: Literal["tutorial", "sum"] = "tutorial"

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "epochs", "grad_accum_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be one of auto, fp32, bf16, fp16, got {self.precision!r}")
        if self.loss_mix not in ("tutorial", "sum"):
            problems.append(f"loss_mix must be 'tutorial' or 'sum', got {self.loss_mix!r}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an int, got {self.seed!r}")
        if problems:
            raise ValueError("invalid SSLConfig: " + "; ".join(problems))


def _scaled(size: int, img_size: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, round(size * side / _TUTORIAL_SIDE)) for side in img_size)


def _view_transforms(key: str, img_size: Sequence[int]) -> list:
    cutout = OneOf(
        transforms=[
            RandCoarseDropoutd(keys=key, prob=1.0, holes=6, spatial_size=_scaled(5, img_size), dropout_holes=True,
                               max_spatial_size=_scaled(32, img_size)),
            RandCoarseDropoutd(keys=key, prob=1.0, holes=6, spatial_size=_scaled(20, img_size), dropout_holes=False,
                               max_spatial_size=_scaled(64, img_size)),
        ]
    )
    return [cutout, RandCoarseShuffled(keys=key, prob=0.8, holes=10, spatial_size=_scaled(8, img_size))]


def ssl_transforms(img_size: Sequence[int]) -> Compose:
    """``{"image": (C, D, H, W)}`` -> adds ``gt_image`` (original) and two independently augmented views
    ``image`` and ``image_2``, as in the MONAI tutorial (hole sizes scaled from its 96^3 crops)."""
    return Compose(
        [
            CopyItemsd(keys="image", times=2, names=["gt_image", "image_2"]),
            *_view_transforms("image", img_size),
            *_view_transforms("image_2", img_size),
        ]
    )


def contrastive_loss(input: torch.Tensor, target: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """``monai.losses.ContrastiveLoss`` (SimCLR NT-Xent as MONAI writes it) from the 2B x 2B Gram matrix.

    MONAI's forward gets the cosine similarities by broadcasting ``(2B, 1, F)`` against ``(1, 2B, F)``;
    with F = 2 x 160^3 every intermediate is 0.5 GB and the loss took longer than the ViT on CPU.
    Cosine similarity needs only the pairwise dot products: one ``(2B, F) @ (F, 2B)`` product, whose
    diagonal gives the norms too. Written
    with ``logsumexp`` so that small temperatures (the tutorial README's 0.005) do not overflow to NaN
    as ``exp(sim / t)`` does. Tests pin value and gradients to MONAI's class.

    Args:
        input: ``(B, F)``, e.g. flattened reconstructions of view 1.
        target: ``(B, F)``, the same volumes' view 2.
    """
    if input.ndim != 2 or input.shape != target.shape:
        raise ValueError(f"contrastive_loss needs two (B, F) tensors of one shape, got {tuple(input.shape)} and "
                         f"{tuple(target.shape)}")
    batch = input.shape[0]
    both = torch.cat([input, target])
    gram = both @ both.T  # the only pass over F, forward and backward
    norms = gram.diagonal().clamp_min(1e-16).sqrt()  # = max(|x|, 1e-8) as in F.cosine_similarity
    logits = gram / (norms[:, None] * norms[None, :] * temperature)
    positives = torch.cat([torch.diagonal(logits, batch), torch.diagonal(logits, -batch)])
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=logits.device)
    return (torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")), dim=1) - positives).mean()


def ssl_loss(
    recon_1: torch.Tensor,
    recon_2: torch.Tensor,
    original: torch.Tensor,
    *,
    temperature: float,
    loss_mix: Literal["tutorial", "sum"] = "tutorial",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total, L1 and contrastive loss of ``(B, C, D, H, W)`` reconstructions, in fp32 whatever the autocast."""
    recon_1 = recon_1.float()
    l1 = torch.nn.functional.l1_loss(recon_1, original.float())
    cl = contrastive_loss(recon_1.flatten(start_dim=1), recon_2.float().flatten(start_dim=1), temperature=temperature)
    total = l1 + cl * l1 if loss_mix == "tutorial" else l1 + cl
    return total, l1, cl


def ssl_forward(
    model: SSLAutoencoder,
    views: torch.Tensor,
    original: torch.Tensor,
    *,
    dtype: torch.dtype,
    temperature: float,
    loss_mix: Literal["tutorial", "sum"] = "tutorial",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SSL forward: (total, L1, contrastive) losses.

    Args:
        views: ``(2B, C, D, H, W)``, the B first views then the B second views; one pass over both is
            the same maths as the tutorial's two calls (no batch-coupled layers) with larger matmuls.
        original: ``(B, C, D, H, W)``, the volumes before augmentation.
    """
    with autocast(original.device, dtype):
        recon_1, recon_2 = model(views).chunk(2)
    return ssl_loss(recon_1, recon_2, original, temperature=temperature, loss_mix=loss_mix)


def ssl_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam (the tutorial's optimiser), fused: one kernel over all parameters, ~9x faster on CPU."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Independent, reproducible stream per epoch so that a resumed run replays exactly."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _fetch(volumes: Sequence[torch.Tensor] | Dataset, index: int, expected: tuple[int, ...]) -> torch.Tensor:
    item = volumes[index]
    if isinstance(item, Mapping):  # a MONAI-style dict dataset
        item = item["image"]
    # A copy: MONAI's cutout writes into its input, which must not be the caller's tensor.
    volume = torch.as_tensor(item).to(dtype=torch.float32, copy=True)
    if tuple(volume.shape) != expected:
        raise ValueError(
            f"SSL volume {index} has shape {tuple(volume.shape)}, expected {expected} (C, D, H, W) from the "
            "encoder config; crop/pad it to EncoderConfig.img_size"
        )
    return volume


def _stack(items: list[dict], keys: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """Batch ``items[*][key]`` key after key (all first views, then all second views)."""
    return torch.stack([convert_to_tensor(item[key], track_meta=False) for key in keys for item in items]).to(device)


def _saved_config(config: SSLConfig) -> dict:
    return {key: value for key, value in asdict(config).items() if key in _RESUME_KEYS}


def _restore(
    path: Path, model: SSLAutoencoder, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    config: SSLConfig, device: torch.device,
) -> tuple[int, list[float]]:
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if state["encoder_config"] != asdict(model.config):
        raise ValueError(
            f"checkpoint {path} was made for encoder {state['encoder_config']}, the model is {asdict(model.config)}"
        )
    saved, current = state["config"], _saved_config(config)
    changed = [f"{key}: checkpoint {saved.get(key)!r} vs now {current[key]!r}" for key in current
               if saved.get(key) != current[key]]
    if changed:
        raise ValueError(f"cannot resume {path}, SSL settings changed ({'; '.join(changed)}); restore them or start "
                         "without resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), [float(v) for v in state["history"]]


def train_ssl(
    model: SSLAutoencoder,
    volumes: Sequence[torch.Tensor] | Dataset,
    config: SSLConfig,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with the SSL objective; returns the mean total loss of every epoch.

    Args:
        model: the autoencoder, starting from whatever weights it holds (e.g. the global model of a
            federated round); it is moved to the chosen device and left there.
        volumes: items of shape ``(C, D, H, W)`` = ``(in_channels, *img_size)`` of the model's config
            (tensors or arrays, or dicts holding one under ``"image"``).
        config: optimiser, precision, device and seed.
        checkpoint_path: if given, model + optimizer + history are saved there after every epoch.
        resume: continue from ``checkpoint_path`` (must exist) up to ``config.epochs``; the result is the
            same as an uninterrupted run.
        progress: show a tqdm bar per epoch.
    """
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path to resume from")
    n_volumes = len(volumes)
    if n_volumes == 0:
        raise ValueError("train_ssl got no volumes; give at least one (C, D, H, W) tensor")
    expected = (model.config.in_channels, *model.config.img_size)
    device = pick_device(config.device)
    dtype = resolve_precision(device, config.precision)
    model.to(device)
    optimizer = ssl_optimizer(model, config.lr)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    transforms = ssl_transforms(model.config.img_size)

    start_epoch, history = 0, []
    if resume:
        start_epoch, history = _restore(Path(checkpoint_path), model, optimizer, scaler, config, device)
        logger.info("resumed SSL from %s at epoch %d", checkpoint_path, start_epoch)

    n_batches = math.ceil(n_volumes / config.batch_size)
    for epoch in range(start_epoch, config.epochs):
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)
        transforms.set_random_state(seed=epoch_seed)
        order = torch.randperm(n_volumes, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        totals = []
        bar = tqdm(range(n_batches), desc=f"SSL epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step in bar:
            items = [transforms({"image": _fetch(volumes, i, expected)})
                     for i in order[step * config.batch_size:(step + 1) * config.batch_size]]
            views = _stack(items, ("image", "image_2"), device)
            original = _stack(items, ("gt_image",), device)
            total, l1, cl = ssl_forward(model, views, original, dtype=dtype, temperature=config.temperature,
                                        loss_mix=config.loss_mix)
            last_in_group = (step + 1) % config.grad_accum_steps == 0 or step + 1 == n_batches
            scaled = total / config.grad_accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if last_in_group:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            totals.append(total.item())
            bar.set_postfix(loss=f"{totals[-1]:.4f}", l1=f"{l1.item():.4f}", cl=f"{cl.item():.4f}")
        history.append(float(np.mean(totals)))
        logger.info("SSL epoch %d/%d: loss %.5f", epoch + 1, config.epochs, history[-1])
        if checkpoint_path is not None:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch + 1,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "config": _saved_config(config),
                    "encoder_config": asdict(model.config),
                },
                checkpoint_path,
            )
    return history
