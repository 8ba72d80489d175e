"""The sampler's coordinates for the step-time model: how NUTS sees the hierarchy.

:mod:`calib.model` states the hierarchies in natural coordinates (``b``, ``b_pop``,
``tau``, the overheads); the functions here sample them through coordinates chosen for
NUTS's geometry and add the exact log-Jacobian of every change of variables as a factor
site, so the density is the natural one (``tests/test_geometry.py`` checks the sampler's
density equals the natural density plus log|J|). Each change of variables is written once,
as a function of arrays in a namespace ``xp`` returning the natural value and the log
term (:func:`softplus_overhead`, :func:`bounded_overhead`, :func:`bounded_share`,
:func:`pinned_log_b`, :func:`recentred_population`,
:func:`nested_law`/:func:`nested_value`); the NumPyro sites
here and the PyMC mirror (:mod:`calib.model_pymc`) call the same functions. None of
these coordinates is saved (:func:`calib.posterior.save_posterior` keeps the natural
parameters), so changing them does not change a posterior file's meaning.

* overheads in softplus coordinates (:class:`SoftplusLogNormal`): linear above the prior
  median, so the collinear per-step constants form straight ridges;
* per-model corrections centred or non-centred (:func:`_nested`), with the components of
  ``config.NONCENTERED_COMPONENTS`` always non-centred;
* pinned components (:func:`pinned`, :func:`_pinned_log_b`): a model's correction sampled
  through the constant the data pin (``log c``), with the collinear corrections
  (:func:`bounded_share`) and the overheads (:func:`_overhead_below`) that constant
  counts sampled below the room it leaves, in logs (:func:`take_from_rooms`): no raw
  value reaches the support's boundary;
* re-centred population means (:func:`_recentred_population`): ``log b_pop`` relative
  to its models' mean, N(0, 1)-shaped at every ``tau``.

Without observations (prior draws) the natural coordinates are used (:func:`_observed`):
NumPyro's Predictive ignores factor sites.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from calib import config
from calib.data import ModelData
from calib.errors import CalibError
from calib.priors import Prior, Priors, numpyro_distribution
from calib.vocab import COMPONENTS, DC_C, OVERHEAD_SITES, PF_C, PF_KV, TP, WEIGHT

Array = Any  # jax or pytensor array


# ------------------------------------------------------------------ pure transforms
# Each change of variables once, as a pure function of arrays in the namespace ``xp``
# (``jax.numpy`` here, ``pytensor.tensor`` in calib.model_pymc) returning the natural
# value and the log density the sampler's coordinate carries (natural density + log|J|).
# The backends only create the sites and add the returned log terms (NumPyro factor,
# PyMC Potential); the normal and log-normal densities are each library's own.
def _softplus(x: Array, xp: Any) -> Array:
    return jax.nn.softplus(x) if xp is jnp else xp.softplus(x)


def _log_sigmoid(x: Array, xp: Any) -> Array:
    """``log sigmoid(x) = −softplus(−x)``."""
    return jax.nn.log_sigmoid(x) if xp is jnp else -xp.softplus(-x)


def normal_logp(x: Array, loc: Array, scale: Array, xp: Any = jnp) -> Array:
    """Log density of N(loc, scale) at ``x``: the backend's own (NumPyro's
    ``Normal.log_prob`` for ``jax.numpy``, ``pm.logp`` for ``pytensor.tensor``)."""
    if xp is jnp:
        return dist.Normal(loc, scale).log_prob(x)
    import pymc as pm

    return pm.logp(pm.Normal.dist(loc, scale), x)


def lognormal_logp(x: Array, loc: Array, scale: Array, xp: Any = jnp) -> Array:
    """Log density of LogNormal(loc, scale) at ``x > 0``: the backend's own."""
    if xp is jnp:
        return dist.LogNormal(loc, scale).log_prob(x)
    import pymc as pm

    return pm.logp(pm.LogNormal.dist(loc, scale), x)


def softplus_overhead(
    z: Array, loc: float, scale: float, unit: float, xp: Any = jnp
) -> tuple[Array, Array]:
    """An overhead in softplus coordinates: ``(unit·softplus(z), log density of z)`` when
    the overhead ~ LogNormal(loc, scale) (:class:`SoftplusLogNormal`)."""
    x = unit * _softplus(z, xp)
    return x, lognormal_logp(x, loc, scale, xp) + xp.log(unit) + _log_sigmoid(z, xp)


def bounded_overhead(
    u: Array, log_bound: Array, prior: Prior, xp: Any = jnp
) -> tuple[Array, Array]:
    """An overhead below ``exp(log_bound)`` (:func:`_overhead_below`): ``(log overhead,
    log prior density + log|d overhead / du|)`` of the raw coordinate ``u``;
    ``overhead = exp(log_bound)·sigmoid(u)``. The log-normal density is written as the
    normal density of ``log overhead`` minus ``log overhead``, which cancels against the
    ``log overhead`` of the Jacobian: finite at any ``u``."""
    log_r = log_bound + _log_sigmoid(u, xp)
    lp = normal_logp(log_r, math.log(prior["median"]), prior["log_sd"], xp) + _log_sigmoid(-u, xp)
    return log_r, lp


def bounded_share(
    x: Array, loc: Array, scale: Array, log_room: Array, xp: Any = jnp
) -> tuple[Array, Array]:
    """A collinear correction below its room (:func:`pinned_log_b`): ``(log b, log term)``.

    ``x`` is the value the correction's site gives (``loc + scale·z`` non-centred, or a
    centred draw of N(loc, scale)); ``log b = x − softplus(x − log_room)``, i.e.
    ``b = room·sigmoid(x − log_room)``: a logit of the fraction of the room centred on
    the hierarchical mean, so ``log b ≈ x`` (the natural coordinate, no funnel in
    ``scale``) while ``b`` is far below the room, and ``b → room`` smoothly as ``x → ∞``.
    The log term turns the site's density of ``x`` into the natural density of log b:
    ``N(log b; loc, scale) − N(x; loc, scale) + log|d log b / dx|``, with
    ``d log b / dx = sigmoid(log_room − x)``.
    """
    t = x - log_room
    log_b = x - _softplus(t, xp)
    lp = normal_logp(log_b, loc, scale, xp) - normal_logp(x, loc, scale, xp) + _log_sigmoid(-t, xp)
    return log_b, lp


def room_bound(log_rest: Array, coef: np.ndarray, per_model: bool, xp: Any = jnp) -> Array:
    """Log of the most a quantity can take from the rooms ``exp(log_rest)`` (K, M) when
    it takes ``coef`` (K, M, static, ≥ 0) units of room per unit from each: the minimum of
    ``log_rest − log coef`` over the constants that count it (``coef > 0``), per model
    (M,) or over all models (a scalar, for a shared overhead). 0 where nothing counts it."""
    use = coef > 0
    cand = xp.where(use, log_rest - np.log(np.where(use, coef, 1.0)), np.inf)
    if not per_model:
        return xp.min(cand)
    return xp.where(use.any(axis=0), xp.min(cand, axis=0), 0.0)


def take_from_rooms(
    log_rest: Array, coef: np.ndarray, log_bound: Array, t: Array, xp: Any = jnp
) -> Array:
    """``log_rest`` (K, M) after taking ``coef·q`` from each room, where
    ``q = exp(log_bound)·sigmoid(t)`` (``log_bound`` from :func:`room_bound`).

    In logs, without cancellation: with ``d = log_rest − log coef − log_bound ≥ 0``,
    ``rest − coef·q = rest·(1 − e^{−d}·sigmoid(t))`` and
    ``log(1 − e^{−d}·sigmoid(t)) = log sigmoid(−t) + softplus(t + log(1 − e^{−d}))``
    (the second term is 0 at ``d = 0``, the room that bounds ``q``), finite at any ``t``.
    """
    use = coef > 0
    d = xp.where(use, log_rest - np.log(np.where(use, coef, 1.0)) - log_bound, 1.0)
    pos = d > 0
    d_s = xp.where(pos, d, 1.0)  # the other branch's gradient stays finite
    left = _log_sigmoid(-t, xp) + xp.where(pos, _softplus(t + xp.log(-xp.expm1(-d_s)), xp), 0.0)
    return log_rest + xp.where(use, left, 0.0)


def pinned_log_b(
    pins: dict[int, Pinned],
    base_locs: dict[int, np.ndarray],
    zs: dict[int, Array],
    log_b: Array,
    law: tuple[Array, Array],
    per: dict[str, Array],
    overhead_below: Any,
    n_models: int,
    xp: Any = jnp,
) -> tuple[Array, dict[int, Array], Array, dict[int, Array]]:
    """log b of the pinned models (:func:`_per_model_log_b`) from the raw ``zs``, with
    the collinear corrections and the shared overheads they count sampled below the room
    the pinned constants leave. Pure but for ``overhead_below``, the backend's sampler of
    the bounded overheads.

    For each pinned component k (``pins``, raw ``zs[k]``): ``log c = base_locs[k] + z``,
    ``b[m, k] = (c − Σ_j shares[m, j]·b[m, j] − counts[m]·overheads) / scale[m]``. In
    order: (1) each collinear correction j (:data:`SHARE_COMPONENTS`) of a model whose
    pinned constants carry a share of it is put below the smallest room it leaves in
    those constants (tp in both pf_compute's and dc_compute's) by :func:`bounded_share`;
    its value ``x`` is ``log_b[m, j]`` as sampled, of law N(``law[0][j]``,
    ``law[1][j]``); (2) each overhead a constant counts is sampled by
    ``overhead_below(site, log_bound) -> (overhead, u)`` below the smallest room per
    unit over all models, ``overhead = exp(log_bound)·sigmoid(u)``, and stored in
    ``per``; (3) ``b`` is what is left. The rooms are carried in logs
    (:func:`take_from_rooms`), so no raw value reaches ``c − shares − overheads ≤ 0``:
    the support's boundary is at infinity in every raw coordinate.

    ``n_models`` is M. Returns ``log_b`` (M, 6) with the bounded corrections replaced,
    log b[models, k] per pinned component, the log term of the bounded corrections
    (natural density + log|J| − the site's density; :func:`bounded_share`) and per
    pinned component the per model ``log|d log b / d log c| = log c − log rest`` minus
    the raw site's N(0, 1) density, which only shapes the start.
    """
    ks = list(pins)

    def dense(rows: dict[int, np.ndarray]) -> np.ndarray:
        out = np.zeros((len(ks), n_models))
        for i, k in enumerate(ks):
            out[i, pins[k].models] = rows[k]
        return out

    log_c = {k: base_locs[k] + zs[k] for k in ks}
    embed = {k: np.eye(n_models)[:, pins[k].models] for k in ks}
    log_rest = xp.stack([xp.dot(embed[k], log_c[k]) for k in ks])
    cols = [log_b[:, j] for j in range(len(COMPONENTS))]
    lp_shares = 0.0
    for j in SHARE_COMPONENTS:
        coef = dense({k: pins[k].shares[:, j] for k in ks})
        if not coef.any():
            continue
        bounded = coef.any(axis=0)
        log_room = room_bound(log_rest, coef, True, xp)
        log_bj, lp = bounded_share(cols[j], law[0][j], law[1][j], log_room, xp)
        lp_shares = lp_shares + xp.sum(xp.where(bounded, lp, 0.0))
        log_rest = take_from_rooms(log_rest, coef, log_room, cols[j] - log_room, xp)
        cols[j] = xp.where(bounded, log_bj, cols[j])
    for o, (site, _) in enumerate(OVERHEAD_SITES):
        coef = dense({k: pins[k].counts[:, o] for k in ks})
        if not coef.any():
            continue
        log_bound = room_bound(log_rest, coef, False, xp)
        per[site], u = overhead_below(site, log_bound)
        log_rest = take_from_rooms(log_rest, coef, log_bound, u, xp)
    log_bk, lp_k = {}, {}
    for i, k in enumerate(ks):
        rest_k = log_rest[i][pins[k].models]
        log_bk[k] = rest_k - np.log(pins[k].scale)
        lp_k[k] = log_c[k] - rest_k - normal_logp(zs[k], 0.0, 1.0, xp)
    return xp.stack(cols, axis=1), log_bk, lp_shares, lp_k


def pinned_base_loc(pin: Pinned, k: int, priors: Priors) -> np.ndarray:
    """``log c`` at the prior medians for the models of ``pin`` (the centre of ``z_c``)."""
    medians = np.array([priors[site]["median"] for site, _ in OVERHEAD_SITES])
    b_med = np.array([priors[f"b_pop.{c}"]["median"] for c in COMPONENTS])
    return np.log(b_med[k] * pin.scale + pin.counts @ medians + pin.shares @ b_med)


def recentred_population(
    log_bk: Array,
    n: int,
    z_k: Array,
    tau_k: Array,
    loc_k: float,
    scale_k: float,
    xp: Any = jnp,
    base_lp: Array | float = 0.0,
) -> tuple[Array, Array]:
    """``log b_pop[k] = mean_m log b[m, k] + tau[k]/√M · z_k`` (:func:`_recentred_population`)
    and its log term: the hierarchical density of the ``n`` values ``log_bk`` (M), the prior
    N(loc_k, scale_k) of log b_pop[k] and ``log(tau[k]/√M)``, minus the raw site's
    N(0, 1) density and ``base_lp``."""
    log_b_pop_k = xp.mean(log_bk) + tau_k / math.sqrt(n) * z_k
    lp = (
        xp.sum(normal_logp(log_bk, log_b_pop_k, tau_k, xp))
        + normal_logp(log_b_pop_k, loc_k, scale_k, xp)
        + xp.log(tau_k)
        - 0.5 * math.log(n)
        - normal_logp(z_k, 0.0, 1.0, xp)
        - base_lp
    )
    return log_b_pop_k, lp


def nested_law(loc: Array, scale: Array, nc: np.ndarray, xp: Any = jnp) -> tuple[Array, Array]:
    """Law (loc, sd) of the raw entries of a centred site whose ``nc`` entries stay
    non-centred (:func:`_nested`): N(loc, scale) centred, N(0, 1) non-centred."""
    return xp.where(nc, 0.0, loc), xp.where(nc, 1.0, scale)


def nested_value(raw: Array, loc: Array, scale: Array, nc: np.ndarray, xp: Any = jnp) -> Array:
    """Log values of the raw entries of :func:`nested_law` (``loc + scale·raw`` where
    non-centred)."""
    return xp.where(nc, loc + scale * raw, raw)


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
        return softplus_overhead(z, self.loc, self.scale, self.unit)[0]

    def sample(self, key, sample_shape=()):
        x = dist.LogNormal(self.loc, self.scale).sample(key, sample_shape + self.batch_shape)
        return _softplus_inv(x / self.unit)

    def log_prob(self, z):
        return softplus_overhead(z, self.loc, self.scale, self.unit)[1]


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
        raise CalibError(
            f"ModelData.{what} must be concrete",
            field=what,
            fix="run the model with jit_model_args=False (NumPyro's default)",
        )
    return tuple(np.nonzero(np.asarray(mask)))  # type: ignore[return-value]


def _nested(
    name_z: str,
    name_c: str,
    parent_log: Array,
    rows: np.ndarray,
    cols: np.ndarray,
    scale: Array,
    centered: bool,
) -> Array:
    """Log values for active pairs around ``parent_log[rows, cols]`` with spread ``scale[cols]``.

    Centred mode keeps the components of ``config.NONCENTERED_COMPONENTS`` non-centred
    inside the same site (:func:`noncentered_columns`): their entries of ``name_c`` are
    the standardised deviations ``z`` (value ``loc + scale·z``).
    """
    loc = parent_log[rows, cols]
    s = scale[cols]
    if centered:
        nc = noncentered_columns(cols)
        raw = numpyro.sample(name_c, dist.Normal(*nested_law(loc, s, nc)))
        return nested_value(raw, loc, s, nc)
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
#: The collinear components, in the order they are sampled below the pinned constants'
#: rooms (:func:`pinned_log_b`).
SHARE_COMPONENTS = tuple(sorted({j for js in PINNABLE.values() for j in js}))


class Pinned(NamedTuple):
    """What the data pin for one pinned component (:func:`_pinned_pairs`)."""

    models: np.ndarray  # (p,) model indices
    scale: np.ndarray  # (p,) basis per unit (µs)
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
        return Pinned(
            np.zeros(0, int), np.zeros(0), np.zeros((0, 3)), np.zeros((0, len(COMPONENTS)))
        )
    if k not in PINNABLE:  # pragma: no cover - config names only pinnable components
        raise CalibError(
            f"component {COMPONENTS[k]!r} cannot be pinned",
            field="PINNED_COMPONENTS",
            fix=f"use {', '.join(COMPONENTS[i] for i in PINNABLE)}",
        )
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
    return Pinned(
        models,
        np.asarray(scale, float),
        np.asarray(counts, float).reshape(-1, 3),
        np.asarray(shares, float).reshape(-1, len(COMPONENTS)),
    )


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


def pinned_sets(data: ModelData) -> dict[int, Pinned]:
    """:func:`_pinned_pairs` of each pinned component that has pinned models."""
    pins = {k: _pinned_pairs(data, k) for k in pinned()}
    return {k: pin for k, pin in pins.items() if pin.models.size}


def _pinned_log_b(
    data: ModelData,
    priors: Priors,
    log_b: Array,
    law: tuple[Array, Array],
    per: dict[str, Array],
) -> tuple[Array, dict[int, tuple[np.ndarray, Array]]]:
    """Sample ``z_c_<k>`` for the models of each pinned component k; return ``log_b``
    (M, 6) with the bounded collinear corrections replaced and, per k, (models,
    log b[models, k]) (:func:`pinned_log_b`).

    Records the Jacobian factors of ``log c -> log b`` (``c_<k>_jacobian``) and of the
    bounded collinear corrections (``shares_jacobian``); the hierarchical density of the
    pinned log b is added by :func:`_recentred_population`.

    ``log_b`` (M, 6) holds the log corrections sampled so far, the collinear components
    of :data:`PINNABLE` among them, of law N(``law[0]``, ``law[1]``) per component. The
    shared overheads the constants count (:func:`bounded_overheads`) are sampled here
    (:func:`_overhead_below`) and added to ``per``.
    """
    pins = pinned_sets(data)
    if not pins:
        return log_b, {}
    zs = {
        k: numpyro.sample(pinned()[k], dist.Normal(0.0, 1.0).expand([pin.models.size]))
        for k, pin in pins.items()
    }
    log_b, log_bk, lp_shares, lp_k = pinned_log_b(
        pins,
        {k: pinned_base_loc(pin, k, priors) for k, pin in pins.items()},
        zs,
        log_b,
        law,
        per,
        lambda site, log_bound: _overhead_below(site, log_bound, priors[site]),
        data.n_models,
    )
    numpyro.factor("shares_jacobian", lp_shares)
    for k in pins:
        numpyro.factor(f"c_{COMPONENTS[k]}_jacobian", jnp.sum(lp_k[k]))
    return log_b, {k: (pins[k].models, log_bk[k]) for k in pins}


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


def _recentred_population(
    k: int, log_bk: Array, z_k: Array, tau_k: Array, priors: Priors, base_lp: Array | float = 0.0
) -> Array:
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
    loc, scale = (np.asarray(a)[k] for a in priors.lognormal_loc_scale("b_pop"))
    log_b_pop_k, lp = recentred_population(
        log_bk, log_bk.shape[0], z_k, tau_k, float(loc), float(scale), base_lp=base_lp
    )
    numpyro.factor(f"b_pop_{COMPONENTS[k]}_jacobian", lp)
    return log_b_pop_k


#: Base law of the raw site ``z_<overhead>`` in the bounded coordinate (it only shapes
#: NUTS's start; its density is removed again by the Jacobian factor).
BOUNDED_BASE_SD = 1.5


def _overhead_below(site: str, log_bound: Array, prior: Prior) -> tuple[Array, Array]:
    """A shared overhead (µs) sampled as a fraction of the room the pinned constants leave;
    returns (overhead, raw u).

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
    log_r, lp = bounded_overhead(u, log_bound, prior)
    numpyro.factor(f"{site}_jacobian", lp - base.log_prob(u))
    return numpyro.deterministic(site, jnp.exp(log_r)), u


def _per_model_log_b(
    data: ModelData, priors: Priors, centered: bool, per: dict[str, Array]
) -> Array:
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
    (:func:`_pinned_pairs`), and derive ``b = (c − overheads − shares) / scale``, with
    the shares and the overheads sampled below the room ``c`` leaves
    (:func:`pinned_log_b`: measured, a collinear correction sampled without that bound
    met ``c − shares = 0``, a wall inside the sampler's space, on the divergent draws of
    an overloaded stress set). The prior is unchanged: the hierarchical density of log
    b plus the log-Jacobians (factor sites ``c_<component>_jacobian``,
    ``shares_jacobian``, ``<overhead>_jacobian``).
    """
    z_pop, log_b_pop = _population(priors)
    tau = numpyro.sample("tau", numpyro_distribution(priors.component("tau")))
    full = jnp.broadcast_to(log_b_pop, (data.n_models, len(COMPONENTS)))
    am, ak = active_pairs(data)
    # re-centred components: their centred entries are sampled from the prior's law
    # of log b_pop (base, removed again), then b_pop relative to their mean
    rc = np.isin(np.arange(len(COMPONENTS)), ak[recentred_columns(data, ak, centered)])
    loc, scale = (jnp.asarray(a) for a in priors.lognormal_loc_scale("b_pop"))
    law = (jnp.where(rc, loc, log_b_pop), jnp.where(rc, scale, tau))
    if am.size:
        parent = jnp.broadcast_to(law[0], full.shape)
        full = full.at[am, ak].set(_nested("z_b", "log_b_active", parent, am, ak, law[1], centered))
    full, pinned_b = _pinned_log_b(data, priors, full, law, per)
    # (component, models, log b[models, k], log density of their raw law)
    recentred: list[tuple[int, np.ndarray, jax.Array, jax.Array | float]] = []
    for k in np.flatnonzero(rc).tolist():
        models = am[ak == k]
        log_bk = full[models, k]
        recentred.append(
            (k, models, log_bk, jnp.sum(dist.Normal(loc[k], scale[k]).log_prob(log_bk)))
        )
    recentred += [(k, models, log_bk, 0.0) for k, (models, log_bk) in pinned_b.items()]
    for k, models, log_bk, base_lp in recentred:
        pop_k = _recentred_population(k, log_bk, z_pop[k], tau[k], priors, base_lp)
        log_b_pop = log_b_pop.at[k].set(pop_k)
        full = full.at[:, k].set(pop_k).at[models, k].set(log_bk)
    numpyro.deterministic("b_pop", jnp.exp(log_b_pop))
    numpyro.deterministic("b", jnp.exp(full))
    return full


def _overheads(priors: Priors, data: ModelData | None = None) -> dict[str, Array]:
    """Sample the shared overheads (µs) that are not bounded by pinned constants
    (:func:`bounded_overheads`: those are sampled in :func:`_pinned_log_b`)."""
    skip = bounded_overheads(data) if data is not None else ()
    return {site: _overhead(site, priors[site]) for site, _ in OVERHEAD_SITES if site not in skip}


def bounded_overheads(data: ModelData) -> tuple[str, ...]:
    """Overheads sampled below the pinned constants (:func:`_overhead_below`): those a
    pinned constant counts (:class:`Pinned` ``counts``), with observations."""
    pins = pinned_sets(data).values()
    return tuple(
        site
        for j, (site, _) in enumerate(OVERHEAD_SITES)
        if any(pin.counts[:, j].any() for pin in pins)
    )
