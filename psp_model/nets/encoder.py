"""Phase-1 MRI encoder: MONAI ViT over 3D patches, plus the light decoder used only for SSL.

MONAI's ``ViTAutoEnc`` would be the obvious choice, but it refuses patch sizes that are not square
numbers (its decoder upsamples by ``sqrt(patch)`` twice), so the paper's 2 x 160^3 input with 20^3
patches (N = 512 tokens) cannot be built with it. We therefore keep MONAI's ``ViT`` as the encoder
(its weights are what phase 2 and the token cache use) and add our own two-stage transposed-conv
decoder that upsamples by a factorisation of the patch size (20 = 4 x 5, 16 = 4 x 4, 8 = 2 x 4),
with the same shape and cost as ``ViTAutoEnc``'s decoder (two linear transposed convolutions) plus
``out_channels = in_channels`` so both MR channels are reconstructed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from monai.networks.nets import ViT
from torch import nn

__all__ = ["EncoderConfig", "MRIEncoder", "SSLAutoencoder", "encoder_fingerprint", "encoder_state_dict"]

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the ViT encoder; ``full()`` is the paper's (2 x 160^3, 20^3 patches, ViT-B).

    Args:
        in_channels: MR channels, [T1CE, FLAIR] = 2.
        img_size: input volume size (D, H, W); every side must be divisible by ``patch_size``.
        patch_size: 3D patch size (D, H, W); tokens N = prod(img_size // patch_size).
        hidden_size: token width d; must be divisible by ``num_heads``.
        mlp_dim: width of the transformer MLP.
        num_layers: number of transformer blocks.
        num_heads: attention heads.
        dropout: dropout rate in [0, 1].
    """

    in_channels: int = 2
    img_size: Triple = (160, 160, 160)
    patch_size: Triple = (20, 20, 20)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.in_channels, int) and self.in_channels >= 1):
            problems.append(f"in_channels must be a positive int, got {self.in_channels!r}")
        for name in ("img_size", "patch_size"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
                problems.append(f"{name} must be a tuple of 3 positive ints (D, H, W), got {value!r}")
        if not problems and any(s % p for s, p in zip(self.img_size, self.patch_size)):
            problems.append(
                f"img_size {self.img_size} must be divisible by patch_size {self.patch_size} on every axis; "
                "pick a patch size that divides the volume (e.g. 20 for 160, 16 for 128)"
            )
        for name in ("hidden_size", "mlp_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not problems and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads} "
                f"(e.g. num_heads={math.gcd(self.hidden_size, 12)})"
            )
        if not 0.0 <= self.dropout <= 1.0:
            problems.append(f"dropout must be in [0, 1], got {self.dropout!r}")
        if problems:
            raise ValueError("invalid EncoderConfig: " + "; ".join(problems))

    @property
    def grid(self) -> Triple:
        """Token grid (D/pd, H/ph, W/pw)."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def full(cls) -> EncoderConfig:
        """The paper's encoder: 2 x 160^3, 20^3 patches -> N = 512 tokens, ViT-B (768, 3072, 12 x 12)."""
        return cls()

    @classmethod
    def small(cls) -> EncoderConfig:
        """Half resolution of ``full`` with the same N = 512 tokens: 2 x 80^3, 10^3 patches, d = 192, 6 layers."""
        return cls(img_size=(80, 80, 80), patch_size=(10, 10, 10), hidden_size=192, mlp_dim=768, num_layers=6,
                   num_heads=6)

    @classmethod
    def tiny(cls) -> EncoderConfig:
        """For tests: 2 x 32^3, 8^3 patches -> 64 tokens, d = 64, 2 layers, 4 heads."""
        return cls(img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=64, mlp_dim=128, num_layers=2,
                   num_heads=4)


class MRIEncoder(nn.Module):
    """MONAI ``ViT`` (no classification token) mapping ``(B, C, D, H, W)`` to tokens ``(B, N, hidden)``.

    The patch embedding is MONAI's ``proj_type="perceptron"`` (patch rearrange + ``Linear``), the same
    maths as the default strided ``Conv3d``; measured on CPU, oneDNN runs a bf16 conv with 20^3
    kernels about 8x slower than the equivalent matmul.

    Args:
        config: the encoder shape.
        use_flash_attention: run attention through ``torch.nn.functional.scaled_dot_product_attention``
            (MONAI ``SABlock``'s own option; ``ViT`` does not forward it, so it is set on each block)
            instead of MONAI's einsum path; same weights and maths. ``None`` (default) decides per
            call: fused on CUDA and in fp32, einsum under CPU bf16/fp16 autocast, where the CPU fused
            kernel was measured ~20% slower for N = 512 tokens.
        save_attn: keep each block's attention matrix in ``blocks[i].attn.att_mat`` (for attention
            maps); needs the einsum path, so it cannot be combined with ``use_flash_attention=True``.
    """

    def __init__(
        self, config: EncoderConfig, *, use_flash_attention: bool | None = None, save_attn: bool = False
    ) -> None:
        super().__init__()
        if use_flash_attention and save_attn:
            raise ValueError("save_attn=True needs use_flash_attention=False (fused attention does not expose weights)")
        self.config = config
        self.use_flash_attention = False if save_attn else use_flash_attention
        self.vit = ViT(
            in_channels=config.in_channels,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout_rate=config.dropout,
            classification=False,
            save_attn=save_attn,
            proj_type="perceptron",
        )

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> layer-normed tokens ``(B, N, hidden)``, token order = C-order over the grid."""
        expected = (self.config.in_channels, *self.config.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MRIEncoder expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                "crop/pad the volume to EncoderConfig.img_size first"
            )
        fused = self.use_flash_attention
        if fused is None:
            fused = x.is_cuda or not torch.is_autocast_enabled(x.device.type)
        for block in self.vit.blocks:
            block.attn.use_flash_attention = fused
        tokens, _ = self.vit(x)
        return tokens


def _two_stage_factors(p: int) -> tuple[int, int]:
    """Split ``p`` into ``a * b`` with ``a <= b`` as balanced as possible (20 -> 4, 5; 7 -> 1, 7)."""
    a = max(d for d in range(1, math.isqrt(p) + 1) if p % d == 0)
    return a, p // a


class PatchDecoder(nn.Module):
    """Tokens ``(B, N, hidden)`` -> volume ``(B, out_channels, D, H, W)`` with two transposed convolutions.

    Each stage's kernel equals its stride, as in ``ViTAutoEnc``; stage factors come from
    ``_two_stage_factors`` per axis so any patch size works (an axis with a prime patch side uses a
    1-voxel first stage on that axis).
    """

    def __init__(self, config: EncoderConfig, *, out_channels: int, channels: int = 16) -> None:
        super().__init__()
        first, second = zip(*(_two_stage_factors(p) for p in config.patch_size))
        self.grid = config.grid
        self.up1 = nn.ConvTranspose3d(config.hidden_size, channels, kernel_size=first, stride=first)
        self.up2 = nn.ConvTranspose3d(channels, out_channels, kernel_size=second, stride=second)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *self.grid)
        return self.up2(self.up1(x))


class SSLAutoencoder(nn.Module):
    """``MRIEncoder`` + ``PatchDecoder`` reconstructing all input channels, for phase-1 SSL.

    State-dict keys start with ``encoder.`` or ``decoder.`` so the federation can select (and the
    token cache can fingerprint) the encoder's arrays by prefix.

    Args:
        config: the encoder shape.
        decoder_channels: channels between the two transposed convolutions (``ViTAutoEnc``'s ``deconv_chns``).
        use_flash_attention: see ``MRIEncoder``.

    The decoder runs in fp32 even under autocast: its output is what the L1 loss compares with the
    fp32 volume, and on CPU it was measured no slower than bf16 plus the cast back.
    """

    def __init__(
        self, config: EncoderConfig, *, decoder_channels: int = 16, use_flash_attention: bool | None = None
    ) -> None:
        super().__init__()
        if not (isinstance(decoder_channels, int) and decoder_channels >= 1):
            raise ValueError(f"decoder_channels must be a positive int, got {decoder_channels!r}")
        self.config = config
        self.encoder = MRIEncoder(config, use_flash_attention=use_flash_attention)
        self.decoder = PatchDecoder(config, out_channels=config.in_channels, channels=decoder_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> fp32 reconstruction of the same shape."""
        tokens = self.encoder(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.decoder(tokens.float())


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes, bytes, sorted by name).

    Used as the token-cache key: tokens computed with other weights must never be reused. Pass the
    ``MRIEncoder`` (``autoencoder.encoder``), not the autoencoder, so decoder updates do not
    invalidate the cache.
    """
    digest = hashlib.sha256()
    state = encoder.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_state_dict(autoencoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``MRIEncoder`` part of an ``SSLAutoencoder`` state dict (``encoder.`` prefix removed), for
    loading the pretrained encoder alone in phase 2: ``MRIEncoder(config).load_state_dict(...)``."""
    prefix = "encoder."
    state = {key[len(prefix):]: value for key, value in autoencoder_state.items() if key.startswith(prefix)}
    if not state:
        raise ValueError(
            f"no 'encoder.*' entries in this state dict (first keys: {list(autoencoder_state)[:3]}); "
            "pass SSLAutoencoder.state_dict() or an SSL checkpoint's 'model' entry"
        )
    return state
