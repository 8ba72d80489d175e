"""Random-effects pooling (calib.pooling): both estimators recover a known tau and mean,
find none where there is none, and broadcast over leading (bootstrap) axes."""

from __future__ import annotations

import numpy as np
import pytest

from calib.pooling import random_effects, unweighted_moments

MU, TAU = 0.02, 0.01


def _groups(seed: int, n: int, tau: float = TAU, reps: int = 200):
    rng = np.random.default_rng(seed)
    se = rng.uniform(0.002, 0.01, (reps, n))
    effect = MU + tau * rng.standard_normal((reps, n))
    return effect + se * rng.standard_normal((reps, n)), se**2


@pytest.mark.parametrize("n", [16, 64])
def test_unweighted_moments_are_unbiased_for_mu_and_tau_squared(n):
    x, se2 = _groups(0, n)
    mu, tau = unweighted_moments(x, se2)  # one call over 200 replicate data sets
    assert mu.shape == tau.shape == (200,)
    assert abs(mu.mean() - MU) < 3 * TAU / np.sqrt(n * 200) + 1e-4
    # tau² is unbiased before truncation at 0; with n >= 16 truncation is rare
    assert abs(np.mean(tau**2) / TAU**2 - 1.0) < 0.15


def test_dersimonian_laird_recovers_tau_and_shrinks_towards_the_pooled_mean():
    x, se2 = _groups(1, 64)
    shrunk, mu, tau, q = random_effects(x, se2)
    assert shrunk.shape == x.shape and mu.shape == tau.shape == q.shape == (200,)
    assert abs(mu.mean() - MU) < 5e-4
    assert abs(np.median(tau) / TAU - 1.0) < 0.15
    # every group moves towards the pooled mean, never past it
    d_before = x - mu[:, None]
    d_after = shrunk - mu[:, None]
    assert np.all(np.abs(d_after) <= np.abs(d_before) + 1e-15)
    assert np.all(d_after * d_before >= 0)


@pytest.mark.parametrize("estimator", ["dl", "unweighted"])
def test_no_between_group_spread_gives_tau_near_zero(estimator):
    x, se2 = _groups(2, 16, tau=0.0)
    tau = random_effects(x, se2)[2] if estimator == "dl" else unweighted_moments(x, se2)[1]
    # truncated at 0: about half the replicates are exactly 0, the rest small
    assert np.mean(tau == 0.0) > 0.3
    assert np.median(tau) < 0.3 * TAU


def test_an_exactly_known_group_does_not_make_the_weights_infinite():
    x = np.array([0.01, 0.02, 0.03])
    shrunk, mu, tau, _ = random_effects(x, np.array([0.0, 1e-6, 1e-6]))
    assert np.all(np.isfinite(shrunk)) and np.isfinite(mu) and np.isfinite(tau)
