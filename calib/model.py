"""The hierarchical step-time model (NumPyro), one sibling function per hierarchy.

For sampled step ``i`` of LLM ``m`` with roofline terms ``T`` (µs, ``calib.roofline``)::

    prefill = b[m, pf_compute]·T_pf_compute + b[m, pf_kv]·T_pf_kv
    decode  = b[m, dc_compute]·T_dc_compute + b[m, dc_kv]·T_dc_kv
    mu      = prefill + decode − alpha·min(prefill, decode)
              + b[m, weight]·T_weight + b[m, tp]·T_tp
              + per_layer_us·L + per_request_us·B + per_step_us     (calib.steptime)
    log y   = log mu + eps + stall + fast                         (calib.noise)
    eps ~ Normal(0, sigma[m]); with prob. stall_prob a step stalls: + N(stall_log_mult,
    stall_log_sd) (pooled); with prob. fast_prob[m]: − N(fast_log_mult[m], fast_log_sd[m])

``mu`` is the body *median*; the predictive mean step time is ``mean_factor[m]·mu``.

Hierarchies (sibling functions, as in NumPyro's ``examples/baseball.py``):

``pooled``
    one set of corrections ``b_pop`` for all models (``b`` repeats it), one noise scale.
``per_model`` (default, ``"per-model"``)
    ``log b[m, k] ~ Normal(log b_pop[k], tau[k])`` for *active* pairs only: a component
    whose basis is identically zero for a model (``tp`` at TP=1) has no sample site;
    its ``b[m, k]`` equals ``b_pop[k]``.
``per_experiment`` (``"per-experiment"``)
    ``per_model`` plus ``log b_exp[e, k] ~ Normal(log b[model(e), k], tau_exp[k])`` for
    active (experiment, component) pairs; the mean function uses ``b_exp``.

Every hierarchy produces the deterministic sites ``b`` (model, component),
``sigma``, ``stall_prob``, ``fast_prob`` and ``mean_factor`` (model,) (noise scalars
shared across models are scalars), so export and prediction code is hierarchy-agnostic.
:data:`SITE_DIMS` maps each site to its dimension names.

Sampler coordinates (:mod:`calib.geometry`): the per-model (and per-experiment) log
corrections are centred (``log_b_active ~ N(log b_pop, tau)``) or non-centred
(``z_b ~ N(0, 1)``, ``log b = log b_pop + tau·z_b``), chosen by ``centered`` (default
:data:`calib.config.MODEL_CENTERED`); with observations, population means are sampled
relative to their models' mean, the pinned components through the quantities the data
pin, and the overheads in softplus / bounded coordinates. All carry exact Jacobians, so
the posterior is the one written above; only the natural parameters are saved.

Model functions must be run with concrete data (NumPyro's default
``jit_model_args=False``): the set of active pairs decides site shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from calib import config, noise, steptime
from calib.data import (  # noqa: F401  (build/synthetic re-exported for callers of calib.model)
    ModelData,
    build_model_data,
    make_model_data,
    synthetic_model_data,
)
from calib.errors import CalibError
from calib.geometry import (
    _nested,
    _overheads,
    _per_model_log_b,
    _pinned_pairs,
    _population,
    _static_pairs,
    active_pairs,
    pinned,
)
from calib.priors import Priors, numpyro_distribution
from calib.vocab import (
    COMPONENTS,
    HIERARCHIES,
    PARAMETER_SITES,  # noqa: F401  (re-exported for callers of calib.model)
    WEIGHT,
)

Array = Any  # numpy or jax array

#: Name of the observed site (log of the step duration in µs).
OBS_SITE = "log_duration"

#: Every site of every hierarchy -> its dimension names. Coordinates come from
#: :func:`build_model_data` (``model``, ``component``, ``experiment``, ``active``,
#: ``active_exp``, ``step``).
SITE_DIMS: dict[str, tuple[str, ...]] = {
    # population (all hierarchies)
    "z_b_pop": ("component",),
    "b_pop": ("component",),
    # per-model partial pooling
    "tau": ("component",),
    "z_b": ("active",),
    "log_b_active": ("active",),
    "z_c_weight": ("weight_model",),
    "c_weight_jacobian": (),
    "z_c_pf_compute": ("pf_compute_model",),
    "c_pf_compute_jacobian": (),
    "z_c_dc_compute": ("dc_compute_model",),
    "c_dc_compute_jacobian": (),
    "shares_jacobian": (),
    **{f"b_pop_{c}_jacobian": () for c in COMPONENTS},
    "per_layer_us_jacobian": (),
    "per_request_us_jacobian": (),
    "per_step_us_jacobian": (),
    "b": ("model", "component"),
    # per-experiment nesting
    "tau_exp": ("component",),
    "z_b_exp": ("active_exp",),
    "log_b_exp_active": ("active_exp",),
    "b_exp": ("experiment", "component"),
    # shared overheads (µs)
    "z_per_layer_us": (),
    "per_layer_us": (),
    "z_per_request_us": (),
    "per_request_us": (),
    "z_per_step_us": (),
    "per_step_us": (),
    # batch mixing and noise
    "alpha": (),
    "sigma_pooled": (),
    "sigma": ("model",),
    "stall_frac": (),
    "stall_prob": (),
    "stall_log_mult": (),
    "stall_sd_frac": (),
    "stall_log_sd": (),
    "fast_frac": ("model",),
    "fast_prob": ("model",),
    "fast_log_mult": ("model",),
    "fast_sd_frac": ("model",),
    "fast_log_sd": ("model",),
    "mean_factor": ("model",),
    OBS_SITE: ("step",),
}


def model_coords(
    data: ModelData,
    models: Sequence[str],
    experiments: Sequence[str],
    steps: Sequence[int] | np.ndarray | None = None,
) -> dict[str, list]:
    """Coordinates for :data:`SITE_DIMS` (labels of active pairs included)."""
    am, ak = active_pairs(data)
    ae, aek = np.nonzero(np.asarray(data.active_exp))
    coords: dict[str, list] = {
        "model": list(models),
        "component": list(COMPONENTS),
        "experiment": list(experiments),
        "active": [f"{models[m]}/{COMPONENTS[k]}" for m, k in zip(am, ak, strict=True)],
        "active_exp": [
            f"{experiments[int(e)]}/{COMPONENTS[k]}" for e, k in zip(ae, aek, strict=True)
        ],
    }
    for k in pinned():
        coords[f"{COMPONENTS[k]}_model"] = [models[m] for m in _pinned_pairs(data, k).models]
    if steps is not None:
        coords["step"] = [int(s) for s in steps]
    return coords


# ------------------------------------------------------------------ mean function
#: More runs of equal index than this and the mean function gathers per step instead.
MAX_RUNS = 64


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _runs(idx: Array) -> list[tuple[int, int, int]] | None:
    """Static runs ``(start, end, value)`` of equal values in a concrete index array.

    None when ``idx`` is traced or has more than :data:`MAX_RUNS` runs. Data sorted by
    experiment (as :func:`build_model_data` returns it) has one run per experiment, so
    the likelihood multiplies contiguous column slices by scalars: no per-step gather
    and no scatter-add in the gradient.
    """
    if not _is_concrete(idx):
        return None
    a = np.asarray(idx)
    if a.size == 0:
        return []
    cut = np.flatnonzero(np.diff(a)) + 1
    if cut.size + 1 > MAX_RUNS:
        return None
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [a.size]])
    return [(int(s), int(e), int(a[s])) for s, e in zip(starts, ends, strict=True)]


def _per_row(values: Array, idx: Array, runs: list[tuple[int, int, int]] | None) -> Array:
    """``values[idx]`` for a 1-D table: broadcast per run, else gather."""
    if runs is None:
        return jnp.take(values, jnp.asarray(idx), axis=0)
    if len(runs) == 1:
        return jnp.broadcast_to(values[runs[0][2]], (runs[0][1],))
    return jnp.concatenate([jnp.broadcast_to(values[v], (e - s,)) for s, e, v in runs])


def _mu(
    table: Array, idx: Array, data: ModelData, per_layer_us, per_request_us, per_step_us, alpha
) -> Array:
    """Mean step time (µs); ``table`` (rows, 6) are the corrections indexed by ``idx``."""
    runs = _runs(idx) if _is_concrete(data.components) else None
    if runs is None:
        C = jnp.asarray(data.components)
        terms = C * jnp.take(table, jnp.asarray(idx), axis=0)
        cols = [terms[:, k] for k in range(len(COMPONENTS))]
    else:
        # column-major constant, sliced per run at trace time (contiguous, no gather)
        CT = np.ascontiguousarray(np.asarray(data.components, dtype=np.float64).T)
        pieces = [[CT[k, s:e] * table[v, k] for s, e, v in runs] for k in range(len(COMPONENTS))]
        cols = [p[0] if len(p) == 1 else jnp.concatenate(p) for p in pieces]
    return steptime.step_time_us(
        jnp,
        cols,
        jnp.asarray(data.num_layers),
        jnp.asarray(data.batch_size),
        per_layer_us,
        per_request_us,
        per_step_us,
        alpha,
    )


def step_time_us(params: Mapping[str, Array], data: ModelData) -> Array:
    """Mean step time ``mu`` (µs) per step for one draw of the parameters.

    Parameters
    ----------
    params
        ``b`` (n_models, 6), ``per_layer_us``, ``per_request_us``, ``per_step_us``,
        ``alpha``; with ``b_exp`` (n_experiments, 6) present the corrections are
        taken per experiment (per-experiment hierarchy).
    data
        :class:`ModelData` (``duration_us`` unused).

    Returns
    -------
    (n,) array, µs. Pure ``jnp``; ``jax.vmap(step_time_us, (0, None))`` maps over draws.
    """
    if "b_exp" in params and params["b_exp"] is not None:
        table, idx = jnp.asarray(params["b_exp"]), data.experiment_idx
    else:
        table, idx = jnp.asarray(params["b"]), data.model_idx
    return _mu(
        table,
        idx,
        data,
        params["per_layer_us"],
        params["per_request_us"],
        params["per_step_us"],
        params["alpha"],
    )


# ------------------------------------------------------------------ likelihood
def _noise_params(data: ModelData, priors: Priors, sigma: Array) -> tuple[Array, ...]:
    """Sample the noise parameters (:mod:`calib.noise`); return them per model, in
    :class:`calib.noise.NoiseParams` order, each (n_models,).

    Scoping: the body scale ``sigma`` is per model (given); the stall component is pooled
    (``stall_frac``, ``stall_log_mult``, ``stall_log_sd``: hiccups of the serving stack, a
    few per thousand steps, too rare to estimate per model); the fast component is per
    model (``fast_frac``, ``fast_log_mult``, ``fast_log_sd``: steps one model's mean
    function over-predicts, e.g. a MoE model's small decode batches). Each tail
    probability is ``NOISE_MAX_TAIL_PROB·frac`` with ``frac ~ Beta`` (the body stays the
    majority), each multiplier's log sd ``NOISE_MAX_TAIL_LOG_SD·frac`` (a finite mean
    factor even where the data leave it to the prior); stall shifts log y up and fast
    shifts it down (no label switching).
    Records ``stall_prob``, ``fast_prob`` and ``mean_factor`` = E[y]/m per model.
    """
    M = data.n_models
    cap = config.NOISE_MAX_TAIL_PROB
    stall_prob = numpyro.deterministic(
        "stall_prob", cap * numpyro.sample("stall_frac", priors["stall_prob"].numpyro())
    )
    stall_log_mult = numpyro.sample("stall_log_mult", priors["stall_log_mult"].numpyro())
    sd_cap = config.NOISE_MAX_TAIL_LOG_SD
    stall_log_sd = numpyro.deterministic(
        "stall_log_sd", sd_cap * numpyro.sample("stall_sd_frac", priors["stall_log_sd"].numpyro())
    )
    fast_prob = numpyro.deterministic(
        "fast_prob", cap * numpyro.sample("fast_frac", priors["fast_prob"].numpyro().expand([M]))
    )
    fast_log_mult = numpyro.sample("fast_log_mult", priors["fast_log_mult"].numpyro().expand([M]))
    fast_log_sd = numpyro.deterministic(
        "fast_log_sd",
        sd_cap * numpyro.sample("fast_sd_frac", priors["fast_log_sd"].numpyro().expand([M])),
    )
    params = tuple(
        jnp.broadcast_to(v, (M,))
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
    numpyro.deterministic("mean_factor", noise.mean_factor(*params, xp=jnp))
    return params


def _noise_and_likelihood(
    data: ModelData,
    priors: Priors,
    per: Mapping[str, Array],
    table: Array,
    idx: Array,
    sigma: Array,
) -> None:
    """The one likelihood of every hierarchy: ``log y ~ LogStallNormal(log mu, noise[m])``."""
    alpha = numpyro.sample("alpha", priors["alpha"].numpyro())
    params = _noise_params(data, priors, sigma)
    mu = _mu(
        table, idx, data, per["per_layer_us"], per["per_request_us"], per["per_step_us"], alpha
    )
    if data.duration_us is None:
        obs = None
    else:
        obs = data.log_duration if data.log_duration is not None else jnp.log(data.duration_us)
    runs = _runs(data.model_idx)
    rows = [_per_row(p, data.model_idx, runs) for p in params]
    numpyro.sample(OBS_SITE, noise.LogStallNormal(jnp.log(mu), *rows), obs=obs)


def _sigma_per_model(data: ModelData, priors: Priors) -> Array:
    return numpyro.sample("sigma", priors["sigma"].numpyro().expand([data.n_models]))


# ------------------------------------------------------------------ the models
def pooled(data: ModelData, priors: Priors, *, centered: bool | None = None) -> None:
    """One set of corrections and one noise scale for every model.

    ``b`` and ``sigma`` repeat ``b_pop`` and ``sigma_pooled`` across models.
    ``centered`` is accepted for a uniform signature and ignored.
    """
    del centered
    per = _overheads(priors)
    _, log_b_pop = _population(priors)
    numpyro.deterministic("b_pop", jnp.exp(log_b_pop))
    b = numpyro.deterministic(
        "b", jnp.broadcast_to(jnp.exp(log_b_pop), (data.n_models, len(COMPONENTS)))
    )
    s = numpyro.sample("sigma_pooled", priors["sigma"].numpyro())
    numpyro.deterministic("sigma", jnp.broadcast_to(s, (data.n_models,)))
    _noise_and_likelihood(data, priors, per, b, data.model_idx, s)


def per_model(data: ModelData, priors: Priors, *, centered: bool | None = None) -> None:
    """Per-model corrections partially pooled around ``b_pop`` (default hierarchy).

    Active (model, component) pairs get ``log b ~ Normal(log b_pop, tau)``
    (centred: site ``log_b_active``; non-centred: ``z_b``); inactive pairs equal
    ``b_pop``. Per-model noise scale ``sigma``.
    """
    centered = config.MODEL_CENTERED if centered is None else centered
    per = _overheads(priors, data)
    log_b = _per_model_log_b(data, priors, centered, per)
    sigma = _sigma_per_model(data, priors)
    _noise_and_likelihood(data, priors, per, jnp.exp(log_b), data.model_idx, sigma)


def per_experiment(data: ModelData, priors: Priors, *, centered: bool | None = None) -> None:
    """``per_model`` plus workload effects: per-experiment log deviations of ``b``.

    Active (experiment, component) pairs get ``log b_exp ~ Normal(log b[model], tau_exp)``;
    the mean function uses ``b_exp`` (site (experiment, component)).
    """
    centered = config.MODEL_CENTERED if centered is None else centered
    per = _overheads(priors, data)
    log_b = _per_model_log_b(data, priors, centered, per)
    tau_exp = numpyro.sample("tau_exp", numpyro_distribution(priors.component("tau_exp")))
    em = np.asarray(data.experiment_model)
    full = log_b[em]
    ae, ak = _static_pairs(data.active_exp, "active_exp")
    if ae.size:
        full = full.at[ae, ak].set(
            _nested("z_b_exp", "log_b_exp_active", full, ae, ak, tau_exp, centered)
        )
    b_exp = numpyro.deterministic("b_exp", jnp.exp(full))
    sigma = _sigma_per_model(data, priors)
    _noise_and_likelihood(data, priors, per, b_exp, data.experiment_idx, sigma)


_MODELS: dict[str, Callable[..., None]] = {
    "pooled": pooled,
    "per-model": per_model,
    "per-experiment": per_experiment,
}


def get_model(hierarchy: str) -> Callable[..., None]:
    """The model function of a hierarchy name (``-`` or ``_`` accepted).

    Raises
    ------
    CalibError
        Unknown hierarchy.
    """
    key = str(hierarchy).replace("_", "-")
    if key not in _MODELS:
        raise CalibError(
            f"unknown hierarchy {hierarchy!r}",
            field="--hierarchy",
            fix=f"use one of {', '.join(HIERARCHIES)}",
        )
    return _MODELS[key]


def sample_sites(hierarchy: str, centered: bool | None = None) -> tuple[str, ...]:
    """Names of the latent sample sites a hierarchy can have (before data masking)."""
    centered = config.MODEL_CENTERED if centered is None else centered
    key = str(hierarchy).replace("_", "-")
    get_model(key)
    base = [
        "z_b_pop",
        "z_per_layer_us",
        "z_per_request_us",
        "z_per_step_us",
        "alpha",
        "stall_frac",
        "stall_log_mult",
        "stall_sd_frac",
        "fast_frac",
        "fast_log_mult",
        "fast_sd_frac",
    ]
    if key == "pooled":
        return tuple(base + ["sigma_pooled"])
    base += ["tau", "sigma", "log_b_active" if centered else "z_b"]
    base += list(pinned().values())
    if key == "per-experiment":
        base += ["tau_exp", "log_b_exp_active" if centered else "z_b_exp"]
    return tuple(base)


# ------------------------------------------------------------------ simulation helpers
def _without_obs(data: ModelData) -> ModelData:
    return data._replace(duration_us=None, log_duration=None)


def prior_predictive(
    hierarchy: str,
    data: ModelData,
    priors: Priors,
    num_samples: int = 500,
    seed: int = 0,
    *,
    centered: bool | None = None,
) -> dict[str, np.ndarray]:
    """Prior draws and the step times they imply.

    Returns
    -------
    dict
        Every site of the model (leading dim ``num_samples``), plus
        ``mu_us`` (draws, n) = the mean step time and ``duration_us`` (draws, n)
        = simulated observed step times including the noise (calib.noise), both µs.
    """
    from numpyro.infer import Predictive

    model = get_model(hierarchy)
    pred = Predictive(model, num_samples=int(num_samples))
    out = pred(jax.random.key(int(seed)), _without_obs(data), priors, centered=centered)
    res = {k: np.asarray(v) for k, v in out.items()}
    params = {
        k: out[k]
        for k in ("b", "b_exp", "per_layer_us", "per_request_us", "per_step_us", "alpha")
        if k in out
    }
    res["mu_us"] = np.asarray(jax.vmap(step_time_us, (0, None))(params, data))
    with np.errstate(over="ignore"):  # heavy-tailed prior draws may overflow: inf µs
        res["duration_us"] = np.exp(res.pop(OBS_SITE))
    return res


def simulate_from_model(
    hierarchy: str,
    data: ModelData,
    *,
    priors: Priors | None = None,
    params: Mapping[str, Array] | None = None,
    seed: int = 0,
    centered: bool | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate step durations (µs) from the model itself.

    With ``params`` (``b``, optional ``b_exp``, the overheads, ``alpha``, ``sigma``
    (n_models,), ``stall_prob``, ``stall_log_mult``, ``stall_log_sd`` and optionally
    ``fast_prob``, ``fast_log_mult``, ``fast_log_sd``, scalars or (n_models,)) those are
    the truth; otherwise one prior draw (all sites) is the truth. Returns
    ``(duration_us, truth)``.
    """
    key_prior, key_noise = jax.random.split(jax.random.key(int(seed)))
    if params is None:
        if priors is None:
            raise ValueError("give priors or params")
        from numpyro.infer import Predictive

        draw = Predictive(get_model(hierarchy), num_samples=1)(
            key_prior, _without_obs(data), priors, centered=centered
        )
        truth = {k: np.asarray(v[0]) for k, v in draw.items() if k != OBS_SITE}
    else:
        truth = {k: np.asarray(v) for k, v in params.items()}
    mu = np.asarray(step_time_us(truth, data))
    midx = np.asarray(data.model_idx)
    rows = [
        None if truth.get(k) is None else np.broadcast_to(truth[k], (data.n_models,))[midx]
        for k in noise.NOISE_PARAMS
    ]
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key_noise)).ravel())
    with np.errstate(over="ignore"):
        return noise.sample(rng, mu, *(r for r in rows if r is not None)), truth


# ------------------------------------------------------------------ reporting
def collinearity_report(idata, *, log: bool = True) -> Any:
    """Posterior correlation of the per-step constants (weight per model, overheads).

    Within one model ``b[m, weight]·T_weight``, ``per_layer_us·L`` and ``per_step_us``
    are constant per step (collinear); only priors and pooling across models
    separate them. Large |correlation| says how much.

    Returns
    -------
    pandas.DataFrame
        Correlation matrix (of logs when ``log``) over all chains and draws; rows and
        columns ``weight[<model>]``, ``per_layer_us``, ``per_request_us``, ``per_step_us``.
    """
    import pandas as pd

    post = idata.posterior
    cols: dict[str, np.ndarray] = {}
    b = post["b"]
    comp_dim = b.dims[-1]
    model_dim = b.dims[-2]
    bw = b.sel({comp_dim: "weight"}) if comp_dim in b.coords else b.isel({comp_dim: WEIGHT})
    for i in range(bw.sizes[model_dim]):
        label = str(bw[model_dim].values[i]) if model_dim in bw.coords else str(i)
        cols[f"weight[{label}]"] = np.asarray(bw.isel({model_dim: i}).values).reshape(-1)
    for site in ("per_layer_us", "per_request_us", "per_step_us"):
        cols[site] = np.asarray(post[site].values).reshape(-1)
    frame = pd.DataFrame({k: np.log(v) if log else v for k, v in cols.items()})
    return frame.corr()
