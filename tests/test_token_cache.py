"""Frozen-encoder token cache: encode once per encoder version; fold ensembles encode once per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psp_model.nets.encoder import EncoderConfig, MRIEncoder, encoder_fingerprint
from psp_model.nets.fusion import HeadConfig, build_head
from psp_model.train.token_cache import encode_cached, ensemble_predict, tensor_hash


class CallCounter:
    """Counts encoder forward calls and the volumes they saw."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.volumes = 0, 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.volumes += inputs[0].shape[0]


@pytest.fixture
def encoder() -> MRIEncoder:
    torch.manual_seed(0)
    return MRIEncoder(EncoderConfig.tiny())


@pytest.fixture
def volumes() -> torch.Tensor:
    return torch.randn(3, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def test_encodes_once_then_hits_the_cache(encoder, volumes, tmp_path):
    counter = CallCounter(encoder)
    first = encode_cached(encoder, volumes, cache_dir=tmp_path, device="cpu", batch_size=2)
    assert counter.calls == 2 and counter.volumes == 3
    second = encode_cached(encoder, list(volumes), cache_dir=tmp_path, device="cpu")
    assert counter.calls == 2
    assert first.shape == (3, encoder.n_tokens, encoder.hidden_size) and first.dtype == torch.float32
    torch.testing.assert_close(second, first)
    with torch.no_grad():
        torch.testing.assert_close(first, encoder.eval()(volumes))
    assert sorted(p.name for p in (tmp_path / encoder_fingerprint(encoder)).iterdir()) == sorted(
        f"{tensor_hash(v)}.pt" for v in volumes
    )


def test_only_misses_are_encoded_and_caller_keys_are_used(encoder, volumes, tmp_path):
    counter = CallCounter(encoder)
    encode_cached(encoder, volumes[:2], ["a", "b"], cache_dir=tmp_path, device="cpu")
    encode_cached(encoder, volumes, ["a", "b", "c"], cache_dir=tmp_path, device="cpu")
    assert counter.volumes == 3
    assert (tmp_path / encoder_fingerprint(encoder) / "c.pt").exists()


def test_new_encoder_weights_miss_the_cache(encoder, volumes, tmp_path):
    counter = CallCounter(encoder)
    before = encode_cached(encoder, volumes, cache_dir=tmp_path, device="cpu")
    with torch.no_grad():
        encoder.vit.norm.bias.add_(0.5)
    after = encode_cached(encoder, volumes, cache_dir=tmp_path, device="cpu")
    assert counter.volumes == 6
    assert not torch.allclose(before, after)


def test_unreadable_entry_is_re_encoded_with_a_warning(encoder, volumes, tmp_path):
    encode_cached(encoder, volumes[:1], ["x"], cache_dir=tmp_path, device="cpu")
    (tmp_path / encoder_fingerprint(encoder) / "x.pt").write_bytes(b"not a tensor")
    with pytest.warns(UserWarning, match="x.pt is unreadable"):
        tokens = encode_cached(encoder, volumes[:1], ["x"], cache_dir=tmp_path, device="cpu")
    assert tokens.shape == (1, 64, 64)
    torch.save(torch.zeros(3), tmp_path / encoder_fingerprint(encoder) / "x.pt")
    with pytest.warns(UserWarning, match=r"holds \(3,\), expected \(64, 64\)"):
        encode_cached(encoder, volumes[:1], ["x"], cache_dir=tmp_path, device="cpu")


def test_encode_cached_rejects_bad_arguments(encoder, volumes, tmp_path):
    with pytest.raises(ValueError, match="got 1 keys for 3 volumes"):
        encode_cached(encoder, volumes, ["a"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        encode_cached(encoder, volumes, cache_dir=tmp_path, batch_size=0)


def test_ensemble_of_five_heads_encodes_once(encoder, volumes):
    torch.manual_seed(2)
    heads = [build_head(HeadConfig(n_clinical=3, dim=encoder.hidden_size)).eval() for _ in range(5)]
    counter = CallCounter(encoder)
    clinical = np.array([0.1, -1.0, 2.0], dtype=np.float32)
    mean, per_fold = ensemble_predict(encoder, heads, volumes[0], clinical, device="cpu")
    assert counter.calls == 1
    with torch.no_grad():
        tokens = encoder(volumes[:1])
        expected = [torch.sigmoid(h(tokens, torch.from_numpy(clinical)[None])).item() for h in heads]
    np.testing.assert_allclose(per_fold, expected, rtol=1e-5)
    assert mean == pytest.approx(np.mean(expected))
    assert len(set(np.round(per_fold, 6))) == 5


def test_ensemble_predict_rejects_bad_input(encoder, volumes):
    head = build_head(HeadConfig(n_clinical=3, dim=encoder.hidden_size))
    with pytest.raises(ValueError, match="at least one head"):
        ensemble_predict(encoder, [], volumes[0], np.zeros(3))
    with pytest.raises(ValueError, match=r"or \(1, C, D, H, W\); got \(3, 2, 32, 32, 32\)"):
        ensemble_predict(encoder, [head], volumes, np.zeros(3))
