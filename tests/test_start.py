"""The Laplace start (calib.start): mode, covariance and starting draws against closed forms."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from test_fit_support import cached_data, priors

from calib.model import get_model
from calib.start import _covariance, laplace_start

# conjugate normal model: mu ~ N(m0, s0), y_i ~ N(mu, s); log_s ~ N(0, 1) is independent
M0, S0, S = 1.0, 10.0, 0.5
Y = np.random.default_rng(3).normal(2.0, S, 40)


def _toy(data, priors_):
    del priors_
    mu = numpyro.sample("mu", dist.Normal(M0, S0))
    numpyro.sample("log_s", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, S), obs=jnp.asarray(data))


def test_mode_and_covariance_match_the_conjugate_posterior():
    post_var = 1.0 / (1.0 / S0**2 + Y.size / S**2)
    post_mean = post_var * (M0 / S0**2 + Y.sum() / S**2)
    start = laplace_start(_toy, Y, None, chains=3, seed=0)
    (names, cov), = start.inverse_mass_matrix.items()
    assert names == ("log_s", "mu")
    np.testing.assert_allclose(np.asarray(cov), np.diag([1.0, post_var]), rtol=1e-6, atol=1e-9)
    assert start.report["converged"]
    mu0 = np.asarray(start.init_params["mu"])
    assert mu0.shape == (3,)
    # starts are draws around the mode on the posterior's own scale: dispersed, not equal
    z = (mu0 - post_mean) / np.sqrt(post_var)
    assert np.all(np.abs(z) < 4) and np.ptp(z) > 0.1


def test_single_chain_has_no_chain_dim_and_diagonal_mass():
    start = laplace_start(_toy, Y, None, chains=1, seed=1, dense_mass=False)
    assert np.shape(start.init_params["mu"]) == ()
    (_, diag), = start.inverse_mass_matrix.items()
    assert np.shape(diag) == (2,)


def test_floored_eigenvalues_bound_the_width():
    h = np.diag([4.0, -3.0, 1e-6])
    cov, rep = _covariance(h, floor=1e-2)
    np.testing.assert_allclose(np.diag(cov), [0.25, 100.0, 100.0])
    assert rep["floored_eigenvalues"] == 2 and rep["min_eigenvalue"] == -3.0
    cov, rep = _covariance(np.full((2, 2), np.nan), floor=1e-2)
    np.testing.assert_array_equal(cov, np.eye(2))


def test_starts_of_the_step_model_lie_in_its_support():
    import jax
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    data, _, _, _ = cached_data()
    model = get_model("per-model")
    start = laplace_start(model, data, priors(), chains=2, seed=0)
    assert start.report["iterations"] > 0 and np.isfinite(start.report["log_density_at_mode"])
    info = initialize_model(jax.random.key(0), model, model_args=(data, priors()),
                            init_strategy=init_to_median())
    for c in range(2):
        z = {k: v[c] for k, v in start.init_params.items()}
        assert np.isfinite(float(info.potential_fn(z)))


def test_pooled_covariance_centres_each_chain_and_shrinks_toward_the_diagonal():
    from calib.start import pooled_covariance

    rng = np.random.default_rng(0)
    true = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 4.0]])
    chol = np.linalg.cholesky(true)
    x = rng.standard_normal((4, 5000, 3)) @ chol.T
    x += np.array([0.0, 10.0, -10.0, 5.0])[:, None, None]  # chains that disagree in mean
    z = {"b": x[..., 1:], "a": x[..., :1]}  # flattening order: sites sorted by name
    cov, rep = pooled_covariance(z)
    assert rep == {"pooled_draws": 20000, "parameters": 3, "shrinkage": round(3 / 20003, 4)}
    np.testing.assert_allclose(cov, true, atol=0.08)
    diag, _ = pooled_covariance(z, dense=False)
    np.testing.assert_allclose(diag, np.diag(true), atol=0.15)
    # few draws: the off-diagonal is pulled toward 0 by d / (n + d)
    small, rep = pooled_covariance({"a": x[:2, :3, :1], "b": x[:2, :3, 1:]})
    assert rep["shrinkage"] == round(3 / 9, 4)
    raw = np.concatenate([x[:2, :3] - x[:2, :3].mean(1, keepdims=True)]).reshape(6, 3)
    s = raw.T @ raw / 4
    np.testing.assert_allclose(small[0, 1], (1 - 3 / 9) * s[0, 1])


def test_two_phase_warmup_records_the_pooled_adaptation(monkeypatch):
    import json

    from calib import config
    from calib.fit import run_nuts

    small = config.AdaptationDefaults(step_size_warmup=10, pooled_fraction=0.5, min_warmup=30)
    monkeypatch.setattr(config, "ADAPTATION", small)
    data, coords, step_index, _ = cached_data()
    idata = run_nuts(get_model("per-model"), data, priors(), coords=coords, chains=2,
                     warmup=40, draws=20, progress=False, step_index=step_index,
                     chain_method="vectorized", init="median")
    rep = json.loads(idata.attrs["adaptation"])
    assert rep["method"] == "pooled" and rep["first_phase"] == 30
    assert rep["pooled_draws"] == 2 * 15 and rep["parameters"] > 10
    assert idata.posterior.sizes["draw"] == 20 and idata.posterior.sizes["chain"] == 2
