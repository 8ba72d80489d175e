"""Slow: calibration of the E2E bands when the data come from the model itself.

For a fixed step composition and request windows, step durations are drawn from
the model (``calib.model.simulate_from_model``) with a new noise seed per
replicate, a real NUTS posterior is fitted to the ~10 % sampled steps, and the
90 % posterior predictive bands of every experiment's mean E2E are checked
against the realised (teacher-forced) means. Steps are separated by host gaps
(60 µs, sd 18 µs) that the replay measures from the sampled steps' timestamps, as
on real traces. Across replicates the coverage must be consistent with the
nominal 90 % (two-sided binomial test at the 1 % level).

Measured 2026-12-03 on the finite-mean noise model (calib.noise; bands with parameter
uncertainty, full-tail step noise and the structural discrepancy): 29/30 = 0.967
(binomial p 0.36), 9.6 min of CPU, 21 min 47 s wall on the 2-core machine at load 9-11.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset, quick_posterior
from scipy.stats import binomtest

from calib.e2e import replay

SEEDS = (11, 12, 13, 14, 15)


@pytest.mark.slow
def test_e2e_bands_cover_true_means_at_nominal_rate():
    inside = total = 0
    for s in SEEDS:
        ds, features, _ = make_replay_dataset(
            seed=0,
            noise_seed=s,
            exps_per_model=3,
            steps_per_exp=900,
            requests_per_exp=40,
            gap_us=60.0,
            gap_sd_us=18.0,
        )
        idata = quick_posterior(ds, features, draws=300, warmup=300, seed=s)
        res = replay(idata, ds, features=features, prob=0.9, draws=300, seed=s, baselines=False)
        sub = res.table[res.table.metric == "e2e"]
        inside += int(sub.inside.sum())
        total += len(sub)
    rate = inside / total
    print(f"E2E coverage {inside}/{total} = {rate:.3f}")
    p = binomtest(inside, total, 0.9).pvalue
    assert p > 0.01, f"E2E coverage {inside}/{total} = {rate:.2f} inconsistent with 0.90"
    assert 0.75 <= rate <= 1.0
    assert np.isfinite(rate)
