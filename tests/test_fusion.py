"""The guided cross-attention head, its ablation variants and the encoder/head split of the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psp_model.errors import ConfigError
from psp_model.nets.encoder import EncoderConfig, MRIEncoder
from psp_model.nets.fusion import (
    AttentionPool,
    GuidedCrossAttention,
    HeadConfig,
    MultimodalHead,
    PSPClassifier,
    build_classifier,
    build_head,
    load_trainable_state,
    trainable_state,
)


@pytest.fixture
def encoder() -> MRIEncoder:
    torch.manual_seed(0)
    return MRIEncoder(EncoderConfig.tiny())


def test_guided_cross_attention_matches_hand_computation():
    torch.manual_seed(1)
    b, m, n, d = 3, 4, 10, 8
    module = GuidedCrossAttention(d).eval()
    e_c, e_i = torch.randn(b, m, d), torch.randn(b, n, d)
    out, attn = module(e_c, e_i)

    wq, wk, wv = (w.weight.detach().double().numpy() for w in (module.w_q, module.w_k, module.w_v))
    ec, ei = e_c.double().numpy(), e_i.double().numpy()
    q, k, v = ec @ wq.T, ei @ wk.T, ei @ wv.T  # nn.Linear computes x W^T
    scores = np.einsum("bmd,bnd->bmn", q, k) / np.sqrt(d)
    expected_attn = np.exp(scores - scores.max(-1, keepdims=True))
    expected_attn /= expected_attn.sum(-1, keepdims=True)
    expected = np.einsum("bmn,bnd->bmd", expected_attn, v)

    assert out.shape == (b, m, d) and attn.shape == (b, m, n)
    np.testing.assert_allclose(attn.detach().double().numpy(), expected_attn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_attention_weights_sum_to_one():
    torch.manual_seed(2)
    _, attn = GuidedCrossAttention(8)(torch.randn(2, 4, 8), torch.randn(2, 16, 8))
    pooled, weights = AttentionPool(8)(torch.randn(2, 6, 8))
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert pooled.shape == (2, 8)


@pytest.mark.parametrize("variant", ["multimodal", "clinical-only", "mri-only"])
def test_head_output_shapes(variant):
    head = build_head(HeadConfig(n_clinical=5, dim=16, num_heads=2, variant=variant))
    assert head(torch.randn(3, 12, 16), torch.randn(3, 5)).shape == (3,)


def test_multimodal_head_uses_both_modalities():
    torch.manual_seed(3)
    head = MultimodalHead(HeadConfig(n_clinical=3, dim=8, num_heads=2, dropout=0.0)).eval()
    tokens, clinical = torch.randn(2, 5, 8), torch.randn(2, 3)
    base = head(tokens, clinical)
    assert not torch.allclose(base, head(tokens + 1.0 * torch.randn_like(tokens), clinical))
    assert not torch.allclose(base, head(tokens, clinical + 1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "fusion"}, "variant must be one of"),
        ({"num_heads": 3}, "must divide dim"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"n_clinical": 0}, "n_clinical must be >= 1"),
        ({"n_clinical_tokens": 0}, "n_clinical_tokens must be >= 1"),
    ],
)
def test_head_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HeadConfig(**{"n_clinical": 4, "dim": 16, **kwargs})


def test_head_rejects_wrong_input_shapes():
    head = build_head(HeadConfig(n_clinical=5, dim=16, num_heads=2))
    with pytest.raises(ValueError, match=r"clinical must have shape \(B, 5\); got \(3, 4\)"):
        head(torch.randn(3, 12, 16), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"image tokens must have shape \(B, N, 16\); got \(3, 12, 8\)"):
        head(torch.randn(3, 12, 8), torch.randn(3, 5))


def test_classifier_state_names_and_trainable_state(encoder):
    config = HeadConfig(n_clinical=4, dim=encoder.hidden_size)
    weights = encoder.state_dict()
    frozen = build_classifier(config, encoder, encoder_mode="ssl", encoder_weights=weights)
    assert {k.split(".")[0] for k in frozen.state_dict()} == {"encoder", "head"}
    assert trainable_state(frozen) and all(k.startswith("head.") for k in trainable_state(frozen))
    assert not any(p.requires_grad for p in frozen.encoder.parameters())

    trained = build_classifier(
        config, MRIEncoder(EncoderConfig.tiny()), encoder_mode="transfer", encoder_weights=weights
    )
    keys = set(trainable_state(trained))
    assert keys == set(trained.state_dict())
    torch.testing.assert_close(trained.encoder.state_dict(), weights)


def test_frozen_encoder_stays_in_eval_mode(encoder):
    model = PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=encoder.hidden_size)), encoder, encoder_mode="ssl")
    model.train()
    assert model.head.training and not model.encoder.training


def test_classifier_accepts_volumes_and_cached_tokens(encoder):
    model = PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=encoder.hidden_size)), encoder).eval()
    volumes, clinical = torch.randn(2, 2, 32, 32, 32), torch.randn(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(volumes, clinical), model(encoder(volumes), clinical))


def test_classifier_rejects_tokens_when_encoder_trains_and_bad_shapes(encoder):
    head = build_head(HeadConfig(n_clinical=2, dim=encoder.hidden_size))
    model = PSPClassifier(head, encoder, encoder_mode="scratch")
    with pytest.raises(ValueError, match="encoder trains in 'scratch' mode; pass volumes"):
        model(torch.randn(1, 64, 64), torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"or tokens \(B, N, d\); got shape \(1, 2, 32, 32\)"):
        model(torch.randn(1, 2, 32, 32), torch.randn(1, 2))


def test_classifier_rejects_bad_combinations(encoder):
    with pytest.raises(ConfigError, match=r"dim \(16\) must equal the encoder's hidden_size \(64\)"):
        PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=16)), encoder)
    with pytest.raises(ConfigError, match="clinical-only variant uses no MRI encoder"):
        PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=64, variant="clinical-only")), encoder)
    with pytest.raises(ConfigError, match="mri-only variant needs an MRI encoder"):
        PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=64, variant="mri-only")), None)
    with pytest.raises(ConfigError, match="encoder_mode must be one of"):
        PSPClassifier(build_head(HeadConfig(n_clinical=2, dim=64)), encoder, encoder_mode="frozen")


def test_build_classifier_checks_encoder_weights(encoder):
    config = HeadConfig(n_clinical=2, dim=64)
    with pytest.raises(ConfigError, match="'ssl' needs encoder_weights"):
        build_classifier(config, encoder, encoder_mode="ssl")
    with pytest.raises(ConfigError, match="'scratch' trains the encoder from random init"):
        build_classifier(config, encoder, encoder_mode="scratch", encoder_weights=encoder.state_dict())
    with pytest.raises(ConfigError, match="clinical-only variant has no encoder"):
        build_classifier(HeadConfig(n_clinical=2, dim=64, variant="clinical-only"), encoder_weights={})
    clinical_only = build_classifier(HeadConfig(n_clinical=2, dim=64, variant="clinical-only"))
    assert clinical_only.encoder is None and clinical_only(None, torch.randn(3, 2)).shape == (3,)


def test_load_trainable_state_roundtrip_and_mismatch(encoder):
    config = HeadConfig(n_clinical=2, dim=64)
    source = build_classifier(config, encoder, encoder_weights=encoder.state_dict())
    target = build_classifier(config, MRIEncoder(EncoderConfig.tiny()), encoder_weights=encoder.state_dict())
    load_trainable_state(target, trainable_state(source))
    torch.testing.assert_close(target.state_dict(), source.state_dict())
    with pytest.raises(ValueError, match=r"trainable state does not match the model: missing \['head\."):
        load_trainable_state(target, {"encoder.vit.norm.weight": torch.ones(64)})


def test_multimodal_attention_maps_match_forward():
    torch.manual_seed(4)
    head = MultimodalHead(HeadConfig(n_clinical=3, dim=8, num_heads=2, n_clinical_tokens=4)).eval()
    tokens, clinical = torch.randn(2, 27, 8), torch.randn(2, 3)
    maps = head.attention_maps(tokens, clinical)
    assert maps["cross_attention"].shape == (2, 4, 27) and maps["pool_weights"].shape == (2, 8)
    torch.testing.assert_close(maps["cross_attention"].sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(maps["pool_weights"].sum(-1), torch.ones(2))
    torch.testing.assert_close(maps["logits"], head(tokens, clinical))
