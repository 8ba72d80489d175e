"""Fast tests of calib.model: sites, dims, masking, the mean function, the likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.posteriors import model_design, model_trace
from numpyro import handlers

from calib import config, noise
from calib.config import COMPONENTS
from calib.errors import CalibError
from calib.model import (
    HIERARCHIES,
    OBS_SITE,
    SITE_DIMS,
    get_model,
    make_model_data,
    model_coords,
    prior_predictive,
    sample_sites,
    simulate_from_model,
    step_time_us,
)
from calib.priors import load_priors

PRIORS = load_priors()


@pytest.fixture(scope="module")
def design():
    return model_design()


def _hand_mu(p, C, L, B, idx):
    b = np.asarray(p["b"])[idx]
    t = C * b
    pf, dc = t[:, 0] + t[:, 1], t[:, 2] + t[:, 3]
    mix = p["alpha"] * np.maximum(pf, dc) + (1 - p["alpha"]) * (pf + dc)
    return (
        mix + t[:, 4] + t[:, 5] + p["per_layer_us"] * L + p["per_request_us"] * B + p["per_step_us"]
    )


@pytest.mark.parametrize("hierarchy", HIERARCHIES)
@pytest.mark.parametrize("centered", [True, False])
def test_sites_shapes_and_dims(design, hierarchy, centered):
    tr = model_trace(hierarchy, design, centered)
    coords = model_coords(
        design, ["m0", "m1"], ["e0", "e1", "e2", "e3"], steps=range(design.components.shape[0])
    )
    for name, site in tr.items():
        assert name in SITE_DIMS, f"site {name} missing from SITE_DIMS"
        if name.endswith("_jacobian"):  # factor site
            continue
        shape = tuple(len(coords[d]) for d in SITE_DIMS[name])
        assert jnp.shape(site["value"]) == shape, name
    latent = {k for k, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(sample_sites(hierarchy, centered))
    assert tr[OBS_SITE]["is_observed"]
    for name in (
        "b",
        "sigma",
        "b_pop",
        "per_layer_us",
        "per_request_us",
        "per_step_us",
        "alpha",
        "stall_prob",
        "fast_prob",
        "mean_factor",
    ):
        assert name in tr
    assert ("b_exp" in tr) == (hierarchy == "per-experiment")
    assert all(k.startswith("z_") for k in latent if k.startswith("z"))
    if hierarchy == "pooled":
        b = np.asarray(tr["b"]["value"])
        np.testing.assert_allclose(b[0], b[1])
        np.testing.assert_allclose(
            np.asarray(tr["sigma"]["value"]), float(tr["sigma_pooled"]["value"])
        )


@pytest.mark.parametrize("centered", [True, False])
def test_tp_at_tp1_has_no_sample_site(design, centered):
    assert design.active.tolist() == [[True] * 5 + [False], [True] * 6]
    tr = model_trace("per-experiment", design, centered)
    site = "log_b_active" if centered else "z_b"
    # 12 pairs minus (m0, tp); pinned pairs (config.PINNED_COMPONENTS: weight, dc_compute
    # of both models) live in z_c_<component>
    assert tr[site]["value"].shape == (11 - 2 * len(config.PINNED_COMPONENTS),)
    for name in config.PINNED_COMPONENTS:
        assert tr[f"z_c_{name}"]["value"].shape == (2,)
    b = np.asarray(tr["b"]["value"])
    b_pop = np.asarray(tr["b_pop"]["value"])
    assert b[0, 5] == pytest.approx(b_pop[5], rel=1e-12)
    assert b[1, 5] != pytest.approx(b_pop[5], rel=1e-6)
    # per-experiment pairs: experiments of model 0 have no tp entry either
    site_e = "log_b_exp_active" if centered else "z_b_exp"
    assert tr[site_e]["value"].shape == (int(design.active_exp.sum()),)
    assert not design.active_exp[design.experiment_model == 0, 5].any()
    b_exp = np.asarray(tr["b_exp"]["value"])
    for e in np.flatnonzero(design.experiment_model == 0):
        assert b_exp[e, 5] == pytest.approx(b[0, 5], rel=1e-12)


def test_tp_pair_gets_no_likelihood_gradient(design):
    """The inactive (m0, tp) correction cannot move the likelihood."""
    p = dict(
        b=np.full((2, 6), 1.3), per_layer_us=5.0, per_request_us=7.0, per_step_us=90.0, alpha=0.4
    )
    g = jax.grad(lambda b: jnp.sum(jnp.log(step_time_us({**p, "b": b}, design))))(
        jnp.asarray(p["b"])
    )
    assert float(g[0, 5]) == 0.0
    assert abs(float(g[1, 5])) > 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_step_time_matches_numpy(design, shuffle):
    rng = np.random.default_rng(0)
    p = dict(
        b=rng.uniform(0.5, 3.0, (2, 6)),
        per_layer_us=7.0,
        per_request_us=11.0,
        per_step_us=123.0,
        alpha=0.37,
    )
    d = design
    if shuffle:  # unsorted rows take the gather path
        perm = rng.permutation(d.components.shape[0])
        d = make_model_data(
            d.components[perm],
            d.num_layers[perm],
            d.batch_size[perm],
            d.model_idx[perm],
            d.experiment_idx[perm],
            n_models=2,
            n_experiments=4,
            experiment_model=d.experiment_model,
        )
    got = np.asarray(step_time_us(p, d))
    want = _hand_mu(p, d.components, d.num_layers, d.batch_size, d.model_idx)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # per-experiment corrections take precedence
    pe = dict(p, b_exp=rng.uniform(0.5, 3.0, (4, 6)))
    got_e = np.asarray(step_time_us(pe, d))
    want_e = _hand_mu(
        dict(p, b=pe["b_exp"]), d.components, d.num_layers, d.batch_size, d.experiment_idx
    )
    np.testing.assert_allclose(got_e, want_e, rtol=1e-12)
    # vmappable over draws
    draws = {k: np.stack([np.asarray(v), np.asarray(v) * 1.1]) for k, v in p.items()}
    draws["alpha"] = np.array([0.37, 0.5])
    vm = np.asarray(jax.vmap(step_time_us, (0, None))(draws, d))
    np.testing.assert_allclose(vm[0], got, rtol=1e-12)


def test_alpha_only_matters_for_mixed_batches(design):
    p = dict(
        b=np.full((2, 6), 1.5), per_layer_us=5.0, per_request_us=7.0, per_step_us=90.0, alpha=0.0
    )
    mu0 = np.asarray(step_time_us(p, design))
    mu1 = np.asarray(step_time_us(dict(p, alpha=1.0), design))
    C = design.components
    mixed = ((C[:, 0] + C[:, 1]) > 0) & ((C[:, 2] + C[:, 3]) > 0)
    assert mixed.sum() > 50 and (~mixed).sum() > 50
    np.testing.assert_array_equal(mu0[~mixed], mu1[~mixed])
    pf = 1.5 * (C[:, 0] + C[:, 1])
    dc = 1.5 * (C[:, 2] + C[:, 3])
    np.testing.assert_allclose((mu0 - mu1)[mixed], np.minimum(pf, dc)[mixed], rtol=1e-10)


@pytest.mark.parametrize("hierarchy", ["pooled", "per-experiment"])
def test_likelihood_is_the_noise_family(design, hierarchy):
    """The observed site's log density is calib.noise.log_density with each step's model's
    noise parameters (pooled stall, per-model sigma and fast component), and mean_factor
    is E[y]/m of those parameters."""
    y, _ = simulate_from_model(hierarchy, design, priors=PRIORS, seed=3)
    data = design._replace(duration_us=y, log_duration=np.log(y))
    with handlers.seed(rng_seed=1):
        tr = handlers.trace(get_model(hierarchy)).get_trace(data, PRIORS)
    v = {k: np.asarray(s["value"]) for k, s in tr.items()}
    midx = np.asarray(design.model_idx)
    params = [np.broadcast_to(v[k], (2,)) for k in noise.NOISE_PARAMS]
    mu = np.asarray(step_time_us({**v, "b_exp": v.get("b_exp")}, design))
    want = noise.log_density(np.log(y), np.log(mu), *(p[midx] for p in params))
    got = np.asarray(tr[OBS_SITE]["fn"].log_prob(jnp.asarray(np.log(y))))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(v["mean_factor"], noise.mean_factor(*params), rtol=1e-12)
    assert np.all(v["stall_prob"] <= config.NOISE_MAX_TAIL_PROB)
    assert np.all(v["fast_prob"] <= config.NOISE_MAX_TAIL_PROB)
    assert np.all(v["fast_log_sd"] <= config.NOISE_MAX_TAIL_LOG_SD)
    assert v["stall_log_sd"] <= config.NOISE_MAX_TAIL_LOG_SD


def test_unknown_hierarchy_and_bad_data():
    with pytest.raises(CalibError, match="hierarchy"):
        get_model("per-gpu")
    assert get_model("per_model") is get_model("per-model")
    C = np.ones((3, 6))
    with pytest.raises(CalibError, match="duration"):
        make_model_data(C, np.ones(3), np.ones(3), np.zeros(3), duration_us=[1.0, -1.0, 2.0])
    with pytest.raises(CalibError, match="components"):
        make_model_data(np.ones((3, 5)), np.ones(3), np.ones(3), np.zeros(3))
    with pytest.raises(CalibError, match="num_layers"):
        make_model_data(C, np.ones(2), np.ones(3), np.zeros(3))
    with pytest.raises(CalibError, match="experiment_model"):
        make_model_data(
            C,
            np.ones(3),
            np.ones(3),
            [0, 0, 1],
            [0, 1, 1],
            n_models=2,
            n_experiments=2,
            experiment_model=[0, 0],
        )


@pytest.mark.parametrize("hierarchy", ["per-experiment"])
def test_prior_predictive_is_plausible(design, hierarchy):
    out = prior_predictive(hierarchy, design, PRIORS, num_samples=200, seed=0)
    n = design.components.shape[0]
    assert out["mu_us"].shape == (200, n)
    assert out["duration_us"].shape == (200, n)
    assert out["b"].shape == (200, 2, len(COMPONENTS))
    med = np.median(out["mu_us"])
    # synthetic steps are ~5-50 ms at b = 1; priors put corrections around 1-2
    assert 3e3 < med < 2e5
    assert np.all(out["mu_us"] > 0)


def test_simulate_from_model_uses_given_truth(design):
    truth = dict(
        b=np.full((2, 6), 1.2),
        per_layer_us=5.0,
        per_request_us=7.0,
        per_step_us=90.0,
        alpha=0.5,
        sigma=np.array([1e-9, 1e-9]),
        stall_prob=0.0,
        stall_log_mult=0.7,
        stall_log_sd=0.3,
    )
    y, t = simulate_from_model("per-model", design, params=truth, seed=0)
    np.testing.assert_allclose(y, np.asarray(step_time_us(truth, design)), rtol=1e-6)
    assert t["alpha"] == 0.5


def test_collinearity_report():
    import arviz as az

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 100))
    post = dict(
        b=np.exp(rng.normal(size=(2, 100, 2, 6))),
        per_layer_us=np.exp(x),
        per_request_us=np.exp(rng.normal(size=(2, 100))),
        per_step_us=np.exp(-x),
    )
    idata = az.from_dict(
        posterior=post,
        coords={"model": ["a", "b"], "component": list(COMPONENTS)},
        dims={"b": ["model", "component"]},
    )
    from calib.model import collinearity_report

    rep = collinearity_report(idata)
    assert list(rep.columns) == [
        "weight[a]",
        "weight[b]",
        "per_layer_us",
        "per_request_us",
        "per_step_us",
    ]
    assert rep.loc["per_layer_us", "per_step_us"] == pytest.approx(-1.0)
    assert abs(rep.loc["weight[a]", "per_request_us"]) < 0.3


def test_model_log_density_and_gradient_are_finite(design):
    """The joint log density is finite at a prior draw and so is its gradient."""
    from numpyro.infer.util import log_density

    model = get_model("per-model")
    with handlers.seed(rng_seed=1):
        tr = handlers.trace(model).get_trace(design, PRIORS)
    latent = {
        k: s["value"] for k, s in tr.items() if s["type"] == "sample" and not s["is_observed"]
    }

    def f(p):
        return log_density(model, (design, PRIORS), {}, p)[0]

    v, g = jax.jit(jax.value_and_grad(f))(latent)
    assert np.isfinite(float(v))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
