"""The Laplace start (calib.start): mode, covariance and starting draws against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from fixtures.posteriors import cached_data, priors

from calib.model import get_model
from calib.start import _covariance, laplace_start, median_start

# conjugate normal model: mu ~ N(m0, s0), y_i ~ N(mu, s); log_s ~ N(0, 1) is independent
M0, S0, S = 1.0, 10.0, 0.5
Y = np.random.default_rng(3).normal(2.0, S, 40)


def _toy(data, priors_):
    del priors_
    mu = numpyro.sample("mu", dist.Normal(M0, S0))
    numpyro.sample("log_s", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, S), obs=jnp.asarray(data))


def _x(start, y):
    """NumPyro's unconstrained parameters at whitened ``y``."""
    return start.shift + np.asarray(y, np.float64) @ start.chol.T


def test_whitening_and_starts_match_the_conjugate_posterior():
    post_var = 1.0 / (1.0 / S0**2 + Y.size / S**2)
    post_mean = post_var * (M0 / S0**2 + Y.sum() / S**2)
    start = laplace_start(_toy, Y, None, chains=3, key=jax.random.key(0))
    # flattening order: sites sorted by name (log_s, mu); x = mode + chol @ y
    np.testing.assert_allclose(start.shift, [0.0, post_mean], atol=1e-6)
    np.testing.assert_allclose(
        start.chol @ start.chol.T, np.diag([1.0, post_var]), rtol=1e-6, atol=1e-9
    )
    assert start.report["converged"] and start.report["whitening"] == "dense"
    y0 = np.asarray(start.init_params)
    assert y0.shape == (3, 2)
    # starts are draws around the mode on the posterior's own scale: dispersed, not equal
    z = (_x(start, y0)[:, 1] - post_mean) / np.sqrt(post_var)
    assert np.all(np.abs(z) < 4) and np.ptp(z) > 0.1
    # the whitened potential is the model's, up to a constant, at the mapped point
    y = jnp.asarray([0.3, -1.2])
    mu = post_mean - 1.2 * np.sqrt(post_var)
    exact = 0.5 * 0.3**2 + 0.5 * ((mu - M0) / S0) ** 2 + 0.5 * np.sum(((Y - mu) / S) ** 2)
    ref = float(start.potential_fn(jnp.zeros(2))) - (
        0.5 * ((post_mean - M0) / S0) ** 2 + 0.5 * np.sum(((Y - post_mean) / S) ** 2)
    )
    np.testing.assert_allclose(float(start.potential_fn(y)) - ref, exact, rtol=1e-9)
    out = start.postprocess_fn(y)
    np.testing.assert_allclose([float(out["log_s"]), float(out["mu"])], [0.3, mu], rtol=1e-9)


def test_single_chain_has_no_chain_dim_and_diagonal_whitening():
    start = laplace_start(_toy, Y, None, chains=1, key=jax.random.key(1), dense_mass=False)
    assert np.shape(start.init_params) == (2,)
    np.testing.assert_array_equal(start.chol, np.diag(np.diag(start.chol)))
    assert start.report["whitening"] == "diagonal"


def test_median_start_is_unwhitened_and_per_chain():
    start = median_start(_toy, Y, None, chains=2, key=jax.random.key(0))
    np.testing.assert_array_equal(start.chol, np.eye(2))
    y0 = np.asarray(start.init_params)
    assert y0.shape == (2, 2) and start.report == {"method": "median"}
    # init_to_median of 15 prior draws: near the prior medians (0, M0), one per chain
    assert np.all(np.abs(y0[:, 0]) < 1.0) and np.all(np.abs(y0[:, 1] - M0) < 0.6 * S0)
    assert not np.array_equal(y0[0], y0[1])


def test_floored_eigenvalues_bound_the_width():
    h = np.diag([4.0, -3.0, 1e-6])
    cov, rep = _covariance(h, floor=1e-2)
    np.testing.assert_allclose(np.diag(cov), [0.25, 100.0, 100.0])
    assert rep["floored_eigenvalues"] == 2 and rep["min_eigenvalue"] == -3.0
    cov, rep = _covariance(np.full((2, 2), np.nan), floor=1e-2)
    np.testing.assert_array_equal(cov, np.eye(2))


def _boxed(data, priors_):
    """N(0, 1) restricted to |mu| < 0.05: N(0, I) draws around the mode lie outside."""
    del data, priors_
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.factor("box", jnp.where(jnp.abs(mu) < 0.05, 0.0, -jnp.inf))


def test_starts_outside_the_support_are_pulled_back_toward_the_mode():
    start = laplace_start(_boxed, None, None, chains=4, key=jax.random.key(0))
    x = _x(start, np.asarray(start.init_params))[:, 0]
    assert np.all(np.abs(x) < 0.05) and np.ptp(x) > 0
    assert all(np.isfinite(float(start.potential_fn(y))) for y in start.init_params)


def test_starts_of_the_step_model_lie_in_its_support():
    data, _, _, _ = cached_data()
    model = get_model("per-model")
    start = laplace_start(model, data, priors(), chains=2, key=jax.random.key(0))
    assert start.report["iterations"] > 0 and np.isfinite(start.report["log_density_at_mode"])
    for c in range(2):
        assert np.isfinite(float(start.potential_fn(start.init_params[c])))
    out = start.postprocess_fn(start.init_params[0])
    assert {"b", "b_pop", "tau", "alpha"} <= set(out)
    assert np.all(np.asarray(out["b"]) > 0) and 0 < float(out["alpha"]) < 1


def test_pilot_warmup_records_the_adaptation(monkeypatch):
    import json

    from calib import config
    from calib.fit import SamplerSettings, run_nuts

    small = config.AdaptationDefaults(step_size_warmup=10, min_warmup=30)
    monkeypatch.setattr(config, "ADAPTATION", small)
    data, coords, step_index, _ = cached_data()
    settings = SamplerSettings(chains=2, warmup=40, draws=20, chain_method="vectorized")
    idata = run_nuts(
        get_model("per-model"),
        data,
        priors(),
        coords=coords,
        settings=settings,
        progress=False,
        step_index=step_index,
    )
    rep = json.loads(idata.attrs["adaptation"])
    assert rep["method"] == "pilot chain" and rep["pilot_warmup"] == 40
    assert rep["step_size_warmup"] == 10 and rep["pilot_step_size"] > 0
    assert json.loads(idata.attrs["start"])["method"] == "laplace"
    assert idata.posterior.sizes["draw"] == 20 and idata.posterior.sizes["chain"] == 2
    # chains start apart (dispersed starts), so their first draws differ
    alpha = idata.posterior["alpha"].values
    assert np.all(np.isfinite(alpha)) and alpha[0, 0] != alpha[1, 0]


def test_newton_steps_finish_what_a_short_lbfgs_run_leaves():
    """One L-BFGS iteration stops short of the mode; the trust-region Newton steps with
    the exact Hessian reach it (and without them the start stays short)."""
    from calib.config import StartDefaults

    post_var = 1.0 / (1.0 / S0**2 + Y.size / S**2)
    post_mean = post_var * (M0 / S0**2 + Y.sum() / S**2)
    key = jax.random.key(0)
    short = laplace_start(_toy, Y, None, chains=2, key=key, settings=StartDefaults(1, 0))
    assert abs(short.shift[1] - post_mean) > 1e-3 * np.sqrt(post_var)
    start = laplace_start(_toy, Y, None, chains=2, key=key, settings=StartDefaults(1, 50))
    assert 0 < start.report["newton_iterations"] <= 50 and start.report["converged"]
    np.testing.assert_allclose(start.shift, [0.0, post_mean], atol=1e-8)
