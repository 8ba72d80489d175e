"""Builders shared by the fit / posterior / CLI tests: synthetic model data and a
MOCK SAMPLER (prior draws of the real model shaped as chains x draws, plus fake
sample_stats) so I/O paths are tested without running NUTS."""

from __future__ import annotations

import functools

import jax
import numpy as np
from numpyro.infer import Predictive

from calib import config
from calib.fit import numpyro_to_idata
from calib.model import get_model, make_model_data, model_coords, step_time_us
from calib.priors import load_priors

MODELS = ("llama-2-7b", "qwen-7b")
EXPERIMENTS = ("llama-2-7b-chat", "llama-2-7b-code", "qwen-7b-chat", "qwen-7b-code")


@functools.cache
def priors():
    return load_priors(config.DEFAULT_PRIORS)


def synthetic_model_data(n_steps: int = 400, seed: int = 0, with_tp: bool = False):
    """ModelData (2 models x 2 experiments) with durations simulated from the model.

    Returns (data, coords, step_index, truth). ``step_index`` are fake global
    indices (every 3rd step of a bigger dataset) so the step coordinate is not 0..n-1.
    """
    rng = np.random.default_rng(seed)
    exp = rng.integers(0, 4, n_steps)
    midx = exp // 2
    has_pf = rng.random(n_steps) < 0.35
    pf_tok = np.where(has_pf, rng.integers(64, 2048, n_steps), 0)
    n_dc = np.where(has_pf & (rng.random(n_steps) < 0.5), 0, rng.integers(1, 64, n_steps))
    ctx = rng.integers(200, 3000, n_steps) * n_dc
    scale = np.where(midx == 0, 1.0, 1.6)
    comps = np.stack([pf_tok * 0.05 * scale, pf_tok * 0.004 * scale, n_dc * 0.3 * scale,
                      ctx * 0.0004 * scale, np.where(pf_tok + n_dc > 0, 4000.0 * scale, 0.0),
                      (pf_tok + n_dc) * 0.01 * (midx == 1) * with_tp], axis=1)
    layers = np.where(midx == 0, 32.0, 28.0)
    batch = (n_dc + (pf_tok > 0)).astype(float)
    base = make_model_data(comps, layers, batch, midx, exp, None, n_models=2, n_experiments=4)
    truth = {"b": np.array([[1.6, 1.3, 2.2, 1.5, 1.2, 2.0], [1.4, 1.8, 2.5, 1.3, 1.1, 2.0]]),
             "per_layer_us": 0.8, "per_request_us": 2.0, "per_step_us": 15.0, "alpha": 0.4,
             "sigma": np.array([0.08, 0.1]), "nu": 8.0}
    # noise drawn with NumPy (jax.random.t compiles a gamma sampler: slow on 2 cores)
    mu = np.asarray(step_time_us(truth, base))
    dur = mu * np.exp(truth["sigma"][midx] * rng.standard_t(truth["nu"], n_steps))
    data = make_model_data(comps, layers, batch, midx, exp, dur, n_models=2, n_experiments=4,
                           experiment_model=np.array([0, 0, 1, 1]))
    step_index = np.arange(n_steps, dtype=np.int64) * 3 + 5
    coords = model_coords(data, list(MODELS), list(EXPERIMENTS), step_index)
    return data, coords, step_index, truth


def mock_idata(data, coords, step_index, *, hierarchy: str = "per-model", chains: int = 2,
               draws: int = 150, seed: int = 1, log_likelihood: bool = False,
               prior_draws: int = 0, max_tree_depth: int = 8):
    """MOCK SAMPLER: prior draws of the real model as (chains, draws) + fake sample_stats.

    Independent draws, so R-hat ~ 1 and ESS ~ chains x draws: the gate passes.
    """
    model_fn = get_model(hierarchy)
    # one vmapped Predictive call conditioned on the data (no Student-t sampling): the
    # first chains x draws prior draws are the "posterior", the rest the prior group
    n_post = chains * draws
    flat = Predictive(model_fn, num_samples=n_post + prior_draws, parallel=True)(
        jax.random.key(seed), data, priors())
    flat = {k: np.asarray(v) for k, v in flat.items() if k != "log_duration"}
    samples = {k: v[:n_post].reshape(chains, draws, *v.shape[1:]) for k, v in flat.items()}
    prior_samples = {k: v[n_post:] for k, v in flat.items()} if prior_draws else None
    rng = np.random.default_rng(seed)
    extra = {"diverging": np.zeros((chains, draws), bool),
             "energy": rng.normal(100.0, 5.0, (chains, draws)),
             "num_steps": np.full((chains, draws), 2 ** (max_tree_depth - 2) - 1),
             "accept_prob": rng.uniform(0.7, 1.0, (chains, draws)),
             "adapt_state.step_size": np.full((chains, draws), 0.1),
             "potential_energy": rng.normal(50.0, 3.0, (chains, draws))}
    return numpyro_to_idata(samples, extra, model_fn, data, priors(), coords=coords,
                            max_tree_depth=max_tree_depth, step_index=step_index,
                            log_likelihood=log_likelihood, prior_samples=prior_samples,
                            attrs={"sampler": "mock"})


@functools.cache
def cached_data():
    """The synthetic data set shared by the test modules (built once per session)."""
    return synthetic_model_data(400)


@functools.cache
def cached_mock():
    """One mock posterior (2 chains x 150 draws, log-likelihood, 40 prior draws)."""
    data, coords, step_index, _ = cached_data()
    return mock_idata(data, coords, step_index, log_likelihood=True, prior_draws=40)


def test_mock_sampler_shapes():
    data, coords, step_index, _ = cached_data()
    idata = cached_mock()
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 150
    assert idata.posterior["b"].dims == ("chain", "draw", "model", "component")
    assert "log_duration" not in idata.posterior
    np.testing.assert_array_equal(idata.constant_data["step"].values, step_index)
