"""Simulation-based calibration of the pooled model (slow).

Run: ``python -m pytest -m slow tests/test_sbc.py -q``. Measured 2026-11-22: passed,
522 s of CPU (one core), 12.5 min wall on a 2-core machine at load 4-7; expect ~9 min on
an idle one.

For each replication a truth is drawn from the prior, data simulated from it
(300 steps), and the posterior sampled (1 chain, 300 warmup, 297 draws thinned to
99). The rank of the truth among the 99 draws is uniform on 0..99 if inference is
calibrated (Talts et al. 2018). One compiled sampler serves all replications (the
observed values are a traced argument). Each parameter's ranks are binned into 10
bins and tested with a chi-square test; all must pass at the Bonferroni level 0.001.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, Predictive, init_to_median
from scipy import stats

from calib.fit import release_compiled_near_map_limit
from calib.model import OBS_SITE, pooled, synthetic_model_data
from calib.priors import load_priors

pytestmark = pytest.mark.slow

PRIORS = load_priors()
N_REPS = 80
THIN = 3
PARAMS = {
    "b_pop": (lambda v: v[..., 0]),
    "b_pop_dc_kv": (lambda v: v[..., 3]),
    "b_pop_weight": (lambda v: v[..., 4]),
    "per_request_us": None,
    "per_step_us": None,
    "alpha": None,
    "sigma_pooled": None,
    "stall_frac": None,
    "stall_log_mult": None,
    "stall_sd_frac": None,
    "fast_frac": None,
    "fast_log_mult": None,
    "fast_sd_frac": None,
}


def _get(values, name):
    site = "b_pop" if name.startswith("b_pop") else name
    f = PARAMS[name]
    v = np.asarray(values[site])
    return f(v) if f else v


def test_sbc_ranks_are_uniform():
    # this test drives NumPyro's MCMC itself: it releases compiled programs as
    # calib.fit.run_nuts does, or a one-process slow suite reaches vm.max_map_count (seen:
    # 36,000 mappings when this test began, +~1,000 per replication, abort at ~65,000)
    design = synthetic_model_data(300, 1, 2, seed=0, tp2_models=())

    def conditioned(log_y):
        with handlers.condition(data={OBS_SITE: log_y}):
            pooled(design, PRIORS)

    mcmc = MCMC(
        NUTS(conditioned, dense_mass=True, target_accept_prob=0.9, init_strategy=init_to_median),
        num_warmup=300,
        num_samples=99 * THIN,
        num_chains=1,
        progress_bar=False,
        jit_model_args=True,
    )
    prior = Predictive(pooled, num_samples=N_REPS)(jax.random.key(1), design, PRIORS)
    ranks = {k: [] for k in PARAMS}
    divergent = 0
    for r in range(N_REPS):
        release_compiled_near_map_limit()  # each run here leaves ~1,000 mappings behind
        log_y = np.asarray(prior[OBS_SITE][r])
        mcmc.run(jax.random.key(100 + r), log_y, extra_fields=("diverging",))
        divergent += int(np.sum(mcmc.get_extra_fields()["diverging"]))
        post = {k: np.asarray(v)[::THIN] for k, v in mcmc.get_samples().items()}
        for name in PARAMS:
            truth = _get({k: v[r] for k, v in prior.items()}, name)
            ranks[name].append(int(np.sum(_get(post, name) < truth)))
    assert divergent <= N_REPS  # at most ~1 divergent transition per replication on average
    for name, rk in ranks.items():
        counts = np.bincount(np.asarray(rk) * 10 // 100, minlength=10)
        p = stats.chisquare(counts).pvalue
        assert p > 1e-3, f"{name}: rank histogram {counts.tolist()} (p={p:.2g})"
