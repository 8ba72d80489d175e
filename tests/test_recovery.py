"""Parameter recovery on data simulated from the model itself (slow).

Run: ``/work/venv/bin/pytest -m slow tests/test_recovery.py -q`` (a few minutes).

Truth is drawn per seed from a realistic generator (corrections ~1-3, overheads
around the prior medians, noise 3-15 %), and the 90 % posterior intervals must cover
it at a rate consistent with 90 % over seeds and parameters (a binomial test that
fails for a biased or over-/under-confident fit). (Truths drawn from the full prior
include extreme overheads that dwarf the weight term; see the report's open problems.) Alpha is recovered when
mixed batches are present and stays at its prior when they are absent.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS, init_to_median
from scipy import stats

from calib.model import get_model, simulate_from_model, synthetic_model_data
from calib.priors import load_priors

pytestmark = pytest.mark.slow

PRIORS = load_priors()
SEEDS = (11, 12, 13, 14, 15)


def _fit(hierarchy, data, seed, draws=500):
    mcmc = MCMC(NUTS(get_model(hierarchy), dense_mass=True, target_accept_prob=0.9,
                     init_strategy=init_to_median),
                num_warmup=500, num_samples=draws, num_chains=2, chain_method="sequential",
                progress_bar=False)
    mcmc.run(jax.random.key(seed), data, PRIORS, extra_fields=("diverging",))
    return mcmc.get_samples(), int(np.sum(mcmc.get_extra_fields()["diverging"]))


def _scalars(values: dict, active: np.ndarray) -> dict[str, float]:
    out = {}
    for m, k in zip(*np.nonzero(active), strict=True):
        out[f"b[{m},{k}]"] = values["b"][..., m, k]
    for name in ("per_layer_us", "per_request_us", "per_step_us", "alpha", "nu"):
        out[name] = values[name]
    for m in range(active.shape[0]):
        out[f"sigma[{m}]"] = values["sigma"][..., m]
    return out


def test_interval_coverage_over_seeds():
    covered = total = 0
    for seed in SEEDS:
        design = synthetic_model_data(3000, 2, 2, seed=seed, tp2_models=(1,))
        rng = np.random.default_rng(seed)
        base = np.array([1.8, 1.5, 2.5, 1.6, 1.15, 2.0])
        truth = dict(b=base * np.exp(rng.normal(0, 0.25, (2, 6))),
                     per_layer_us=10.0 * np.exp(rng.normal(0, 0.5)),
                     per_request_us=10.0 * np.exp(rng.normal(0, 0.5)),
                     per_step_us=100.0 * np.exp(rng.normal(0, 0.5)),
                     alpha=rng.uniform(0.2, 0.8), sigma=rng.uniform(0.03, 0.15, 2),
                     nu=rng.uniform(4.0, 30.0))
        y, truth = simulate_from_model("per-model", design, params=truth, seed=seed)
        if not np.all(np.isfinite(y)):
            continue
        data = design._replace(duration_us=y, log_duration=np.log(y))
        post, div = _fit("per-model", data, seed)
        assert div <= 5, f"seed {seed}: {div} divergences"
        t = _scalars(truth, design.active)
        p = _scalars({k: np.asarray(v) for k, v in post.items()}, design.active)
        for name, draws in p.items():
            lo, hi = np.quantile(draws, [0.05, 0.95])
            covered += int(lo <= float(t[name]) <= hi)
            total += 1
    assert total >= 80
    pval = stats.binomtest(covered, total, 0.9).pvalue
    assert pval > 1e-3, f"coverage {covered}/{total} = {covered / total:.2f}"


@pytest.mark.parametrize("mixed_fraction", [0.3, 0.0])
def test_alpha_needs_mixed_batches(mixed_fraction):
    design = synthetic_model_data(3000, 2, 2, seed=5, mixed_fraction=mixed_fraction)
    truth = dict(b=np.array([[1.8, 1.5, 2.5, 1.6, 1.15, 2.0], [1.6, 1.4, 2.2, 1.9, 1.3, 2.4]]),
                 per_layer_us=8.0, per_request_us=12.0, per_step_us=150.0, alpha=0.8,
                 sigma=np.array([0.05, 0.08]), nu=8.0)
    y, _ = simulate_from_model("per-model", design, params=truth, seed=6)
    post, div = _fit("per-model", design._replace(duration_us=y, log_duration=np.log(y)), 7)
    a = np.asarray(post["alpha"])
    prior = PRIORS["alpha"]
    prior_sd = np.sqrt(2 * 2 / (4**2 * 5))  # Beta(2, 2)
    assert prior.kwargs == {"a": 2.0, "b": 2.0}
    if mixed_fraction > 0:
        assert abs(a.mean() - 0.8) < max(3 * a.std(), 0.02)
        assert a.std() < 0.1
    else:
        assert abs(a.mean() - 0.5) < 0.05
        assert a.std() > 0.8 * prior_sd
