"""The hierarchical step-time model (NumPyro), one sibling function per hierarchy.

For sampled step ``i`` of LLM ``m`` with roofline terms ``T`` (µs, ``calib.roofline``)::

    prefill = b[m, pf_compute]·T_pf_compute + b[m, pf_kv]·T_pf_kv
    decode  = b[m, dc_compute]·T_dc_compute + b[m, dc_kv]·T_dc_kv
    mix     = alpha·max(prefill, decode) + (1 − alpha)·(prefill + decode)
            = prefill + decode − alpha·min(prefill, decode)
    mu      = mix + b[m, weight]·T_weight + b[m, tp]·T_tp
              + per_layer_us·L + per_request_us·B + per_step_us
    log y   ~ StudentT(nu, log mu, sigma[m])

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

Every hierarchy produces the deterministic sites ``b`` (model, component) and
``sigma`` (model,), so export and prediction code is hierarchy-agnostic.
:data:`SITE_DIMS` maps each site to its dimension names.

Parameterisation: all log-normal scalars are sampled standardised (``z_* ~ N(0, 1)``,
value = exp(log-median + log_sd·z)); the per-model (and per-experiment) log
corrections are either centred (``log_b_active ~ N(log b_pop, tau)``) or
non-centred (``z_b ~ N(0, 1)``, ``log b = log b_pop + tau·z_b``), chosen by
``centered`` (default :data:`calib.config.MODEL_CENTERED`, measured in
``bench/bench_geometry.py``). With observations, the population mean of a centred
component is sampled relative to its models' mean (:func:`_recentred_population`),
and the pinned components go through the quantities the data pin (:func:`pinned`);
both carry exact Jacobians, so the posterior is the one written above.

Model functions must be run with concrete data (NumPyro's default
``jit_model_args=False``): the set of active pairs decides site shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from calib import config, steptime
from calib.data import (  # noqa: F401  (build/synthetic re-exported for callers of calib.model)
    ModelData,
    build_model_data,
    make_model_data,
    synthetic_model_data,
)
from calib.errors import CalibError
from calib.priors import Prior, Priors, numpyro_distribution
from calib.vocab import (
    COMPONENTS,
    DC_C,
    HIERARCHIES,
    OVERHEAD_SITES,
    PARAMETER_SITES,
    PF_C,
    PF_KV,
    TP,
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
    "nu": (),
    OBS_SITE: ("step",),
}


def model_coords(data: ModelData, models: Sequence[str], experiments: Sequence[str],
                 steps: Sequence[int] | None = None) -> dict[str, list]:
    """Coordinates for :data:`SITE_DIMS` (labels of active pairs included)."""
    am, ak = active_pairs(data)
    ae, aek = np.nonzero(np.asarray(data.active_exp))
    coords: dict[str, list] = {
        "model": list(models), "component": list(COMPONENTS), "experiment": list(experiments),
        "active": [f"{models[m]}/{COMPONENTS[k]}" for m, k in zip(am, ak, strict=True)],
        "active_exp": [f"{experiments[e]}/{COMPONENTS[k]}" for e, k in zip(ae, aek, strict=True)],
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


def _mu(table: Array, idx: Array, data: ModelData, per_layer_us, per_request_us,
        per_step_us, alpha) -> Array:
    """Mean step time (µs); ``table`` (rows, 6) are the corrections indexed by ``idx``."""
    runs = _runs(idx) if _is_concrete(data.components) else None
    if runs is None:
        C = jnp.asarray(data.components)
        terms = C * jnp.take(table, jnp.asarray(idx), axis=0)
        cols = [terms[:, k] for k in range(len(COMPONENTS))]
    else:
        # column-major constant, sliced per run at trace time (contiguous, no gather)
        CT = np.ascontiguousarray(np.asarray(data.components, dtype=np.float64).T)
        pieces = [[CT[k, s:e] * table[v, k] for s, e, v in runs]
                  for k in range(len(COMPONENTS))]
        cols = [p[0] if len(p) == 1 else jnp.concatenate(p) for p in pieces]
    return steptime.step_time_us(jnp, cols, jnp.asarray(data.num_layers),
                                 jnp.asarray(data.batch_size), per_layer_us, per_request_us,
                                 per_step_us, alpha)


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
    return _mu(table, idx, data, params["per_layer_us"], params["per_request_us"],
               params["per_step_us"], params["alpha"])


# ------------------------------------------------------------------ likelihood
class LogStudentT(dist.Distribution):
    """Student-t on log duration with a per-model scale, evaluated cheaply.

    Same density as ``StudentT(nu, loc, scale[model_idx])`` but ``nu`` stays a
    scalar (no per-step ``lgamma``) and ``log scale`` is taken per model, not per
    step: per step only ``log1p`` of the squared standardised residual is computed.
    """

    arg_constraints = {"loc": dist.constraints.real}
    support = dist.constraints.real
    reparametrized_params = ["loc"]

    def __init__(self, nu, loc, sigma, model_idx, runs, *, validate_args=None):
        self.nu = nu
        self.loc = loc
        self.sigma = sigma
        self._idx = model_idx
        self._runs = runs
        super().__init__(batch_shape=jnp.shape(loc), validate_args=validate_args)

    def _rows(self, values):
        return values if jnp.ndim(values) == 0 else _per_row(values, self._idx, self._runs)

    def sample(self, key, sample_shape=()):
        t = jax.random.t(key, self.nu, sample_shape + self.batch_shape)
        return self.loc + self._rows(self.sigma) * t

    def log_prob(self, value):
        nu = self.nu
        const = (jax.scipy.special.gammaln(0.5 * (nu + 1.0)) - jax.scipy.special.gammaln(0.5 * nu)
                 - 0.5 * jnp.log(nu * jnp.pi))
        r = (value - self.loc) * self._rows(1.0 / self.sigma)
        return const - self._rows(jnp.log(self.sigma)) - 0.5 * (nu + 1.0) * jnp.log1p(r * r / nu)


# ------------------------------------------------------------------ overhead coordinates
def _softplus_inv(y):
    """Inverse of softplus, stable for large and small ``y > 0``."""
    return y + jnp.log(-jnp.expm1(-y))


class SoftplusLogNormal(dist.Distribution):
    """The law of ``z`` when ``unit·softplus(z) ~ LogNormal(loc, scale)``.

    The additive overheads (µs) are sampled in these coordinates: for values above
    ``unit`` (the prior median) they are *linear* in ``z``, so the ridge
    ``b_weight·T_weight + per_layer·L + per_step ≈ const`` (collinear per-step
    constants) is straight instead of exponentially curved as it is in log
    coordinates. The prior on the overhead itself is exactly the log-normal.
    """

    arg_constraints = {"loc": dist.constraints.real, "scale": dist.constraints.positive}
    support = dist.constraints.real

    def __init__(self, loc, scale, unit, *, validate_args=None):
        self.loc, self.scale, self.unit = loc, scale, unit
        super().__init__(batch_shape=jnp.shape(loc), validate_args=validate_args)

    def value(self, z):
        """The overhead (µs) of raw coordinate ``z``."""
        return self.unit * jax.nn.softplus(z)

    def sample(self, key, sample_shape=()):
        x = dist.LogNormal(self.loc, self.scale).sample(key, sample_shape + self.batch_shape)
        return _softplus_inv(x / self.unit)

    def log_prob(self, z):
        x = self.value(z)
        return (dist.LogNormal(self.loc, self.scale).log_prob(x) + jnp.log(self.unit)
                + jax.nn.log_sigmoid(z))


# ------------------------------------------------------------------ prior pieces
def _overhead(name: str, prior: Prior) -> Array:
    """A log-normal overhead (µs) sampled through its raw coordinate ``z_<name>``.

    ``config.OVERHEAD_COORDINATES``: ``"softplus"`` (``name = median·softplus(z)``,
    see :class:`SoftplusLogNormal`) or ``"log"`` (``name = median·exp(log_sd·z)``,
    ``z ~ N(0, 1)``).
    """
    med, sd = prior["median"], prior["log_sd"]
    if config.OVERHEAD_COORDINATES == "softplus":
        d = SoftplusLogNormal(math.log(med), sd, med)
        return numpyro.deterministic(name, d.value(numpyro.sample(f"z_{name}", d)))
    z = numpyro.sample(f"z_{name}", dist.Normal(0.0, 1.0))
    return numpyro.deterministic(name, jnp.exp(math.log(med) + sd * z))


def _population(priors: Priors) -> tuple[Array, Array]:
    """Sample ``z_b_pop``; return (z, log b_pop) (6,) in the prior's coordinates
    (``log b_pop = loc + scale·z``; :func:`_per_model_log_b` re-centres the pinned
    components' entries). The caller records ``b_pop``."""
    loc, scale = priors.lognormal_loc_scale("b_pop")
    z = numpyro.sample("z_b_pop", dist.Normal(0.0, 1.0).expand([len(COMPONENTS)]))
    return z, jnp.asarray(loc) + jnp.asarray(scale) * z


def noncentered_columns(cols: np.ndarray) -> np.ndarray:
    """Mask of pairs (by component column) kept non-centred in centred mode.

    ``config.NONCENTERED_COMPONENTS``: components whose basis is small next to the
    step time (tp: the all-reduce term), so the data pin each model's correction only
    weakly and the centred form is a funnel in ``tau``.
    """
    ids = [COMPONENTS.index(c) for c in config.NONCENTERED_COMPONENTS]
    return np.isin(np.asarray(cols), ids)


def _static_pairs(mask: Array, what: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mask, jax.core.Tracer):
        raise CalibError(f"ModelData.{what} must be concrete", field=what,
                         fix="run the model with jit_model_args=False (NumPyro's default)")
    return tuple(np.nonzero(np.asarray(mask)))  # type: ignore[return-value]


def _nested(name_z: str, name_c: str, parent_log: Array, rows: np.ndarray, cols: np.ndarray,
            scale: Array, centered: bool) -> Array:
    """Log values for active pairs around ``parent_log[rows, cols]`` with spread ``scale[cols]``.

    Centred mode keeps the components of ``config.NONCENTERED_COMPONENTS`` non-centred
    inside the same site (:func:`noncentered_columns`): their entries of ``name_c`` are
    the standardised deviations ``z`` (value ``loc + scale·z``).
    """
    loc = parent_log[rows, cols]
    s = scale[cols]
    if centered:
        nc = noncentered_columns(cols)
        raw = numpyro.sample(name_c, dist.Normal(jnp.where(nc, 0.0, loc), jnp.where(nc, 1.0, s)))
        return jnp.where(nc, loc + s * raw, raw)
    z = numpyro.sample(name_z, dist.Normal(0.0, 1.0).expand([rows.size]))
    return loc + s * z


def pinned() -> dict[int, str]:
    """Pinned component index -> its raw site name (``config.PINNED_COMPONENTS``).

    A pinned component k of model m is sampled as ``log c[m]`` with
    ``c = b[m, k]·scale[m] + counts[m]·(per_layer_us, per_request_us, per_step_us)
    + Σ_j shares[m, j]·b[m, j]`` (see :func:`_pinned_pairs`).
    """
    return {COMPONENTS.index(name): f"z_c_{name}" for name in config.PINNED_COMPONENTS}


#: Pinnable components, and the non-pinned components whose basis is (nearly) a
#: multiple of theirs within one model: ``tp`` = k·(prefill + decode tokens) and
#: ``pf_kv`` = k·prefill tokens, next to the per-token GEMM terms.
PINNABLE = {WEIGHT: (), PF_C: (PF_KV, TP), DC_C: (TP,)}


class Pinned(NamedTuple):
    """What the data pin for one pinned component (:func:`_pinned_pairs`)."""

    models: np.ndarray  # (p,) model indices
    scale: np.ndarray   # (p,) basis per unit (µs)
    counts: np.ndarray  # (p, 3) overhead units per unit (per_layer, per_request, per_step)
    shares: np.ndarray  # (p, 6) basis of collinear components per unit (µs)


def _collinear_shares(C: np.ndarray, k: int) -> np.ndarray:
    """(6,) multiple of component ``k``'s basis carried by each collinear component.

    Least squares of each ``PINNABLE[k]`` column on the per-token GEMM bases
    (pf_compute, dc_compute) of one model's steps, clipped at 0; the coefficient
    on column ``k`` is the share. Any value gives exact densities (the Jacobian
    does not depend on it); a good one makes the pinned direction the data's.
    """
    out = np.zeros(len(COMPONENTS))
    X = C[:, [PF_C, DC_C]]
    if not PINNABLE[k] or not np.any(X):
        return out
    for j in PINNABLE[k]:
        if not np.any(C[:, j]):
            continue
        coef, *_ = np.linalg.lstsq(X, C[:, j], rcond=None)
        out[j] = max(float(coef[0 if k == PF_C else 1]), 0.0)
    return out


def _observed(data: ModelData) -> bool:
    """Whether ``data`` carries observations. Without them (prior draws) the natural
    coordinates are used: NumPyro's Predictive ignores factor sites, so only they give
    exact prior draws."""
    return data.duration_us is not None or data.log_duration is not None


def _pinned_pairs(data: ModelData, k: int) -> Pinned:
    """Models whose component ``k`` is sampled through its pinned constant.

    Units: weight per step (scale mean T_weight; counts mean layers, 0, 1);
    dc_compute per request (scale mean dc_compute per request; counts 0, 1, 0);
    pf_compute per unit of its own basis (scale 1, counts 0). ``shares`` from
    :func:`_collinear_shares`, in the same unit. Empty when ``k`` is not pinned
    (:func:`pinned`) or the data carry no observations.
    """
    if k not in pinned() or not _observed(data):
        return Pinned(np.zeros(0, int), np.zeros(0), np.zeros((0, 3)),
                      np.zeros((0, len(COMPONENTS))))
    if k not in PINNABLE:  # pragma: no cover - config names only pinnable components
        raise CalibError(f"component {COMPONENTS[k]!r} cannot be pinned",
                         field="PINNED_COMPONENTS",
                         fix=f"use {', '.join(COMPONENTS[i] for i in PINNABLE)}")
    act = np.asarray(data.active)
    models = np.flatnonzero(act[:, k])
    midx = np.asarray(data.model_idx)
    C = np.asarray(data.components)
    L = np.asarray(data.num_layers)
    B = np.asarray(data.batch_size)
    scale, counts, shares = [], [], []
    for m in models:
        rows = midx == m
        share = _collinear_shares(C[rows], k)
        if k == WEIGHT:
            scale.append(C[rows, k].mean())
            counts.append([L[rows].mean(), 0.0, 1.0])
        elif k == DC_C:
            per_req = C[rows, k].mean() / max(B[rows].mean(), 1e-12)
            scale.append(per_req)
            counts.append([0.0, 1.0, 0.0])
            share = share * per_req
        else:
            scale.append(1.0)
            counts.append([0.0, 0.0, 0.0])
        shares.append(share * act[m])
    return Pinned(models, np.asarray(scale, float), np.asarray(counts, float).reshape(-1, 3),
                  np.asarray(shares, float).reshape(-1, len(COMPONENTS)))


def active_pairs(data: ModelData) -> tuple[np.ndarray, np.ndarray]:
    """(model, component) pairs sampled by ``z_b`` / ``log_b_active`` (dim ``active``).

    Active pairs, minus the pinned pairs carried by ``z_c_<component>`` (see
    :func:`_per_model_log_b`).
    """
    am, ak = _static_pairs(data.active, "active")
    keep = np.ones(am.size, bool)
    for k in pinned():
        keep &= ~((ak == k) & np.isin(am, _pinned_pairs(data, k).models))
    return am[keep], ak[keep]


def _pinned_log_b(k: int, data: ModelData, priors: Priors, log_b: Array,
                  per: dict[str, Array]) -> tuple[np.ndarray, Array]:
    """Sample ``z_c_<k>`` for the pinned models; return (models, log b[models, k]).

    Records the Jacobian factor of ``log c -> log b`` (``c_<k>_jacobian``); the
    hierarchical density of log b is added by :func:`_recentred_population`.

    ``log_b`` (M, 6) holds the log corrections sampled so far (those of the collinear
    components of :data:`PINNABLE` among them).
    The shared overheads counted by ``k``'s constant (:data:`BOUNDED_OVERHEADS`) are
    sampled here, each below the smallest constant left after the shares and the
    overheads before it (:func:`_overhead_below`), and added to ``per``.
    """
    pin = _pinned_pairs(data, k)
    wm = pin.models
    if not wm.size:
        return wm, None
    name = pinned()[k]
    medians = np.array([priors[site]["median"] for site, _ in OVERHEAD_SITES])
    b_med = np.array([priors[f"b_pop.{c}"]["median"] for c in COMPONENTS])
    base_loc = np.log(b_med[k] * pin.scale + pin.counts @ medians + pin.shares @ b_med)
    z = numpyro.sample(name, dist.Normal(0.0, 1.0).expand([wm.size]))
    log_c = jnp.asarray(base_loc) + z
    c = jnp.exp(log_c)
    shared = jnp.sum(jnp.asarray(pin.shares) * jnp.exp(log_b[wm]), axis=-1)
    rest = c - shared
    for j, (site, _) in enumerate(OVERHEAD_SITES):
        if not pin.counts[:, j].any():
            continue
        if site not in per:  # bounded: below every model's remaining constant
            tiny = jnp.finfo(jnp.result_type(rest)).tiny  # 1e-300 is 0 in float32
            log_room = jnp.log(jnp.maximum(rest, tiny)) - np.log(pin.counts[:, j])
            per[site] = _overhead_below(site, jnp.min(log_room), priors[site])
        rest = rest - pin.counts[:, j] * per[site]
    ok = rest > 1e-12 * c
    rest_s = jnp.where(ok, rest, 1.0)
    log_bk = jnp.log(rest_s) - np.log(pin.scale)
    # |d log b / d log c| = c / rest; the raw site's own N(0, 1) density is removed
    # again (it only shapes the start).
    lp = log_c - jnp.log(rest_s) - dist.Normal(0.0, 1.0).log_prob(z)
    numpyro.factor(f"c_{COMPONENTS[k]}_jacobian", jnp.sum(jnp.where(ok, lp, -jnp.inf)))
    # Outside the support (c below the overheads) the factor is -inf; keep log b finite
    # there so nested sites (per-experiment) stay valid distributions.
    return wm, jnp.where(ok, log_bk, 0.0)


def recentred_columns(data: ModelData, cols: np.ndarray, centered: bool) -> np.ndarray:
    """Mask of active pairs (by component column) whose component's population mean is
    sampled relative to its models' mean (:func:`_recentred_population`).

    ``config.RECENTRED_POPULATION``, centred mode, not in ``config.NONCENTERED_COMPONENTS``,
    with observations (prior draws use the prior's coordinates: see :func:`_observed`).
    Pinned pairs are not among the active pairs (:func:`active_pairs`); their components
    are always re-centred.
    """
    cols = np.asarray(cols)
    if not (config.RECENTRED_POPULATION and centered and _observed(data)):
        return np.zeros(cols.shape, bool)
    return ~noncentered_columns(cols)


def _recentred_population(k: int, log_bk: Array, z_k: Array, tau_k: Array,
                          priors: Priors, base_lp: Array | float = 0.0) -> Array:
    """log b_pop[k], sampled relative to its models' mean.

    The data pin each model's log b[m, k], so with a small spread ``tau[k]`` the
    population mean is confined to ``mean_m log b[m, k] ± tau[k]/√M``: sampled as
    ``loc + scale·z`` it forms a funnel with ``tau[k]`` (measured: the sd of
    log b_pop[weight] grows from 0.036 to 0.15 across the posterior of tau[weight], and
    the divergences of the default fit sat at its narrow end; likewise dc_kv with three
    models). Here ``log b_pop[k] = mean_m log b[m, k] + tau[k]/√M · z_k``
    (``z_k`` = ``z_b_pop[k]``), which is N(0, 1)-shaped at every ``tau``. Factor
    ``b_pop_<k>_jacobian``: the hierarchical density of the M values, the prior of
    log b_pop[k] and ``log(tau[k]/√M)``, minus the site's own N(0, 1) density and
    ``base_lp`` (the log density of the raw law the M values were sampled from, if any).
    """
    M = log_bk.shape[0]
    log_b_pop_k = jnp.mean(log_bk) + tau_k / math.sqrt(M) * z_k
    loc, scale = (np.asarray(a)[k] for a in priors.lognormal_loc_scale("b_pop"))
    lp = (jnp.sum(dist.Normal(log_b_pop_k, tau_k).log_prob(log_bk))
          + dist.Normal(float(loc), float(scale)).log_prob(log_b_pop_k)
          + jnp.log(tau_k) - 0.5 * math.log(M) - dist.Normal(0.0, 1.0).log_prob(z_k)
          - base_lp)
    numpyro.factor(f"b_pop_{COMPONENTS[k]}_jacobian", lp)
    return log_b_pop_k


#: Shared overheads sampled below a pinned component's constants (in this order), when
#: that component is pinned: the per-step constant counts L·per_layer + per_step, the
#: decode cost per request counts per_request.
BOUNDED_OVERHEADS = {WEIGHT: ("per_layer_us", "per_step_us"), DC_C: ("per_request_us",)}
#: Base law of the raw site ``z_<overhead>`` in the bounded coordinate (it only shapes
#: NUTS's start; its density is removed again by the Jacobian factor).
BOUNDED_BASE_SD = 1.5


def _overhead_below(site: str, log_bound: Array, prior: Prior) -> Array:
    """A shared overhead (µs) sampled as a fraction of the room the pinned constants leave.

    A pinned constant ``c[m] = b[m, k]·scale[m] + counts[m]·overheads + shares`` needs
    every overhead it counts below ``c[m]``: e.g. ``per_request_us < min c`` for the
    decode cost per request. Sampling the overhead linearly puts that boundary inside
    the sampler's space, where ``log b`` of the tightest model runs to −∞ in a spike
    (measured: the divergences of the default fit; stuck chains at the real data size
    for ``per_step_us``). Here ``overhead = exp(log_bound)·sigmoid(u)`` (raw site
    ``z_<site> = u``, ``log_bound`` the log of the smallest room per unit): the boundary
    moves to ``u → ∞``, where ``log b`` of that model falls linearly in ``u``. The prior
    is unchanged: the log-normal density of the overhead plus
    ``log |d overhead / du| = log overhead + log sigmoid(−u)`` (factor
    ``<site>_jacobian``); the pinned constants' own Jacobians are in :func:`_pinned_log_b`.
    """
    base = dist.Normal(0.0, BOUNDED_BASE_SD)
    u = numpyro.sample(f"z_{site}", base)
    log_r = log_bound + jax.nn.log_sigmoid(u)
    lp = (dist.LogNormal(math.log(prior["median"]), prior["log_sd"]).log_prob(jnp.exp(log_r))
          + log_r + jax.nn.log_sigmoid(-u) - base.log_prob(u))
    numpyro.factor(f"{site}_jacobian", lp)
    return numpyro.deterministic(site, jnp.exp(log_r))


def _per_model_log_b(data: ModelData, priors: Priors, centered: bool,
                     per: dict[str, Array]) -> Array:
    """Per-model log corrections (M, 6); records ``b``.

    Pinned components (``config.PINNED_COMPONENTS``): within one model, ``b_w·T_weight``,
    ``per_layer_us·L`` and ``per_step_us`` are constant per step, and the decode cost
    per request ``b_dc·(dc_compute per request)`` and ``per_request_us`` both grow with
    the decode count, so the data pin only their sums ``c``; in (log b, overheads)
    coordinates the posterior is a thin curved ridge. Likewise the tp basis is a
    multiple of the tokens in the step and pf_kv of the prefill tokens, so within a
    model they trade against the per-token GEMM corrections (pf_compute, dc_compute).
    We sample ``log c`` (raw site ``z_c_<component>``: ``log c = log c_prior + z``),
    ``c`` including the overheads and the shares of those collinear components
    (:func:`_pinned_pairs`), and derive ``b = (c − overheads − shares) / scale``. The
    prior is unchanged: the hierarchical density of log b plus the log-Jacobian
    ``log c − log(c − overheads − shares)`` (factor site ``c_<component>_jacobian``).
    """
    z_pop, log_b_pop = _population(priors)
    tau = numpyro.sample("tau", numpyro_distribution(priors.component("tau")))
    full = jnp.broadcast_to(log_b_pop, (data.n_models, len(COMPONENTS)))
    recentred = []  # (component, models, log b[models, k], log density of their raw law)
    am, ak = active_pairs(data)
    if am.size:
        # re-centred components: their centred entries are sampled from the prior's law
        # of log b_pop (base, removed again), then b_pop relative to their mean
        rc = np.isin(np.arange(len(COMPONENTS)), ak[recentred_columns(data, ak, centered)])
        loc, scale = (jnp.asarray(a) for a in priors.lognormal_loc_scale("b_pop"))
        parent = jnp.broadcast_to(jnp.where(rc, loc, log_b_pop), full.shape)
        log_b_act = _nested("z_b", "log_b_active", parent, am, ak, jnp.where(rc, scale, tau),
                            centered)
        full = full.at[am, ak].set(log_b_act)
        for k in np.flatnonzero(rc):
            sel = ak == k
            base = jnp.sum(dist.Normal(loc[k], scale[k]).log_prob(log_b_act[sel]))
            recentred.append((k, am[sel], log_b_act[sel], base))
    for k in pinned():
        wm, log_bk = _pinned_log_b(k, data, priors, full, per)
        if wm.size:
            recentred.append((k, wm, log_bk, 0.0))
    for k, models, log_bk, base in recentred:
        pop_k = _recentred_population(k, log_bk, z_pop[k], tau[k], priors, base)
        log_b_pop = log_b_pop.at[k].set(pop_k)
        full = full.at[:, k].set(pop_k).at[models, k].set(log_bk)
    numpyro.deterministic("b_pop", jnp.exp(log_b_pop))
    numpyro.deterministic("b", jnp.exp(full))
    return full


def _overheads(priors: Priors, data: ModelData | None = None) -> dict[str, Array]:
    """Sample the shared overheads (µs) that are not bounded by pinned constants
    (:func:`bounded_overheads`: those are sampled in :func:`_pinned_log_b`)."""
    skip = bounded_overheads(data) if data is not None else ()
    return {site: _overhead(site, priors[site]) for site, _ in OVERHEAD_SITES
            if site not in skip}


def bounded_overheads(data: ModelData) -> tuple[str, ...]:
    """Overheads sampled below the pinned constants (:func:`_overhead_below`): those of
    :data:`BOUNDED_OVERHEADS` whose component is pinned, with observations."""
    return tuple(site for k, sites in BOUNDED_OVERHEADS.items()
                 if k in pinned() and _pinned_pairs(data, k).models.size for site in sites)


def _noise_and_likelihood(data: ModelData, priors: Priors, per: Mapping[str, Array],
                          table: Array, idx: Array, sigma: Array) -> None:
    alpha = numpyro.sample("alpha", priors["alpha"].numpyro())
    nu = numpyro.sample("nu", priors["nu"].numpyro())
    mu = _mu(table, idx, data, per["per_layer_us"], per["per_request_us"], per["per_step_us"],
             alpha)
    if data.duration_us is None:
        obs = None
    else:
        obs = data.log_duration if data.log_duration is not None else jnp.log(data.duration_us)
    numpyro.sample(OBS_SITE, LogStudentT(nu, jnp.log(mu), sigma, data.model_idx,
                                         _runs(data.model_idx)), obs=obs)


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
    b = numpyro.deterministic("b", jnp.broadcast_to(jnp.exp(log_b_pop),
                                                    (data.n_models, len(COMPONENTS))))
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
        full = full.at[ae, ak].set(_nested("z_b_exp", "log_b_exp_active", full, ae, ak,
                                           tau_exp, centered))
    b_exp = numpyro.deterministic("b_exp", jnp.exp(full))
    sigma = _sigma_per_model(data, priors)
    _noise_and_likelihood(data, priors, per, b_exp, data.experiment_idx, sigma)


_MODELS: dict[str, Callable[..., None]] = {
    "pooled": pooled, "per-model": per_model, "per-experiment": per_experiment,
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
        raise CalibError(f"unknown hierarchy {hierarchy!r}", field="--hierarchy",
                         fix=f"use one of {', '.join(HIERARCHIES)}")
    return _MODELS[key]


def sample_sites(hierarchy: str, centered: bool | None = None) -> tuple[str, ...]:
    """Names of the latent sample sites a hierarchy can have (before data masking)."""
    centered = config.MODEL_CENTERED if centered is None else centered
    key = str(hierarchy).replace("_", "-")
    get_model(key)
    base = ["z_b_pop", "z_per_layer_us", "z_per_request_us", "z_per_step_us", "alpha", "nu"]
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


def prior_predictive(hierarchy: str, data: ModelData, priors: Priors, num_samples: int = 500,
                     seed: int = 0, *, centered: bool | None = None) -> dict[str, np.ndarray]:
    """Prior draws and the step times they imply.

    Returns
    -------
    dict
        Every site of the model (leading dim ``num_samples``), plus
        ``mu_us`` (draws, n) = the mean step time and ``duration_us`` (draws, n)
        = simulated observed step times including the Student-t noise, both µs.
    """
    from numpyro.infer import Predictive

    model = get_model(hierarchy)
    pred = Predictive(model, num_samples=int(num_samples))
    out = pred(jax.random.key(int(seed)), _without_obs(data), priors, centered=centered)
    res = {k: np.asarray(v) for k, v in out.items()}
    params = {k: out[k] for k in ("b", "b_exp", "per_layer_us", "per_request_us",
                                  "per_step_us", "alpha") if k in out}
    res["mu_us"] = np.asarray(jax.vmap(step_time_us, (0, None))(params, data))
    with np.errstate(over="ignore"):  # heavy-tailed prior draws may overflow: inf µs
        res["duration_us"] = np.exp(res.pop(OBS_SITE))
    return res


def simulate_from_model(hierarchy: str, data: ModelData, *, priors: Priors | None = None,
                        params: Mapping[str, Array] | None = None, seed: int = 0,
                        centered: bool | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate step durations (µs) from the model itself.

    With ``params`` (``b``, optional ``b_exp``, the overheads, ``alpha``, ``sigma``
    (n_models,), ``nu``) those are the truth; otherwise one prior draw (all sites)
    is the truth. Returns ``(duration_us, truth)``.
    """
    key_prior, key_noise = jax.random.split(jax.random.key(int(seed)))
    if params is None:
        if priors is None:
            raise ValueError("give priors or params")
        from numpyro.infer import Predictive

        draw = Predictive(get_model(hierarchy), num_samples=1)(
            key_prior, _without_obs(data), priors, centered=centered)
        truth = {k: np.asarray(v[0]) for k, v in draw.items() if k != OBS_SITE}
    else:
        truth = {k: np.asarray(v) for k, v in params.items()}
    mu = np.asarray(step_time_us(truth, data))
    sigma = np.asarray(truth["sigma"])[np.asarray(data.model_idx)]
    t = np.asarray(jax.random.t(key_noise, float(truth["nu"]), (mu.shape[0],)))
    with np.errstate(over="ignore"):
        return np.exp(np.log(mu) + sigma * t), truth


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
