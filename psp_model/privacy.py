"""Differential privacy of a site's model updates: clip the update, add Gaussian noise, account epsilon.

The site applies it to every model update before the update leaves (``privacy.dp`` in its config),
whatever the server asks. The released update is ``global + clip(local - global) + N(0, (z C)^2 I)``
with ``C = clip_norm`` and ``z = noise_multiplier``: the Gaussian mechanism of DP-FedAvg
(McMahan et al. 2018, https://arxiv.org/abs/1710.06963), here run by the site itself.

Accounting: any two datasets of the site (one patient more, fewer or changed, or a different site
altogether) give clipped updates at most ``2 C`` apart, so each round is the Gaussian mechanism with
L2 sensitivity ``2 C`` and noise ``z C``, i.e. noise multiplier ``z / 2`` relative to the sensitivity,
applied to the whole site's data (sampling rate 1). Rounds compose; Opacus' RDP accountant turns
the total into (epsilon, delta). Only model updates are covered: counts and losses sent beside
them are not noised.
"""

from __future__ import annotations

import numpy as np

from psp_model.sites import DPPolicy

__all__ = ["RDP_ORDERS", "epsilon_spent", "privatize_update"]

RDP_ORDERS: tuple[float, ...] = tuple(1.0 + np.geomspace(1e-3, 1e4, 400))
"""Renyi orders searched for the tightest epsilon (wider than Opacus' default 1.1-63, so the optimum
is inside the grid for both very small and very large noise)."""


def privatize_update(local: dict[str, np.ndarray], global_: dict[str, np.ndarray], dp: DPPolicy | None,
                     rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Clip ``local - global_`` (all arrays as one vector) to ``dp.clip_norm``, add noise, return it with the norm.

    Args:
        local: the site's trained arrays (floating point), to be sent.
        global_: the global arrays the round started from (same names and shapes).
        dp: the site's policy; ``None`` returns ``local`` unchanged.
        rng: source of the noise. ``None`` (what a site must use) draws fresh OS entropy; a generator
            seeded from anything the server knows (the study seed) would let it subtract the noise,
            so pass one only in tests.

    Returns:
        ``(global_ + noisy clipped update, in local's dtypes; L2 norm of the update before clipping)``.
        The norm depends on the data: keep it at the site (logs), never send it.
    """
    if set(local) != set(global_):
        raise ValueError(f"local and global arrays differ: only local {sorted(set(local) - set(global_))}, "
                         f"only global {sorted(set(global_) - set(local))}")
    shapes = [n for n in sorted(local) if np.shape(local[n]) != np.shape(global_[n])]
    if shapes:
        raise ValueError(f"arrays {shapes} have local shapes {[np.shape(local[n]) for n in shapes]} but global "
                         f"shapes {[np.shape(global_[n]) for n in shapes]}")
    not_float = [n for n in sorted(local) if not np.issubdtype(np.asarray(local[n]).dtype, np.floating)]
    if dp is not None and not_float:
        raise ValueError(f"arrays {not_float} are not floating point: noise cannot be added, and sent as they are "
                         "they would leak what DP protects. Fix: leave them out of the update")
    delta = {n: np.asarray(local[n], dtype=np.float64) - np.asarray(global_[n], dtype=np.float64) for n in local}
    norm = float(np.sqrt(sum(np.sum(d * d) for d in delta.values())))
    if dp is None:
        return dict(local), norm
    rng = rng if rng is not None else np.random.default_rng()
    scale = min(1.0, dp.clip_norm / norm) if norm > 0 else 1.0
    std = dp.noise_multiplier * dp.clip_norm
    noisy = {}
    for name in sorted(local):
        update = delta[name] * scale + rng.normal(0.0, std, size=delta[name].shape)
        noisy[name] = (np.asarray(global_[name], dtype=np.float64) + update).astype(np.asarray(local[name]).dtype)
    return noisy, norm


def epsilon_spent(dp: DPPolicy, rounds: int) -> float:
    """Epsilon of ``rounds`` released updates at ``dp.delta`` (Opacus RDP accountant, sampling rate 1).

    Depends on the policy and the count of updates only, not on the data, so it may be reported.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be 0 or more, got {rounds}")
    if rounds == 0:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # opacus's package import takes seconds

    orders = list(RDP_ORDERS)
    rdp = compute_rdp(q=1.0, noise_multiplier=dp.noise_multiplier / 2, steps=rounds, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=dp.delta)
    return float(epsilon)
