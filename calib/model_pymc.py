"""The step-time model in PyMC: the cross-check backend (``--backend pymc``).

Same hierarchies, site names, dims and densities as :mod:`calib.model` (NumPyro):
``z_b_pop``, ``b_pop``, ``tau``, ``z_b``/``log_b_active``, ``b``, ``tau_exp``,
``z_b_exp``/``log_b_exp_active``, ``b_exp``, ``z_per_*_us`` and ``per_*_us``,
``alpha``, ``sigma_pooled``/``sigma``, the noise sites of :mod:`calib.noise`
(``stall_frac``, ``stall_log_mult``, ``stall_sd_frac``, ``fast_frac``, ``fast_log_mult``,
``fast_sd_frac``; deterministics ``stall_prob``, ``stall_log_sd``, ``fast_prob``,
``fast_log_sd``, ``mean_factor``) and the
observed ``log_duration``.
Only the sampler differs, so posteriors must agree within Monte-Carlo error
(``tests/test_pymc_agree.py``). PyMC is imported lazily.
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
    _pinned_pairs,
    active_pairs,
    bounded_overheads,
    noncentered_columns,
    pinned,
    recentred_columns,
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
            x = unit * pt.softplus(z)
            lx = pt.log(x)
            return (
                -0.5 * ((lx - loc) / sd) ** 2
                - lx
                - pt.log(sd)
                - 0.5 * np.log(2 * np.pi)
                + pt.log(unit)
                + pt.log(pt.sigmoid(z))
            )

        def random(loc, sd, unit, rng=None, size=None):
            x = np.exp(rng.normal(loc, sd, size=size)) / unit
            return x + np.log(-np.expm1(-x))

        z = pm.CustomDist(f"z_{name}", loc, sd, med, logp=logp, random=random)
        return pm.Deterministic(name, med * pt.softplus(z))
    z = pm.Normal(f"z_{name}", 0.0, 1.0)
    return pm.Deterministic(name, pt.exp(loc + sd * z))


def _normal_logp(x, mu, sd):
    """Log density of N(mu, sd) at x (pytensor expressions or numbers)."""
    import pytensor.tensor as pt

    return -0.5 * ((x - mu) / sd) ** 2 - pt.log(sd) - 0.5 * math.log(2 * math.pi)


def _overhead_below(site: str, log_bound, prior: Prior):
    """``overhead = exp(log_bound) · sigmoid(u)`` with its exact prior
    (``calib.geometry._overhead_below``)."""
    import pymc as pm
    import pytensor.tensor as pt

    u = pm.Normal(f"z_{site}", 0.0, BOUNDED_BASE_SD)
    log_r = log_bound + pt.log(pt.sigmoid(u))
    loc, sd = math.log(prior["median"]), prior["log_sd"]
    # log-normal density of r (normal in log r, minus log r) + log |dr/du| (log r + log
    # sigmoid(-u)), minus the raw site's own density
    lp = (
        (_normal_logp(log_r, loc, sd) - log_r)
        + log_r
        + pt.log(pt.sigmoid(-u))
        - _normal_logp(u, 0.0, BOUNDED_BASE_SD)
    )
    pm.Potential(f"{site}_jacobian", lp)
    return pm.Deterministic(site, pt.exp(log_r))


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
            recentred = []  # as calib.geometry._per_model_log_b
            if am.size:
                rc = recentred_columns(data, ak, centered)
                mloc = pt.switch(rc, loc[ak], log_b_pop[ak])
                spread = pt.switch(rc, scale[ak], tau[ak])
                if centered:  # same mixed form as calib.geometry._nested
                    nc = noncentered_columns(ak)
                    raw = pm.Normal(
                        "log_b_active",
                        pt.switch(nc, 0.0, mloc),
                        pt.switch(nc, 1.0, spread),
                        dims="active",
                    )
                    act = pt.switch(nc, mloc + spread * raw, raw)
                else:
                    act = mloc + spread * pm.Normal("z_b", 0.0, 1.0, dims="active")
                log_b = pt.set_subtensor(pt.as_tensor(log_b)[am, ak], act)
                for k in np.unique(ak[rc]):
                    sel = np.flatnonzero(ak == k)
                    base = pt.sum(_normal_logp(act[sel], loc[k], scale[k]))
                    recentred.append((k, am[sel], act[sel], base))
            medians = np.array([priors[site]["median"] for site, _ in OVERHEAD_SITES])
            b_med = np.array([priors[f"b_pop.{c}"]["median"] for c in COMPONENTS])
            for k, name in pinned().items():  # same coordinates as calib.geometry._pinned_log_b
                pin = _pinned_pairs(data, k)
                wm = pin.models
                if not wm.size:
                    continue
                comp = COMPONENTS[k]
                base_loc = np.log(b_med[k] * pin.scale + pin.counts @ medians + pin.shares @ b_med)
                z = pm.Normal(name, 0.0, 1.0, dims=f"{comp}_model")
                log_c = base_loc + z
                c = pt.exp(log_c)
                shared = pt.sum(pin.shares * pt.exp(pt.as_tensor(log_b)[wm]), axis=-1)
                rest = c - shared
                for j, (site, _) in enumerate(OVERHEAD_SITES):  # as calib.geometry._pinned_log_b
                    if not pin.counts[:, j].any():
                        continue
                    if site not in per:
                        log_room = pt.log(pt.maximum(rest, 1e-300)) - np.log(pin.counts[:, j])
                        per[site] = _overhead_below(site, pt.min(log_room), priors[site])
                    rest = rest - pin.counts[:, j] * per[site]
                ok = rest > 1e-12 * c
                rest_s = pt.switch(ok, rest, 1.0)
                log_bk = pt.log(rest_s) - np.log(pin.scale)
                lp = log_c - pt.log(rest_s) - _normal_logp(z, 0.0, 1.0)
                pm.Potential(f"c_{comp}_jacobian", pt.sum(pt.switch(ok, lp, -np.inf)))
                recentred.append((k, wm, log_bk, 0.0))
            for k, models, log_bk, base in recentred:
                # as calib.geometry._recentred_population: b_pop relative to the models' mean
                tau_k, z_k, n = tau[k], z_b_pop[k], models.size
                pop_k = pt.mean(log_bk) + tau_k / np.sqrt(n) * z_k
                lp_pop = (
                    pt.sum(_normal_logp(log_bk, pop_k, tau_k))
                    + _normal_logp(pop_k, loc[k], scale[k])
                    + pt.log(tau_k)
                    - 0.5 * np.log(n)
                    - _normal_logp(z_k, 0.0, 1.0)
                    - base
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
                    raw = pm.Normal(
                        "log_b_exp_active",
                        pt.switch(nc, 0.0, eloc),
                        pt.switch(nc, 1.0, tau_exp[aek]),
                        dims="active_exp",
                    )
                    act = pt.switch(nc, eloc + tau_exp[aek] * raw, raw)
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
