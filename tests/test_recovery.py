"""Parameter recovery on data simulated from the model itself (slow).

Run: ``python -m pytest -m slow tests/test_recovery.py -q`` (add ``-s`` for the
coverage and divergence summary). 7 fits of 3000 steps, 2 chains x (500 warmup + 500
draws) each, sequential, through :func:`calib.fit.run_nuts` with the project's
max_tree_depth and dense mass but ``TARGET_ACCEPT`` 0.99 (see there). Measured
2026-11-22 (model of 22:05, overheads bounded below the pinned constants): 275 s wall
(269 s CPU) on the 2-core machine at load 3-4. Result: coverage 86/90 (P(X >= 86) = 0.047
under Binomial(90, 0.9)), 0 divergences in all 7 fits; alpha 0.774 ± 0.017 (truth 0.8)
with mixed batches, 0.508 ± 0.209 (prior 0.5 ± 0.224) without. On the finite-mean noise
model with the fast component in the truth (2026-12-03): coverage 133/140 (P(X >= 133) =
0.026 under Binomial(140, 0.9)), divergences 0, 0, 1, 0, 0; alpha 0.765 ± 0.017 (truth
0.8) and 0.493 ± 0.228; 2319 s wall at load 12 -> 1.5 (beside test_pymc_agree).

Coverage: truth is drawn per seed from a realistic generator (corrections ~1-3,
overheads around the prior medians, noise 3-15 %, stalls 0.5-5 % of steps at x1.5-4.5,
fast steps 0.5-4 % per model at x0.45-0.8), and the 90 % equal-tailed posterior
intervals of every named parameter with a truth must cover it at a rate consistent with
90 % over 5 seeds. Those are 28 per seed, 140 in all: ``b`` of each active (model,
component) pair (11), the three overheads, ``alpha``, the pooled stall component
``stall_prob``, ``stall_log_mult``, ``stall_log_sd``, and per model the body ``sigma``,
the fast component ``fast_prob``, ``fast_log_mult``, ``fast_log_sd`` and the mean factor
E[y]/m (``mean_factor``, the noise model's finite mean that every predicted sum uses).
The count of covered intervals must not lie in either binomial tail of probability
< 0.001 (Binomial(n, 0.9)), so a biased or over-/under-confident fit fails. The binomial
treats the intervals as independent; within one seed they are not (e.g. ``b[m,
weight]``, ``per_layer_us`` and ``per_step_us`` share one ridge; ``mean_factor[m]`` is a
function of the noise parameters), which widens the true spread of the count, so the
bound errs on the strict side. Over-coverage is expected for directions the data leave
to the prior (the generator is narrower than the prior). (Truths drawn from the full prior include
extreme overheads that dwarf the weight term; the prior-calibration check is
tests/test_sbc.py.)

Alpha is recovered when mixed batches are present and stays at its prior (Beta(2, 2))
when they are absent (then it does not enter the likelihood at all).
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.checks import assert_binomial_coverage

from calib import config, noise
from calib.fit import SamplerSettings, run_nuts
from calib.model import get_model, model_coords, simulate_from_model, synthetic_model_data
from calib.priors import load_priors

pytestmark = pytest.mark.slow

PRIORS = load_priors()
SEEDS = (11, 12, 13, 14, 15)
#: Each binomial tail of the coverage count must have probability above this.
TAIL = 1e-3
CHAINS, WARMUP, DRAWS = 2, 500, 500
#: Chosen when the project default (config.SAMPLER.target_accept) was 0.95; now equal.
#: On these 3000-step problems 0.95 left 2-15 divergent transitions per fit with the
#: model of commit bc5b8bc (seeds 11-15: 4, 3, 14, 2, 3; alpha without mixed batches:
#: 15); 0.99 (step size ~0.08 instead of ~0.2, ~3x the leapfrog steps) left 0, 0, 0, 0,
#: 1 and 3, and 0 everywhere with the overheads bounded below the pinned constants
#: (working tree, 22:05).
TARGET_ACCEPT = 0.99
#: Divergent transitions allowed per fit (of CHAINS x DRAWS = 1000; the limit this test
#: has always had).
MAX_DIVERGENCES = 5


def _fit(hierarchy, data, seed):
    """Posterior draws (site -> (chains*draws, ...)) and the number of divergences."""
    coords = model_coords(
        data, [f"m{m}" for m in range(data.n_models)], [f"e{e}" for e in range(data.n_experiments)]
    )
    settings = SamplerSettings(
        chains=CHAINS,
        warmup=WARMUP,
        draws=DRAWS,
        seed=seed,
        chain_method="sequential",
        target_accept=TARGET_ACCEPT,
    )
    idata = run_nuts(
        get_model(hierarchy), data, PRIORS, coords=coords, settings=settings, progress=False
    )
    post = {
        k: np.asarray(v.values).reshape(-1, *v.shape[2:])
        for k, v in idata.posterior.data_vars.items()
    }
    return post, int(idata.sample_stats["diverging"].sum())


def _scalars(values: dict, active: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for m, k in zip(*np.nonzero(active), strict=True):
        out[f"b[{m},{config.COMPONENTS[k]}]"] = values["b"][..., m, k]
    for name in (
        "per_layer_us",
        "per_request_us",
        "per_step_us",
        "alpha",
        "stall_prob",
        "stall_log_mult",
        "stall_log_sd",
    ):
        out[name] = values[name]
    for m in range(active.shape[0]):
        for name in ("sigma", "fast_prob", "fast_log_mult", "fast_log_sd", "mean_factor"):
            out[f"{name}[{m}]"] = values[name][..., m]
    return out


def _truth(seed):
    rng = np.random.default_rng(seed)
    base = np.array([1.8, 1.5, 2.5, 1.6, 1.15, 2.0])
    return dict(
        b=base * np.exp(rng.normal(0, 0.25, (2, 6))),
        per_layer_us=10.0 * np.exp(rng.normal(0, 0.5)),
        per_request_us=10.0 * np.exp(rng.normal(0, 0.5)),
        per_step_us=100.0 * np.exp(rng.normal(0, 0.5)),
        alpha=rng.uniform(0.2, 0.8),
        sigma=rng.uniform(0.03, 0.15, 2),
        stall_prob=rng.uniform(0.005, 0.05),
        stall_log_mult=rng.uniform(0.4, 1.5),
        stall_log_sd=rng.uniform(0.1, 0.5),
        fast_prob=rng.uniform(0.005, 0.04, 2),
        fast_log_mult=rng.uniform(0.2, 0.8, 2),
        fast_log_sd=rng.uniform(0.05, 0.4, 2),
    )


def _with_mean_factor(truth: dict) -> dict:
    """``truth`` with the mean factor E[y]/m per model (as the model records it)."""
    n_models = np.shape(truth["sigma"])[0]
    par = (np.broadcast_to(truth[k], (n_models,)) for k in noise.NOISE_PARAMS)
    return {**truth, "mean_factor": noise.mean_factor(*par)}


def test_interval_coverage_over_seeds():
    covered = total = 0
    misses, divergences = [], {}
    for seed in SEEDS:
        design = synthetic_model_data(3000, 2, 2, seed=seed, tp2_models=(1,))
        y, truth = simulate_from_model("per-model", design, params=_truth(seed), seed=seed)
        assert np.all(np.isfinite(y)) and np.all(y > 0)
        data = design._replace(duration_us=y, log_duration=np.log(y))
        post, divergences[seed] = _fit("per-model", data, seed)
        t = _scalars(_with_mean_factor(truth), design.active)
        p = _scalars(post, design.active)
        for name, draws in p.items():
            lo, hi = np.quantile(draws, [0.05, 0.95])
            ok = bool(lo <= float(t[name]) <= hi)
            covered += ok
            total += 1
            if not ok:
                misses.append(
                    f"seed {seed} {name}: truth {float(t[name]):.4g} outside [{lo:.4g}, {hi:.4g}]"
                )
    assert total == 28 * len(SEEDS)
    msg = assert_binomial_coverage(
        covered, total, TAIL, f"divergences per seed {divergences}; misses: {misses}"
    )
    # divergent transitions mean the sampler may have missed part of the posterior
    assert max(divergences.values()) <= MAX_DIVERGENCES, msg


@pytest.mark.parametrize("mixed_fraction", [0.3, 0.0])
def test_alpha_needs_mixed_batches(mixed_fraction):
    design = synthetic_model_data(3000, 2, 2, seed=5, mixed_fraction=mixed_fraction)
    truth = dict(
        b=np.array([[1.8, 1.5, 2.5, 1.6, 1.15, 2.0], [1.6, 1.4, 2.2, 1.9, 1.3, 2.4]]),
        per_layer_us=8.0,
        per_request_us=12.0,
        per_step_us=150.0,
        alpha=0.8,
        sigma=np.array([0.05, 0.08]),
        stall_prob=0.02,
        stall_log_mult=0.7,
        stall_log_sd=0.3,
    )
    y, _ = simulate_from_model("per-model", design, params=truth, seed=6)
    post, div = _fit("per-model", design._replace(duration_us=y, log_duration=np.log(y)), 7)
    a = np.asarray(post["alpha"])
    print(f"mixed {mixed_fraction}: alpha {a.mean():.3f} ± {a.std():.3f}, {div} divergences")
    assert div <= MAX_DIVERGENCES
    assert PRIORS["alpha"].kwargs == {"a": 2.0, "b": 2.0}
    prior_sd = np.sqrt(2 * 2 / (4**2 * 5))  # Beta(2, 2): 0.224
    if mixed_fraction > 0:
        assert abs(a.mean() - 0.8) < max(3 * a.std(), 0.02)
        assert a.std() < 0.1
    else:
        # alpha does not enter the likelihood: its posterior is its prior (mean 0.5)
        assert abs(a.mean() - 0.5) < 0.05
        assert 0.8 * prior_sd < a.std() < 1.2 * prior_sd
