"""The phase-2 classifier: guided cross-attention from clinical tokens to MRI tokens, plus ablation heads.

Gomaa et al., Sci Rep 2025 (doi:10.1038/s41598-025-02026-7), Methods, Eq. (1):
clinical vector -> FC -> ``E_c`` (M x d); ``E_{i->c} = softmax((W_q E_c)(W_k E_i)^T / sqrt(d)) W_v E_i``;
``[E_{i->c}; E_c]`` (2M x d) -> self-attention -> attention pooling -> two FC layers -> one logit.
Positive class (logit > 0) is true progression (TP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.blocks import SABlock
from torch import nn

from psp_model.errors import ConfigError

__all__ = [
    "Variant",
    "EncoderMode",
    "HeadConfig",
    "GuidedCrossAttention",
    "AttentionPool",
    "MultimodalHead",
    "ClinicalOnlyHead",
    "MRIOnlyHead",
    "build_head",
    "PSPClassifier",
    "build_classifier",
    "trainable_state",
    "load_trainable_state",
]

Variant = Literal["multimodal", "clinical-only", "mri-only"]
EncoderMode = Literal["scratch", "transfer", "ssl"]
VARIANTS: tuple[str, ...] = ("multimodal", "clinical-only", "mri-only")
ENCODER_MODES: tuple[str, ...] = ("scratch", "transfer", "ssl")


@dataclass(frozen=True)
class HeadConfig:
    """Options of the trainable head.

    Args:
        n_clinical: number of clinical + dose features F (columns of the clinical matrix).
        dim: token width d; must equal the encoder's ``hidden_size`` (ignored by ``clinical-only``).
        n_clinical_tokens: M, the clinical tokens made by reshaping the FC output (paper: 4).
        num_heads: heads of the self-attention layer over the 2M tokens; must divide ``dim``.
        dropout: dropout in attention and FC layers; 0.3 because the head is fitted on tens of cases
            (5-fold CV, 100-case synthetic site: 0.3 with weight decay 0.1 was on par with 0.1 / 0.01 at
            30 epochs, AUC 0.78 vs 0.77, and is the safer setting for small sites).
        variant: ``multimodal`` (the paper's model), ``clinical-only`` (4-layer FC network on the
            clinical + dose features) or ``mri-only`` (pooled encoder tokens -> FC; the paper's MRI-only
            ablation fine-tunes the SSL encoder: ``encoder_mode="transfer"`` with the SSL weights).
        fc_hidden: width of the hidden FC layers.
    """

    n_clinical: int
    dim: int
    n_clinical_tokens: int = 4
    num_heads: int = 4
    dropout: float = 0.3
    variant: Variant = "multimodal"
    fc_hidden: int = 64

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"HeadConfig.variant must be one of {VARIANTS}; got {self.variant!r}")
        if self.n_clinical < 1 and self.variant != "mri-only":
            problems.append(f"HeadConfig.n_clinical must be >= 1 for variant {self.variant!r}; got {self.n_clinical}")
        for name in ("dim", "n_clinical_tokens", "num_heads", "fc_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"HeadConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.dim >= 1 and self.num_heads >= 1 and self.dim % self.num_heads:
            problems.append(
                f"HeadConfig.num_heads ({self.num_heads}) must divide dim ({self.dim}); pick e.g. num_heads=1"
            )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"HeadConfig.dropout must be in [0, 1); got {self.dropout}")
        if problems:
            raise ConfigError(problems)


class GuidedCrossAttention(nn.Module):
    """Single-head cross-attention, clinical tokens as queries, MRI tokens as keys and values (Eq. 1).

    Written out (no fused kernel) so that it can be checked against a hand computation and so the
    attention map over MRI tokens is available for explanation.

    Args:
        dim: token width d; ``W_q, W_k, W_v`` are d x d without bias, as in the paper.
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, clinical_tokens: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, M, d)``, ``(B, N, d)`` -> ``E_{i->c}`` ``(B, M, d)`` and attention weights ``(B, M, N)``."""
        q = self.w_q(clinical_tokens)
        k = self.w_k(image_tokens)
        v = self.w_v(image_tokens)
        attn = torch.softmax(torch.einsum("bmd,bnd->bmn", q, k) * self.scale, dim=-1)
        return torch.einsum("bmn,bnd->bmd", self.attn_drop(attn), v), attn


class AttentionPool(nn.Module):
    """Weighted mean of tokens with learned scores: ``(B, T, d)`` -> ``(B, d)`` and weights ``(B, T)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.score(tokens).squeeze(-1), dim=-1)
        return torch.einsum("bt,btd->bd", weights, tokens), weights


def _check_clinical(clinical: torch.Tensor | None, n_clinical: int) -> torch.Tensor:
    if clinical is None or clinical.ndim != 2 or clinical.shape[1] != n_clinical:
        shape = None if clinical is None else tuple(clinical.shape)
        raise ValueError(f"clinical must have shape (B, {n_clinical}); got {shape}")
    return clinical


def _check_tokens(tokens: torch.Tensor | None, dim: int) -> torch.Tensor:
    if tokens is None or tokens.ndim != 3 or tokens.shape[2] != dim:
        shape = None if tokens is None else tuple(tokens.shape)
        raise ValueError(f"image tokens must have shape (B, N, {dim}); got {shape}")
    return tokens


class MultimodalHead(nn.Module):
    """The paper's head: FC clinical encoder, guided cross-attention, self-attention, attention pooling, 2 FC."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        m, d = config.n_clinical_tokens, config.dim
        self.clinical_encoder = nn.Sequential(nn.Linear(config.n_clinical, m * d), nn.GELU())
        self.token_norm = nn.LayerNorm(d)
        self.cross_attention = GuidedCrossAttention(d, config.dropout)
        # One self-attention layer as in the paper (pre-norm, residual), without a transformer MLP:
        # the MLP would double what travels per fine-tuning round (ViT-B: 6.6 M -> 4.2 M parameters).
        self.self_norm = nn.LayerNorm(d)
        self.self_attention = SABlock(hidden_size=d, num_heads=config.num_heads, dropout_rate=config.dropout)
        self.pool = AttentionPool(d)
        self.classifier = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, config.fc_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.fc_hidden, 1),
        )

    def attention_maps(
        self, image_tokens: torch.Tensor | None, clinical: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Logits ``(B,)`` with the maps that explain them: ``cross_attention`` ``(B, M, N)`` (clinical token
        -> MRI token, reshape N to the encoder's token grid for a map) and ``pool_weights`` ``(B, 2M)``."""
        image_tokens = _check_tokens(image_tokens, self.config.dim)
        clinical = _check_clinical(clinical, self.config.n_clinical)
        e_c = self.clinical_encoder(clinical).reshape(clinical.shape[0], self.config.n_clinical_tokens, -1)
        e_ic, cross = self.cross_attention(e_c, self.token_norm(image_tokens))
        tokens = torch.cat([e_ic, e_c], dim=1)
        fused = tokens + self.self_attention(self.self_norm(tokens))
        pooled, pool_weights = self.pool(fused)
        return {"logits": self.classifier(pooled).squeeze(-1), "cross_attention": cross, "pool_weights": pool_weights}

    def forward(self, image_tokens: torch.Tensor | None, clinical: torch.Tensor | None) -> torch.Tensor:
        """``(B, N, d)`` tokens and ``(B, F)`` clinical -> ``(B,)`` TP logits."""
        return self.attention_maps(image_tokens, clinical)["logits"]


class ClinicalOnlyHead(nn.Module):
    """Ablation: 4-layer FC network on the clinical + dose features; MRI tokens are ignored."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        h = config.fc_hidden
        self.mlp = nn.Sequential(
            nn.Linear(config.n_clinical, h),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(h, h),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(h, max(h // 2, 1)),
            nn.GELU(),
            nn.Linear(max(h // 2, 1), 1),
        )

    def forward(self, image_tokens: torch.Tensor | None, clinical: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(_check_clinical(clinical, self.config.n_clinical)).squeeze(-1)


class MRIOnlyHead(nn.Module):
    """Ablation: mean-pooled encoder tokens -> 2 FC layers; clinical features are ignored."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.classifier = nn.Sequential(
            nn.LayerNorm(config.dim),
            nn.Linear(config.dim, config.fc_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.fc_hidden, 1),
        )

    def forward(self, image_tokens: torch.Tensor | None, clinical: torch.Tensor | None) -> torch.Tensor:
        return self.classifier(_check_tokens(image_tokens, self.config.dim).mean(dim=1)).squeeze(-1)


def build_head(config: HeadConfig) -> nn.Module:
    """The head for ``config.variant``; every head maps ``(tokens (B, N, d), clinical (B, F))`` to ``(B,)`` logits."""
    heads = {"multimodal": MultimodalHead, "clinical-only": ClinicalOnlyHead, "mri-only": MRIOnlyHead}
    return heads[config.variant](config)


class PSPClassifier(nn.Module):
    """Encoder + head. State-dict names start with ``encoder.`` / ``head.``.

    In ``ssl`` mode the encoder is frozen: no gradients, always in eval mode (so its tokens are
    deterministic and cacheable), and only ``head.*`` trains and travels in the federation.
    ``forward`` takes volumes ``(B, C, D, H, W)``, or, when the encoder is frozen, its cached tokens
    ``(B, N, d)`` (see ``psp_model.train.token_cache``).

    Args:
        head: a head from ``build_head``.
        encoder: an ``MRIEncoder`` (tokens ``(B, N, hidden_size)``); ``None`` only for ``clinical-only``.
        encoder_mode: ``ssl`` (frozen), ``transfer`` or ``scratch`` (both trained end to end).
    """

    def __init__(self, head: nn.Module, encoder: nn.Module | None = None, *, encoder_mode: EncoderMode = "ssl"):
        super().__init__()
        variant = head.config.variant
        problems = []
        if encoder_mode not in ENCODER_MODES:
            problems.append(f"encoder_mode must be one of {ENCODER_MODES}; got {encoder_mode!r}")
        if variant == "clinical-only" and encoder is not None:
            problems.append("the clinical-only variant uses no MRI encoder; pass encoder=None")
        if variant != "clinical-only" and encoder is None:
            problems.append(f"the {variant} variant needs an MRI encoder; got encoder=None")
        if encoder is not None and variant != "clinical-only" and encoder.hidden_size != head.config.dim:
            problems.append(
                f"HeadConfig.dim ({head.config.dim}) must equal the encoder's hidden_size ({encoder.hidden_size})"
            )
        if problems:
            raise ConfigError(problems)
        self.encoder = encoder
        self.head = head
        self.encoder_mode = encoder_mode
        if encoder is not None and self.encoder_frozen:
            encoder.requires_grad_(False)
            encoder.eval()

    @property
    def encoder_frozen(self) -> bool:
        return self.encoder_mode == "ssl"

    def train(self, mode: bool = True) -> PSPClassifier:
        super().train(mode)
        if self.encoder is not None and self.encoder_frozen:
            self.encoder.eval()
        return self

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Volumes ``(B, C, D, H, W)`` -> encoder tokens ``(B, N, d)`` (no graph when frozen)."""
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)

    def forward(self, images: torch.Tensor | None, clinical: torch.Tensor | None) -> torch.Tensor:
        """Volumes ``(B, C, D, H, W)`` or cached tokens ``(B, N, d)``, clinical ``(B, F)`` -> ``(B,)`` TP logits."""
        if self.encoder is None or images is None:
            return self.head(None, clinical)
        if images.ndim == 5:
            return self.head(self.tokens(images), clinical)
        if images.ndim == 3 and not self.encoder_frozen:
            raise ValueError(
                f"got encoder tokens {tuple(images.shape)} but the encoder trains in {self.encoder_mode!r} mode; "
                "pass volumes (B, C, D, H, W) instead"
            )
        if images.ndim == 3:
            return self.head(images, clinical)
        raise ValueError(f"images must be volumes (B, C, D, H, W) or tokens (B, N, d); got shape {tuple(images.shape)}")


def build_classifier(
    config: HeadConfig,
    encoder: nn.Module | None = None,
    *,
    encoder_mode: EncoderMode = "ssl",
    encoder_weights: Mapping[str, torch.Tensor] | None = None,
) -> PSPClassifier:
    """The classifier for one ablation cell.

    ``ssl`` and ``transfer`` need ``encoder_weights`` (SSL or transfer-task weights); ``scratch``
    refuses them, since its encoder starts from random initialisation.
    """
    if config.variant == "clinical-only":
        if encoder_weights is not None:
            raise ConfigError(["the clinical-only variant has no encoder; drop encoder_weights"])
        return PSPClassifier(build_head(config), None, encoder_mode=encoder_mode)
    if encoder_mode == "scratch" and encoder_weights is not None:
        raise ConfigError(["encoder_mode 'scratch' trains the encoder from random init; drop encoder_weights"])
    if encoder_mode in ("ssl", "transfer") and encoder_weights is None:
        raise ConfigError([f"encoder_mode {encoder_mode!r} needs encoder_weights (a state dict of the encoder)"])
    if encoder is not None and encoder_weights is not None:
        encoder.load_state_dict(dict(encoder_weights))
    return PSPClassifier(build_head(config), encoder, encoder_mode=encoder_mode)


def _frozen_names(model: nn.Module) -> set[str]:
    """State-dict keys that never train: frozen parameters and buffers of fully frozen modules."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for prefix, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers())
    return frozen


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries that train (CPU copies): in the frozen ``ssl`` setting only ``head.*``."""
    frozen = _frozen_names(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load exactly the trainable entries (e.g. global head weights from the server); other keys are refused."""
    expected = set(model.state_dict()) - _frozen_names(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"trainable state does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(dict(state), strict=False)
