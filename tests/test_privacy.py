"""Differential privacy of site updates: clipping, noise of the promised size, and honest epsilon accounting."""

from __future__ import annotations

import numpy as np
import pytest

from psp_model.privacy import epsilon_spent, privatize_update
from psp_model.sites import DPPolicy


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"encoder.w": (scale * rng.normal(size=(40, 30))).astype(np.float32),
            "head.b": (scale * rng.normal(size=7)).astype(np.float32)}


def _update(released: dict, global_: dict) -> np.ndarray:
    return np.concatenate([(released[n].astype(np.float64) - global_[n]).ravel() for n in sorted(global_)])


def test_dp_off_sends_the_local_arrays_unchanged():
    rng = np.random.default_rng(0)
    global_, local = _arrays(rng), _arrays(rng)
    released, norm = privatize_update(local, global_, None)
    assert released.keys() == local.keys() and all(released[n] is local[n] for n in local)
    assert norm == pytest.approx(np.linalg.norm(_update(local, global_)))


def test_update_is_clipped_to_clip_norm_keeping_its_direction():
    rng = np.random.default_rng(1)
    global_, local = _arrays(rng), _arrays(rng, scale=3.0)
    dp = DPPolicy(clip_norm=0.5, noise_multiplier=1e-9, delta=1e-5)
    released, norm = privatize_update(local, global_, dp, np.random.default_rng(2))
    raw, sent = _update(local, global_), _update(released, global_)
    assert norm == pytest.approx(np.linalg.norm(raw)) and norm > 0.5
    assert np.linalg.norm(sent) <= 0.5 * (1 + 1e-5)
    assert np.dot(raw, sent) / (np.linalg.norm(raw) * np.linalg.norm(sent)) == pytest.approx(1.0, abs=1e-6)
    assert {n: a.dtype for n, a in released.items()} == {n: a.dtype for n, a in local.items()}


def test_small_update_is_not_scaled():
    rng = np.random.default_rng(3)
    global_ = _arrays(rng)
    local = {n: a + np.float32(1e-4) for n, a in global_.items()}
    dp = DPPolicy(clip_norm=10.0, noise_multiplier=1e-9, delta=1e-5)
    released, _ = privatize_update(local, global_, dp, np.random.default_rng(4))
    np.testing.assert_allclose(_update(released, global_), _update(local, global_), atol=1e-6)


def test_noise_has_std_noise_multiplier_times_clip_norm_in_every_array():
    global_ = {"encoder.w": np.zeros((400, 500)), "head.b": np.zeros(100_000)}
    dp = DPPolicy(clip_norm=0.3, noise_multiplier=1.7, delta=1e-5)
    released, norm = privatize_update(global_, global_, dp, np.random.default_rng(5))
    assert norm == 0.0
    for name, noise in released.items():
        assert noise.std() == pytest.approx(0.51, rel=0.01), name
        assert abs(noise.mean()) < 0.01
    first = privatize_update(global_, global_, dp)[0]["head.b"]
    assert not np.array_equal(first, privatize_update(global_, global_, dp)[0]["head.b"])  # fresh entropy


@pytest.mark.parametrize(("local", "global_", "dp", "message"), [
    ({"a": np.zeros(2)}, {"b": np.zeros(2)}, None, r"local and global arrays differ: only local \['a'\], only global"),
    ({"a": np.zeros(2)}, {"a": np.zeros(3)}, None, r"arrays \['a'\] have local shapes \[\(2,\)\] but global shapes"),
    ({"n": np.zeros(2, np.int64)}, {"n": np.zeros(2, np.int64)}, DPPolicy(1.0, 1.0, 1e-5),
     r"arrays \['n'\] are not floating point: noise cannot be added"),
])
def test_mismatched_or_integer_arrays_are_refused(local, global_, dp, message):
    with pytest.raises(ValueError, match=message):
        privatize_update(local, global_, dp)


def _textbook_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Gaussian mechanism, sensitivity 2C (two clipped updates), noise z C: RDP(alpha) = alpha (2C)^2 / (2 (zC)^2)
    per round (Mironov 2017, Prop. 7), summed over rounds, converted with Balle et al. 2020, Thm. 21."""
    alpha = 1 + np.geomspace(1e-4, 1e5, 200_000)
    rdp = rounds * alpha * 4 / (2 * noise_multiplier**2)
    return float(np.min(rdp + np.log((alpha - 1) / alpha) - (np.log(delta) + np.log(alpha)) / (alpha - 1)))


@pytest.mark.parametrize(("noise_multiplier", "rounds"), [(0.8, 1), (1.0, 10), (2.0, 30), (10.0, 5)])
def test_epsilon_matches_the_gaussian_rdp_formula(noise_multiplier, rounds):
    dp = DPPolicy(clip_norm=1.0, noise_multiplier=noise_multiplier, delta=1e-5)
    epsilon = epsilon_spent(dp, rounds)
    assert epsilon == pytest.approx(_textbook_epsilon(noise_multiplier, rounds, 1e-5), rel=1e-3)
    rho = 2 * rounds / noise_multiplier**2  # the classic conversion is looser, never tighter
    assert epsilon <= rho + 2 * np.sqrt(rho * np.log(1 / 1e-5))


def test_epsilon_falls_with_noise_and_grows_with_rounds():
    by_noise = [epsilon_spent(DPPolicy(1.0, z, 1e-5), 10) for z in (0.5, 1.0, 2.0, 8.0)]
    by_rounds = [epsilon_spent(DPPolicy(1.0, 1.0, 1e-5), r) for r in (1, 2, 10, 100)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert epsilon_spent(DPPolicy(1.0, 1.0, 1e-5), 0) == 0.0
    assert epsilon_spent(DPPolicy(5.0, 1.0, 1e-5), 10) == by_rounds[2]  # scale-free: only z matters


def test_negative_rounds_are_refused():
    with pytest.raises(ValueError, match="rounds must be 0 or more, got -1"):
        epsilon_spent(DPPolicy(1.0, 1.0, 1e-5), -1)
