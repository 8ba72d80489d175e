"""Fast tests of calib.model: sites, dims, masking, the mean function, the likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from calib import config
from calib.config import COMPONENTS
from calib.errors import CalibError
from calib.model import (
    HIERARCHIES,
    OBS_SITE,
    SITE_DIMS,
    LogStudentT,
    get_model,
    make_model_data,
    model_coords,
    prior_predictive,
    sample_sites,
    simulate_from_model,
    step_time_us,
    synthetic_model_data,
)
from calib.priors import load_priors

PRIORS = load_priors()


@pytest.fixture(scope="module")
def design():
    # model 0 at TP=1 (tp basis all zero), model 1 at TP=2
    d = synthetic_model_data(600, 2, 2, seed=3, tp2_models=(1,))
    truth = dict(b=np.array([[1.8, 1.5, 2.5, 1.6, 1.15, 2.0], [1.6, 1.4, 2.2, 1.9, 1.3, 2.4]]),
                 per_layer_us=8.0, per_request_us=12.0, per_step_us=150.0, alpha=0.6,
                 sigma=np.array([0.05, 0.08]), nu=8.0)
    y, _ = simulate_from_model("per-model", d, params=truth, seed=1)
    return d._replace(duration_us=y, log_duration=np.log(y))


def _trace(hierarchy, data, centered):
    model = get_model(hierarchy)
    with handlers.seed(rng_seed=0):
        return handlers.trace(model).get_trace(data, PRIORS, centered=centered)


def _hand_mu(p, C, L, B, idx):
    b = np.asarray(p["b"])[idx]
    t = C * b
    pf, dc = t[:, 0] + t[:, 1], t[:, 2] + t[:, 3]
    mix = p["alpha"] * np.maximum(pf, dc) + (1 - p["alpha"]) * (pf + dc)
    return (mix + t[:, 4] + t[:, 5] + p["per_layer_us"] * L + p["per_request_us"] * B
            + p["per_step_us"])


@pytest.mark.parametrize("hierarchy", HIERARCHIES)
@pytest.mark.parametrize("centered", [True, False])
def test_sites_shapes_and_dims(design, hierarchy, centered):
    tr = _trace(hierarchy, design, centered)
    coords = model_coords(design, ["m0", "m1"], ["e0", "e1", "e2", "e3"],
                          steps=range(design.components.shape[0]))
    for name, site in tr.items():
        assert name in SITE_DIMS, f"site {name} missing from SITE_DIMS"
        if name.endswith("_jacobian"):  # factor site
            continue
        shape = tuple(len(coords[d]) for d in SITE_DIMS[name])
        assert jnp.shape(site["value"]) == shape, name
    latent = {k for k, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(sample_sites(hierarchy, centered))
    assert tr[OBS_SITE]["is_observed"]
    for name in ("b", "sigma", "b_pop", "per_layer_us", "per_request_us", "per_step_us",
                 "alpha", "nu"):
        assert name in tr
    assert ("b_exp" in tr) == (hierarchy == "per-experiment")
    assert all(k.startswith("z_") for k in latent if k.startswith("z"))
    if hierarchy == "pooled":
        b = np.asarray(tr["b"]["value"])
        np.testing.assert_allclose(b[0], b[1])
        np.testing.assert_allclose(np.asarray(tr["sigma"]["value"]),
                                   float(tr["sigma_pooled"]["value"]))


@pytest.mark.parametrize("centered", [True, False])
def test_tp_at_tp1_has_no_sample_site(design, centered):
    assert design.active.tolist() == [[True] * 5 + [False], [True] * 6]
    tr = _trace("per-experiment", design, centered)
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
    p = dict(b=np.full((2, 6), 1.3), per_layer_us=5.0, per_request_us=7.0, per_step_us=90.0,
             alpha=0.4)
    g = jax.grad(lambda b: jnp.sum(jnp.log(step_time_us({**p, "b": b}, design))))(
        jnp.asarray(p["b"]))
    assert float(g[0, 5]) == 0.0
    assert abs(float(g[1, 5])) > 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_step_time_matches_numpy(design, shuffle):
    rng = np.random.default_rng(0)
    p = dict(b=rng.uniform(0.5, 3.0, (2, 6)), per_layer_us=7.0, per_request_us=11.0,
             per_step_us=123.0, alpha=0.37)
    d = design
    if shuffle:  # unsorted rows take the gather path
        perm = rng.permutation(d.components.shape[0])
        d = make_model_data(d.components[perm], d.num_layers[perm], d.batch_size[perm],
                            d.model_idx[perm], d.experiment_idx[perm], n_models=2,
                            n_experiments=4, experiment_model=d.experiment_model)
    got = np.asarray(step_time_us(p, d))
    want = _hand_mu(p, d.components, d.num_layers, d.batch_size, d.model_idx)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # per-experiment corrections take precedence
    pe = dict(p, b_exp=rng.uniform(0.5, 3.0, (4, 6)))
    got_e = np.asarray(step_time_us(pe, d))
    want_e = _hand_mu(dict(p, b=pe["b_exp"]), d.components, d.num_layers, d.batch_size,
                      d.experiment_idx)
    np.testing.assert_allclose(got_e, want_e, rtol=1e-12)
    # vmappable over draws
    draws = {k: np.stack([np.asarray(v), np.asarray(v) * 1.1]) for k, v in p.items()}
    draws["alpha"] = np.array([0.37, 0.5])
    vm = np.asarray(jax.vmap(step_time_us, (0, None))(draws, d))
    np.testing.assert_allclose(vm[0], got, rtol=1e-12)


def test_alpha_only_matters_for_mixed_batches(design):
    p = dict(b=np.full((2, 6), 1.5), per_layer_us=5.0, per_request_us=7.0, per_step_us=90.0,
             alpha=0.0)
    mu0 = np.asarray(step_time_us(p, design))
    mu1 = np.asarray(step_time_us(dict(p, alpha=1.0), design))
    C = design.components
    mixed = ((C[:, 0] + C[:, 1]) > 0) & ((C[:, 2] + C[:, 3]) > 0)
    assert mixed.sum() > 50 and (~mixed).sum() > 50
    np.testing.assert_array_equal(mu0[~mixed], mu1[~mixed])
    pf = 1.5 * (C[:, 0] + C[:, 1])
    dc = 1.5 * (C[:, 2] + C[:, 3])
    np.testing.assert_allclose((mu0 - mu1)[mixed], np.minimum(pf, dc)[mixed], rtol=1e-10)


def test_log_student_t_equals_numpyro_student_t(design):
    rng = np.random.default_rng(1)
    n = design.components.shape[0]
    loc = rng.normal(8, 1, n)
    sigma = np.array([0.07, 0.2])
    y = loc + rng.standard_t(5, n) * 0.1
    from calib.model import _runs

    for runs in (_runs(design.model_idx), None):
        got = LogStudentT(6.5, loc, jnp.asarray(sigma), design.model_idx, runs).log_prob(y)
        want = dist.StudentT(6.5, loc, sigma[design.model_idx]).log_prob(y)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10)


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
        make_model_data(C, np.ones(3), np.ones(3), [0, 0, 1], [0, 1, 1], n_models=2,
                        n_experiments=2, experiment_model=[0, 0])


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
    truth = dict(b=np.full((2, 6), 1.2), per_layer_us=5.0, per_request_us=7.0,
                 per_step_us=90.0, alpha=0.5, sigma=np.array([1e-9, 1e-9]), nu=10.0)
    y, t = simulate_from_model("per-model", design, params=truth, seed=0)
    np.testing.assert_allclose(y, np.asarray(step_time_us(truth, design)), rtol=1e-6)
    assert t["alpha"] == 0.5


def test_collinearity_report():
    import arviz as az

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 100))
    post = dict(b=np.exp(rng.normal(size=(2, 100, 2, 6))), per_layer_us=np.exp(x),
                per_request_us=np.exp(rng.normal(size=(2, 100))), per_step_us=np.exp(-x))
    idata = az.from_dict(posterior=post, coords={"model": ["a", "b"],
                                                 "component": list(COMPONENTS)},
                         dims={"b": ["model", "component"]})
    from calib.model import collinearity_report

    rep = collinearity_report(idata)
    assert list(rep.columns) == ["weight[a]", "weight[b]", "per_layer_us", "per_request_us",
                                 "per_step_us"]
    assert rep.loc["per_layer_us", "per_step_us"] == pytest.approx(-1.0)
    assert abs(rep.loc["weight[a]", "per_request_us"]) < 0.3


def test_model_log_density_and_gradient_are_finite(design):
    """The joint log density is finite at a prior draw and so is its gradient."""
    from numpyro.infer.util import log_density

    model = get_model("per-model")
    with handlers.seed(rng_seed=1):
        tr = handlers.trace(model).get_trace(design, PRIORS)
    latent = {k: s["value"] for k, s in tr.items()
              if s["type"] == "sample" and not s["is_observed"]}

    def f(p):
        return log_density(model, (design, PRIORS), {}, p)[0]

    v, g = jax.jit(jax.value_and_grad(f))(latent)
    assert np.isfinite(float(v))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))


def test_build_model_data_from_dataset():
    """From the embedded default traces: sampled steps, sorted rows, tp inactive at TP=1."""
    from calib.config import PROJECT_ROOT
    from calib.model import build_model_data
    from calib.traces.dataset import concat_experiments, find_experiments, import_experiment

    exps = find_experiments(PROJECT_ROOT / "traces" / "default")
    tp1 = [e for e in exps if "tp1" in e.name][:1]
    tp2 = [e for e in exps if "tp2" in e.name][:1]
    if not tp1 or not tp2:
        pytest.skip("embedded default traces not present")
    ds = concat_experiments([import_experiment(e) for e in tp1 + tp2])
    data, coords = build_model_data(ds)
    sampled = np.asarray(ds["sampled"].values) & np.isfinite(ds["duration_us"].values)
    assert data.components.shape == (int(sampled.sum()), len(COMPONENTS))
    assert coords["component"] == list(COMPONENTS)
    assert len(coords["model"]) == data.n_models == 2
    assert len(coords["step"]) == data.components.shape[0]
    assert np.all(np.diff(data.model_idx) >= 0)  # sorted by model: one run per experiment
    np.testing.assert_allclose(data.duration_us,
                               np.asarray(ds["duration_us"].values)[coords["step"]])
    m_tp1 = coords["model"].index(str(ds["exp_model"].values[0]))
    assert not data.active[m_tp1, COMPONENTS.index("tp")]
    assert data.active[1 - m_tp1, COMPONENTS.index("tp")]
    assert np.all(data.components[:, COMPONENTS.index("weight")] > 0)
    with pytest.raises(CalibError):
        build_model_data(ds, steps=np.array([10**9]))


@pytest.mark.parametrize("hierarchy", ["per-model", "per-experiment"])
def test_pinned_coordinates_carry_the_natural_density(design, hierarchy, monkeypatch):
    """log p_raw(θ) = log p_natural(T θ) + log |det ∂T/∂θ| at random raw points.

    T maps the sampled coordinates (``z_c_<pinned component>``, the bounded
    ``z_per_layer_us``, ``z_per_step_us``, ``z_per_request_us``, ``z_b_pop`` with the
    pinned and other centred components' entries relative to their models' mean) to the
    natural ones (centred log b of those pairs, the softplus coordinates of the overheads,
    the prior's standardised log b_pop); every other site maps to itself (the centred
    entries of ``log_b_active`` are log b in both).
    """
    from numpyro.infer.util import log_density

    model = get_model(hierarchy)
    tr = _trace(hierarchy, design, True)
    raw = {k: v["value"] for k, v in tr.items()
           if v["type"] == "sample" and not v.get("is_observed", False)}
    from calib.geometry import bounded_overheads, pinned

    pinned_cols = list(pinned())
    assert len(pinned_cols) >= 2
    bounded = bounded_overheads(design)
    assert set(bounded) == {"per_layer_us", "per_step_us", "per_request_us"}
    changed = list(pinned().values()) + [f"z_{site}" for site in bounded] + ["z_b_pop"]
    assert all(k in raw for k in changed)
    monkeypatch.setattr(config, "PINNED_COMPONENTS", ())
    monkeypatch.setattr(config, "RECENTRED_POPULATION", False)
    nat_names = [k for k, v in _trace(hierarchy, design, True).items()
                 if v["type"] == "sample" and not v.get("is_observed", False)]
    monkeypatch.undo()
    # positions of the pinned pairs inside the natural model's ``log_b_active``
    act = np.asarray(design.active)
    am, ak = np.nonzero(act)

    def to_natural(flat_changed, rest):
        p = dict(rest)
        off = 0
        for k in changed:
            n = int(np.size(raw[k]))
            p[k] = flat_changed[off:off + n].reshape(np.shape(raw[k]))
            off += n
        t = handlers.trace(handlers.substitute(model, data=p)).get_trace(
            design, PRIORS, centered=True)
        log_b = jnp.log(t["b"]["value"])
        tail = t["log_b_active"]["value"]
        full = jnp.zeros(am.size)
        keep = ~np.isin(ak, pinned_cols)
        full = full.at[np.flatnonzero(keep)].set(tail)
        pin = np.flatnonzero(~keep)
        full = full.at[pin].set(log_b[am[pin], ak[pin]])
        z_r = []
        for site in bounded:  # softplus coordinates of the natural model
            y = t[site]["value"] / PRIORS[site]["median"]
            z_r.append(y + jnp.log(-jnp.expm1(-y)))
        loc, scale = PRIORS.lognormal_loc_scale("b_pop")  # natural z_b_pop
        z_pop = (jnp.log(t["b_pop"]["value"]) - jnp.asarray(loc)) / jnp.asarray(scale)
        return full, jnp.concatenate([jnp.stack(z_r), z_pop])

    rng = np.random.default_rng(5)
    for _ in range(3):
        point = {k: np.asarray(v) for k, v in raw.items()}
        for k in changed:
            point[k] = point[k] + rng.normal(0.0, 0.2, np.shape(point[k]))
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(point[k])) for k in changed])
        rest = {k: v for k, v in point.items() if k not in changed}
        lp_raw, _ = log_density(model, (design, PRIORS), {"centered": True}, point)

        def out(f, rest=rest):
            full, z_r = to_natural(f, rest)
            return jnp.concatenate([full, z_r])

        J = jax.jacfwd(out)(flat)
        # rows that change: the pinned pairs of log_b_active, the bounded overheads'
        # coordinates and z_b_pop (re-centred for the pinned components)
        pinned_rows = np.flatnonzero(np.isin(ak, pinned_cols))
        rows = np.concatenate([pinned_rows, am.size + np.arange(len(bounded) + 6)])
        _, logdet = np.linalg.slogdet(np.asarray(J)[rows])
        full, z_r = to_natural(flat, rest)
        nat = dict(rest, log_b_active=full, z_b_pop=z_r[len(bounded):],
                   **{f"z_{site}": z_r[i] for i, site in enumerate(bounded)})
        monkeypatch.setattr(config, "PINNED_COMPONENTS", ())
        monkeypatch.setattr(config, "RECENTRED_POPULATION", False)
        assert sorted(nat) == sorted(nat_names)
        lp_nat, _ = log_density(model, (design, PRIORS), {"centered": True}, nat)
        monkeypatch.undo()
        np.testing.assert_allclose(float(lp_raw), float(lp_nat) + logdet, rtol=0, atol=1e-6)
