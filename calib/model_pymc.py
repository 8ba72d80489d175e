"""The step-time model in PyMC: the cross-check backend (``--backend pymc``).

Same hierarchies, site names, dims and densities as :mod:`calib.model` (NumPyro):
``z_b_pop``, ``b_pop``, ``tau``, ``z_b``/``log_b_active``, ``b``, ``tau_exp``,
``z_b_exp``/``log_b_exp_active``, ``b_exp``, ``z_per_*_us`` and ``per_*_us``,
``alpha``, ``sigma_pooled``/``sigma``, the noise sites of :mod:`calib.noise`
(``stall_frac``, ``stall_log_mult``, ``stall_sd_frac``, ``fast_frac``, ``fast_log_mult``,
``fast_sd_frac``; deterministics ``stall_prob``, ``stall_log_sd``, ``fast_prob``,
``fast_log_sd``, ``mean_factor``) and the
observed ``log_duration``.
The sampler's coordinates are :mod:`calib.geometry`'s transforms, called with
``pytensor.tensor``. Only the sampler differs, so posteriors must agree within
Monte-Carlo error (``tests/test_pymc_agree.py``). PyMC is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calib import config, noise, steptime
from calib.data import ModelData
from calib.geometry import (
    BOUNDED_BASE_SD,
    active_pairs,
    bounded_overhead,
    bounded_overheads,
    nested_law,
    nested_value,
    noncentered_columns,
    normal_logp,
    pinned,
    pinned_base_loc,
    pinned_log_b,
    pinned_sets,
    recentred_columns,
    recentred_population,
    softplus_overhead,
)
from calib.model import OBS_SITE, SITE_DIMS, get_model
from calib.priors import Prior, Priors, pymc_variable
from calib.vocab import COMPONENTS, OVERHEAD_SITES


def _overhead(name: str, prior: Prior):
    """Overhead (µs) through the raw coordinate ``z_<name>`` (as calib.geometry._overhead)."""
    import pymc as pm
    import pytensor.tensor as pt

    med, sd = prior["median"], prior["log_sd"]
    loc = math.log(med)
    if config.OVERHEAD_COORDINATES == "softplus":

        def logp(z, loc, sd, unit):
            return softplus_overhead(z, loc, sd, unit, pt)[1]

        def random(loc, sd, unit, rng=None, size=None):
            x = np.exp(rng.normal(loc, sd, size=size)) / unit
            return x + np.log(-np.expm1(-x))

        z = pm.CustomDist(f"z_{name}", loc, sd, med, logp=logp, random=random)
        return pm.Deterministic(name, softplus_overhead(z, loc, sd, med, pt)[0])
    z = pm.Normal(f"z_{name}", 0.0, 1.0)
    return pm.Deterministic(name, pt.exp(loc + sd * z))


def _overhead_below(site: str, log_bound, prior: Prior):
    """``overhead = exp(log_bound) · sigmoid(u)`` with its exact prior; returns
    (overhead, u) (``calib.geometry._overhead_below``)."""
    import pymc as pm
    import pytensor.tensor as pt

    u = pm.Normal(f"z_{site}", 0.0, BOUNDED_BASE_SD)
    log_r, lp = bounded_overhead(u, log_bound, prior, pt)
    pm.Potential(f"{site}_jacobian", lp - normal_logp(u, 0.0, BOUNDED_BASE_SD, pt))
    return pm.Deterministic(site, pt.exp(log_r)), u


def build_pymc_model(
    hierarchy: str,
    data: ModelData,
    priors: Priors,
    coords: Mapping[str, Sequence[Any]],
    *,
    centered: bool | None = None,
):
    """The PyMC model of ``hierarchy`` (``pm.Model``; sample it with ``pm.sample``).

    Parameters
    ----------
    hierarchy
        One of :data:`calib.model.HIERARCHIES`.
    data
        :class:`calib.model.ModelData` (``duration_us`` None: no observed site values).
    priors
        Validated priors.
    coords
        As returned by :func:`calib.model.build_model_data` (``model``,
        ``component``, ``experiment``, ``active``, ``active_exp``, optional ``step``).
    centered
        Centred per-model corrections (default ``calib.config.MODEL_CENTERED``).
    """
    import pymc as pm
    import pytensor.tensor as pt

    get_model(hierarchy)  # validates the name
    key = str(hierarchy).replace("_", "-")
    centered = config.MODEL_CENTERED if centered is None else centered
    coords = {k: list(v) for k, v in coords.items()}
    C = np.asarray(data.components, dtype=np.float64)
    midx = np.asarray(data.model_idx)
    eidx = np.asarray(data.experiment_idx)
    M = data.n_models
    with pm.Model(coords=coords) as model:
        bounded = bounded_overheads(data) if key != "pooled" else ()
        per = {
            site: _overhead(site, priors[site]) for site, _ in OVERHEAD_SITES if site not in bounded
        }
        loc, scale = (np.asarray(a) for a in priors.lognormal_loc_scale("b_pop"))
        z_b_pop = pm.Normal("z_b_pop", 0.0, 1.0, dims="component")
        log_b_pop = loc + scale * z_b_pop
        if key == "pooled":
            pm.Deterministic("b_pop", pt.exp(log_b_pop), dims="component")
            log_b = pt.broadcast_to(log_b_pop, (M, len(COMPONENTS)))
            b = pm.Deterministic("b", pt.exp(log_b), dims=("model", "component"))
            s = priors["sigma"].pymc("sigma_pooled")
            sigma = pm.Deterministic("sigma", pt.broadcast_to(s, (M,)), dims="model")
        else:
            tau = pymc_variable("tau", priors.component("tau"), dims="component")
            am, ak = active_pairs(data)
            log_b = pt.broadcast_to(log_b_pop, (M, len(COMPONENTS)))
            # as calib.geometry._per_model_log_b: the raw law of each component's entries
            rc = np.isin(np.arange(len(COMPONENTS)), ak[recentred_columns(data, ak, centered)])
            law = (pt.switch(rc, loc, log_b_pop), pt.switch(rc, scale, tau))
            if am.size:
                mloc, spread = law[0][ak], law[1][ak]
                if centered:  # same mixed form as calib.geometry._nested
                    nc = noncentered_columns(ak)
                    raw = pm.Normal(
                        "log_b_active", *nested_law(mloc, spread, nc, pt), dims="active"
                    )
                    act = nested_value(raw, mloc, spread, nc, pt)
                else:
                    act = mloc + spread * pm.Normal("z_b", 0.0, 1.0, dims="active")
                log_b = pt.set_subtensor(pt.as_tensor(log_b)[am, ak], act)
            pins = pinned_sets(data)  # same coordinates as calib.geometry._pinned_log_b
            recentred = []
            if pins:
                zs = {
                    k: pm.Normal(pinned()[k], 0.0, 1.0, dims=f"{COMPONENTS[k]}_model") for k in pins
                }
                log_b, log_bk, lp_shares, lp_k = pinned_log_b(
                    pins,
                    {k: pinned_base_loc(pin, k, priors) for k, pin in pins.items()},
                    zs,
                    log_b,
                    law,
                    per,
                    lambda site, log_bound: _overhead_below(site, log_bound, priors[site]),
                    M,
                    pt,
                )
                pm.Potential("shares_jacobian", lp_shares)
                for k in pins:
                    pm.Potential(f"c_{COMPONENTS[k]}_jacobian", pt.sum(lp_k[k]))
            for k in np.flatnonzero(rc).tolist():
                models = am[ak == k]
                vals = log_b[models, k]
                recentred.append((k, models, vals, pt.sum(normal_logp(vals, loc[k], scale[k], pt))))
            if pins:
                recentred += [(k, pins[k].models, log_bk[k], 0.0) for k in pins]
            for k, models, log_bk, base in recentred:
                # as calib.geometry._recentred_population: b_pop relative to the models' mean
                pop_k, lp_pop = recentred_population(
                    log_bk, models.size, z_b_pop[k], tau[k], loc[k], scale[k], pt, base
                )
                pm.Potential(f"b_pop_{COMPONENTS[k]}_jacobian", lp_pop)
                log_b_pop = pt.set_subtensor(pt.as_tensor(log_b_pop)[k], pop_k)
                log_b = pt.set_subtensor(pt.as_tensor(log_b)[:, k], pop_k)
                log_b = pt.set_subtensor(pt.as_tensor(log_b)[models, k], log_bk)
            pm.Deterministic("b_pop", pt.exp(log_b_pop), dims="component")
            b = pm.Deterministic("b", pt.exp(log_b), dims=("model", "component"))
            sigma = priors["sigma"].pymc("sigma", dims="model")
        table, idx = b, midx
        if key == "per-experiment":
            tau_exp = pymc_variable("tau_exp", priors.component("tau_exp"), dims="component")
            em = np.asarray(data.experiment_model)
            full = log_b[em]
            ae, aek = np.nonzero(np.asarray(data.active_exp))
            if ae.size:
                eloc = full[ae, aek]
                if centered:
                    nc = noncentered_columns(aek)
                    law = nested_law(eloc, tau_exp[aek], nc, pt)
                    raw = pm.Normal("log_b_exp_active", *law, dims="active_exp")
                    act = nested_value(raw, eloc, tau_exp[aek], nc, pt)
                else:
                    act = eloc + tau_exp[aek] * pm.Normal("z_b_exp", 0.0, 1.0, dims="active_exp")
                full = pt.set_subtensor(full[ae, aek], act)
            table = pm.Deterministic("b_exp", pt.exp(full), dims=("experiment", "component"))
            idx = eidx
        alpha = priors["alpha"].pymc("alpha")
        params = _noise_params(priors, sigma, M)
        terms = C * table[idx]
        mu = steptime.step_time_us(
            pt,
            [terms[:, k] for k in range(len(COMPONENTS))],
            np.asarray(data.num_layers),
            np.asarray(data.batch_size),
            per["per_layer_us"],
            per["per_request_us"],
            per["per_step_us"],
            alpha,
        )
        obs = None if data.duration_us is None else np.log(np.asarray(data.duration_us))
        kw = {"dims": SITE_DIMS[OBS_SITE]} if "step" in coords else {}
        pm.CustomDist(
            OBS_SITE,
            pt.log(mu),
            *(p[midx] for p in params),
            logp=noise.pymc_log_density,
            random=_noise_random,
            observed=obs,
            **kw,
        )
    return model


def _noise_params(priors: Priors, sigma, M: int) -> tuple:
    """The noise parameters per model, as calib.model._noise_params (same sites)."""
    import pymc as pm
    import pytensor.tensor as pt

    cap = config.NOISE_MAX_TAIL_PROB
    stall_prob = pm.Deterministic("stall_prob", cap * priors["stall_prob"].pymc("stall_frac"))
    stall_log_mult = priors["stall_log_mult"].pymc("stall_log_mult")
    sd_cap = config.NOISE_MAX_TAIL_LOG_SD
    stall_log_sd = pm.Deterministic(
        "stall_log_sd", sd_cap * priors["stall_log_sd"].pymc("stall_sd_frac")
    )
    fast_prob = pm.Deterministic(
        "fast_prob", cap * priors["fast_prob"].pymc("fast_frac", dims="model"), dims="model"
    )
    fast_log_mult = priors["fast_log_mult"].pymc("fast_log_mult", dims="model")
    fast_log_sd = pm.Deterministic(
        "fast_log_sd",
        sd_cap * priors["fast_log_sd"].pymc("fast_sd_frac", dims="model"),
        dims="model",
    )
    params = tuple(
        pt.broadcast_to(v, (M,))
        for v in (
            sigma,
            stall_prob,
            stall_log_mult,
            stall_log_sd,
            fast_prob,
            fast_log_mult,
            fast_log_sd,
        )
    )
    pm.Deterministic("mean_factor", noise.mean_factor(*params, xp=pt), dims="model")
    return params


def _noise_random(log_m, *params, rng=None, size=None):
    """Draws of ``log y`` (calib.noise.sample) for PyMC's forward sampling."""
    return np.log(noise.sample(rng, np.exp(log_m), *params, size=size))
