"""Step-time noise: a log-normal body plus a log-normal stall component (finite mean).

For a step whose noise-free time is ``m`` (µs, the *body median*, what the roofline
mean function computes)::

    log y = log m + eps + J·D,   eps ~ Normal(0, sigma),
                                 J ~ Bernoulli(stall_prob),
                                 D ~ Normal(stall_log_mult, stall_log_sd),

i.e. most steps scatter log-normally around ``m``; with probability ``stall_prob`` a
step is also *stalled*: multiplied by a log-normal factor ``exp(D)`` whose median is
``exp(stall_log_mult)`` (> 1: ``stall_log_mult > 0``). Summing the discrete ``J``
out, the density of the residual ``r = log y − log m`` is the two-component normal
mixture::

    p(r) = (1 − π)·N(r; 0, σ) + π·N(r; δ, s),    s = sqrt(σ² + ω²)

(π = stall_prob, δ = stall_log_mult, ω = stall_log_sd); the stall component is the
convolution of the body with D, so it is exactly normal as well. Ordering the
components by construction (δ > 0, s > σ) leaves no label switching.

Why this family (and not the log Student-t it replaces):

* every moment exists in closed form, ``E[(y/m)^k] = exp(k²σ²/2)·(1 − π + π·exp(kδ + k²ω²/2))``,
  so sums of step times (E2E, TTFT) have an exact predictive mean and variance; the
  log Student-t has no mean for any ν, which made ``m`` a median and every sum biased low;
* a heavy *right* tail with a learned rate and magnitude (GC pauses, preemption,
  clock throttling, collective-communication hiccups lengthen a step by a factor),
  and a light left tail (a step cannot run much faster than its work allows);
* the density is two normal log-densities and a ``logaddexp``: cheap, smooth, the
  same formula in JAX, NumPy and PyTensor (:func:`log_density` takes the array
  namespace).

Everything here is a pure function of arrays that broadcast together (per step,
per model or scalar parameters all work). Public names:

:func:`log_density` (density of ``log y``, any namespace), :func:`mean_factor`,
:func:`log_mean_factor`, :func:`moment` (``E[(y/m)^k]``), :func:`sum_mean_var`
(exact mean and variance of a sum of step times), :func:`cdf`, :func:`quantile`,
:func:`sample` (NumPy), :class:`LogStallNormal` (NumPyro distribution of ``log y``,
JAX sampler) and :func:`pymc_log_density`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

Array = Any  # numpy, jax or pytensor array

#: Parameter names, in the order every function takes them (also the model's site names).
NOISE_PARAMS = ("sigma", "stall_prob", "stall_log_mult", "stall_log_sd")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class NoiseParams(NamedTuple):
    """The noise parameters (arrays that broadcast with each other and with ``m``).

    sigma : body log-scale sd (> 0).
    stall_prob : probability that a step stalls (0 < π < 1).
    stall_log_mult : median log stall multiplier δ (> 0; multiplier exp(δ)).
    stall_log_sd : log sd ω of the stall multiplier (> 0).
    """

    sigma: Array
    stall_prob: Array
    stall_log_mult: Array
    stall_log_sd: Array


def stall_scale(sigma: Array, stall_log_sd: Array, xp: Any = np) -> Array:
    """sd of ``log y − log m`` given a stall: ``sqrt(σ² + ω²)``."""
    return xp.sqrt(sigma * sigma + stall_log_sd * stall_log_sd)


def log_density(log_y: Array, log_m: Array, sigma: Array, stall_prob: Array,
                stall_log_mult: Array, stall_log_sd: Array, xp: Any = np) -> Array:
    """Log density of ``log y`` (not of ``y``: subtract ``log y`` for that).

    ``xp`` is the array namespace: ``numpy``, ``jax.numpy`` or ``pytensor.tensor``;
    the one formula of the family, used by every backend.
    """
    r = log_y - log_m
    s = stall_scale(sigma, stall_log_sd, xp)
    zb = r / sigma
    zs = (r - stall_log_mult) / s
    body = xp.log1p(-stall_prob) - 0.5 * zb * zb - xp.log(sigma)
    stall = xp.log(stall_prob) - 0.5 * zs * zs - xp.log(s)
    return xp.logaddexp(body, stall) - _HALF_LOG_2PI


def moment(k: float, sigma: Array, stall_prob: Array, stall_log_mult: Array,
           stall_log_sd: Array, xp: Any = np) -> Array:
    """``E[(y/m)^k]`` (any real ``k``), exactly:
    ``exp(k²σ²/2)·(1 + π·expm1(kδ + k²ω²/2))``."""
    return xp.exp(0.5 * k * k * sigma * sigma) * (
        1.0 + stall_prob * xp.expm1(k * stall_log_mult + 0.5 * k * k * stall_log_sd * stall_log_sd))


def log_mean_factor(sigma: Array, stall_prob: Array, stall_log_mult: Array,
                    stall_log_sd: Array, xp: Any = np) -> Array:
    """``log(E[y]/m) = σ²/2 + log1p(π·expm1(δ + ω²/2))``."""
    return 0.5 * sigma * sigma + xp.log1p(
        stall_prob * xp.expm1(stall_log_mult + 0.5 * stall_log_sd * stall_log_sd))


def mean_factor(sigma: Array, stall_prob: Array, stall_log_mult: Array,
                stall_log_sd: Array, xp: Any = np) -> Array:
    """``E[y]/m``: the predictive mean step time over the body median ``m``."""
    return moment(1.0, sigma, stall_prob, stall_log_mult, stall_log_sd, xp)


def sum_mean_var(m: Array, sigma: Array, stall_prob: Array, stall_log_mult: Array,
                 stall_log_sd: Array, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``Σ_i y_i`` for independent steps with body medians
    ``m`` (summed over ``axis``; the parameters broadcast with ``m``).

    ``E = Σ m_i·M1_i``, ``Var = Σ m_i²·(M2_i − M1_i²)`` with ``Mk`` = :func:`moment`.
    """
    m = np.asarray(m, dtype=np.float64)
    m1 = moment(1.0, sigma, stall_prob, stall_log_mult, stall_log_sd)
    m2 = moment(2.0, sigma, stall_prob, stall_log_mult, stall_log_sd)
    mean = np.sum(m * m1, axis=axis)
    var = np.sum(m * m * (m2 - m1 * m1), axis=axis)
    return mean, var


def cdf(log_y: Array, log_m: Array, sigma: Array, stall_prob: Array, stall_log_mult: Array,
        stall_log_sd: Array) -> np.ndarray:
    """``P(log Y ≤ log_y)`` (NumPy)."""
    from scipy.special import ndtr

    r = np.asarray(log_y, dtype=np.float64) - log_m
    s = stall_scale(sigma, stall_log_sd)
    return (1.0 - stall_prob) * ndtr(r / sigma) + stall_prob * ndtr((r - stall_log_mult) / s)


def quantile(q: Array, sigma: Array, stall_prob: Array, stall_log_mult: Array,
             stall_log_sd: Array) -> np.ndarray:
    """Quantile ``q`` of ``y/m`` (NumPy; bisection on the log scale to ~1e-12).

    ``quantile(0.5, ...)`` is the median step time over ``m`` (≥ 1: the stall
    component pulls it right).
    """
    q = np.asarray(q, dtype=np.float64)
    shape = np.broadcast_shapes(q.shape, *(np.shape(a) for a in
                                           (sigma, stall_prob, stall_log_mult, stall_log_sd)))
    s = stall_scale(np.asarray(sigma), np.asarray(stall_log_sd))
    delta = np.asarray(stall_log_mult)
    # both components lie within 12 sd of their centres (the stall one may reach below 0)
    lo = np.broadcast_to(np.minimum(-12.0 * np.asarray(sigma), delta - 12.0 * s), shape).copy()
    hi = np.broadcast_to(delta + 12.0 * s, shape).copy()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        below = cdf(mid, 0.0, sigma, stall_prob, stall_log_mult, stall_log_sd) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.exp(0.5 * (lo + hi))


def sample(rng: np.random.Generator, m: Array, sigma: Array, stall_prob: Array,
           stall_log_mult: Array, stall_log_sd: Array, size: tuple[int, ...] | None = None
           ) -> np.ndarray:
    """Step times ``y`` (same units as ``m``) with the full tail, no clipping (NumPy).

    ``size`` defaults to the broadcast shape of ``m`` and the parameters.
    """
    if size is None:
        size = np.broadcast_shapes(*(np.shape(a) for a in
                                     (m, sigma, stall_prob, stall_log_mult, stall_log_sd)))
    eps = rng.standard_normal(size)
    stalled = rng.random(size) < stall_prob
    d = stall_log_mult + stall_log_sd * rng.standard_normal(size)
    return np.asarray(m) * np.exp(sigma * eps + np.where(stalled, d, 0.0))


# ------------------------------------------------------------------ NumPyro
def _numpyro_distribution():
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.distributions.util import promote_shapes

    class LogStallNormal(dist.Distribution):
        """NumPyro distribution of ``log y`` (the model's observed ``log_duration``).

        ``loc`` is ``log m`` (log body median); the other arguments are
        :data:`NOISE_PARAMS`. ``log_prob`` is :func:`log_density` with ``jax.numpy``;
        ``sample`` draws the stall indicator explicitly (the density sums it out).
        """

        arg_constraints = {
            "loc": constraints.real,
            "sigma": constraints.positive,
            "stall_prob": constraints.open_interval(0.0, 1.0),
            "stall_log_mult": constraints.positive,
            "stall_log_sd": constraints.positive,
        }
        support = constraints.real
        reparametrized_params = ["loc", "sigma", "stall_log_mult", "stall_log_sd"]

        def __init__(self, loc, sigma, stall_prob, stall_log_mult, stall_log_sd, *,
                     validate_args=None):
            (self.loc, self.sigma, self.stall_prob, self.stall_log_mult,
             self.stall_log_sd) = promote_shapes(loc, sigma, stall_prob, stall_log_mult,
                                                 stall_log_sd)
            batch_shape = jax.lax.broadcast_shapes(*(jnp.shape(a) for a in (
                loc, sigma, stall_prob, stall_log_mult, stall_log_sd)))
            super().__init__(batch_shape=batch_shape, validate_args=validate_args)

        def sample(self, key, sample_shape=()):
            shape = sample_shape + self.batch_shape
            k_eps, k_j, k_d = jax.random.split(key, 3)
            eps = jax.random.normal(k_eps, shape)
            stalled = jax.random.uniform(k_j, shape) < self.stall_prob
            d = self.stall_log_mult + self.stall_log_sd * jax.random.normal(k_d, shape)
            return self.loc + self.sigma * eps + jnp.where(stalled, d, 0.0)

        def log_prob(self, value):
            return log_density(value, self.loc, self.sigma, self.stall_prob,
                               self.stall_log_mult, self.stall_log_sd, xp=jnp)

        @property
        def mean(self):
            """Mean of ``log y`` (not of ``y``: that is ``exp(loc)·mean_factor``)."""
            return jnp.broadcast_to(self.loc + self.stall_prob * self.stall_log_mult,
                                    self.batch_shape)

        @property
        def variance(self):
            p, d = self.stall_prob, self.stall_log_mult
            v = self.sigma**2 + p * self.stall_log_sd**2 + p * (1.0 - p) * d * d
            return jnp.broadcast_to(v, self.batch_shape)

    return LogStallNormal


def __getattr__(name: str):  # lazy: importing calib.noise must not import JAX
    if name == "LogStallNormal":
        cls = _numpyro_distribution()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ PyMC / PyTensor
def pymc_log_density(log_y, log_m, sigma, stall_prob, stall_log_mult, stall_log_sd):
    """:func:`log_density` as a PyTensor expression (for ``pm.CustomDist`` /
    ``pm.Potential`` in the PyMC mirror)."""
    import pytensor.tensor as pt

    return log_density(log_y, log_m, sigma, stall_prob, stall_log_mult, stall_log_sd, xp=pt)
