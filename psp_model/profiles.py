"""Study profiles: one name fixes the MR grid and the encoder shape, so every site agrees."""

from __future__ import annotations

from dataclasses import dataclass

from psp_model.errors import ConfigError
from psp_model.nets.encoder import EncoderConfig
from psp_model.preprocess.mri import MRConfig


@dataclass(frozen=True)
class Profile:
    """MR grid + encoder for one study size."""

    name: str
    mr: MRConfig
    encoder: EncoderConfig


def demo_encoder() -> EncoderConfig:
    """2 x 64^3 (2.5 mm), 8^3 patches -> N = 512 tokens like the paper, d = 96, 4 layers: CPU-sized."""
    return EncoderConfig(img_size=(64, 64, 64), patch_size=(8, 8, 8), hidden_size=96, mlp_dim=192,
                         num_layers=4, num_heads=4)


def get_profile(name: str) -> Profile:
    """``tiny`` (tests: 32^3), ``demo`` (CPU minutes: 64^3, N = 512) or ``full`` (paper: 160^3, ViT-B)."""
    if name == "tiny":
        return Profile("tiny", MRConfig.tiny(), EncoderConfig.tiny())
    if name == "demo":
        return Profile("demo", MRConfig.demo(), demo_encoder())
    if name == "full":
        return Profile("full", MRConfig.full(), EncoderConfig.full())
    raise ConfigError([f"profile {name!r} is unknown. Fix: use tiny, demo or full."])
