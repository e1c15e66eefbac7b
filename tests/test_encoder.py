import pytest
import torch

from psp_model.nets.encoder import (
    EncoderConfig,
    MRIEncoder,
    SSLAutoencoder,
    encoder_fingerprint,
    encoder_state_dict,
)


def test_full_config_gives_512_tokens_of_width_768():
    """The paper's encoder, built and run once on 1 x 2 x 160^3 (about 5 s on one CPU thread)."""
    torch.manual_seed(0)
    encoder = MRIEncoder(EncoderConfig.full())
    assert (encoder.n_tokens, encoder.hidden_size) == (512, 768)
    with torch.no_grad():
        tokens = encoder(torch.randn(1, 2, 160, 160, 160))
    assert tokens.shape == (1, 512, 768)


def test_tiny_encoder_output_shape():
    encoder = MRIEncoder(EncoderConfig.tiny())
    assert encoder(torch.randn(3, 2, 32, 32, 32)).shape == (3, 64, 64)


def test_small_config_keeps_512_tokens():
    assert EncoderConfig.small().n_tokens == 512


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": (160, 160, 150)}, r"img_size \(160, 160, 150\) must be divisible by patch_size"),
        ({"hidden_size": 100}, r"hidden_size 100 must be divisible by num_heads 12"),
        ({"in_channels": 0}, r"in_channels must be a positive int, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\], got 1.5"),
        ({"patch_size": (20, 20)}, r"patch_size must be a tuple of 3 positive ints"),
        ({"num_layers": 0}, r"num_layers must be a positive int, got 0"),
    ],
)
def test_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**kwargs)


def test_encoder_rejects_wrong_input_shape():
    encoder = MRIEncoder(EncoderConfig.tiny())
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 2, 32, 32, 32\), got \(1, 2, 32, 32, 16\)"):
        encoder(torch.randn(1, 2, 32, 32, 16))


def test_save_attn_needs_einsum_attention():
    with pytest.raises(ValueError, match="save_attn=True needs use_flash_attention=False"):
        MRIEncoder(EncoderConfig.tiny(), use_flash_attention=True, save_attn=True)
    encoder = MRIEncoder(EncoderConfig.tiny(), save_attn=True)
    encoder(torch.randn(1, 2, 32, 32, 32))
    assert encoder.vit.blocks[0].attn.att_mat.shape == (1, 4, 64, 64)


def test_attention_path_chosen_per_call():
    encoder = MRIEncoder(EncoderConfig.tiny())
    x = torch.randn(1, 2, 32, 32, 32)
    encoder(x)
    assert encoder.vit.blocks[0].attn.use_flash_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(x)
    assert not encoder.vit.blocks[0].attn.use_flash_attention


def test_decoder_output_is_fp32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = SSLAutoencoder(EncoderConfig.tiny())(torch.randn(1, 2, 32, 32, 32))
    assert recon.dtype == torch.float32


def test_fused_attention_matches_einsum_attention():
    torch.manual_seed(0)
    fused = SSLAutoencoder(EncoderConfig.tiny(), use_flash_attention=True)
    plain = SSLAutoencoder(EncoderConfig.tiny(), use_flash_attention=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 2, 32, 32, 32)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("img_size", "patch_size"),
    [((32, 32, 32), (8, 8, 8)), ((16, 14, 20), (8, 7, 10)), ((40, 40, 40), (20, 20, 20))],
)
def test_decoder_reconstructs_input_shape(img_size, patch_size):
    config = EncoderConfig(img_size=img_size, patch_size=patch_size, hidden_size=32, mlp_dim=64, num_layers=1,
                           num_heads=4)
    x = torch.randn(2, 2, *img_size)
    assert SSLAutoencoder(config)(x).shape == x.shape


def test_full_decoder_upsamples_by_4_then_5():
    model = SSLAutoencoder(EncoderConfig(hidden_size=16, mlp_dim=16, num_layers=1, num_heads=4))
    assert model.decoder.up1.stride == (4, 4, 4) and model.decoder.up2.stride == (5, 5, 5)
    assert model.decoder.up2.out_channels == 2


def test_decoder_channels_validated():
    with pytest.raises(ValueError, match="decoder_channels must be a positive int, got 0"):
        SSLAutoencoder(EncoderConfig.tiny(), decoder_channels=0)


def test_state_dict_names_are_prefixed():
    keys = SSLAutoencoder(EncoderConfig.tiny()).state_dict().keys()
    assert {key.split(".")[0] for key in keys} == {"encoder", "decoder"}


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    a = MRIEncoder(EncoderConfig.tiny())
    torch.manual_seed(0)
    b = MRIEncoder(EncoderConfig.tiny())
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    assert len(encoder_fingerprint(a)) == 64
    with torch.no_grad():
        b.vit.norm.weight[0] += 1e-6
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    fp32 = encoder_fingerprint(a)
    assert encoder_fingerprint(a.to(torch.bfloat16)) != fp32


def test_pretrained_encoder_loads_alone():
    autoencoder = SSLAutoencoder(EncoderConfig.tiny())
    encoder = MRIEncoder(EncoderConfig.tiny())
    encoder.load_state_dict(encoder_state_dict(autoencoder.state_dict()))
    assert encoder_fingerprint(encoder) == encoder_fingerprint(autoencoder.encoder)


def test_encoder_state_dict_needs_encoder_entries():
    with pytest.raises(ValueError, match=r"no 'encoder\.\*' entries .*first keys: \['vit"):
        encoder_state_dict(MRIEncoder(EncoderConfig.tiny()).state_dict())
