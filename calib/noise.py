"""Step-time noise: a log-normal body with log-normal stall (and fast) components.

For a step whose noise-free time is ``m`` (µs, the *body median*, what the roofline
mean function computes)::

    log y = log m + eps + J_s·D_s + J_f·D_f,   eps ~ Normal(0, sigma),
            (J_s, J_f, body) ~ Categorical(stall_prob, fast_prob, 1 − stall_prob − fast_prob),
            D_s ~ Normal(+stall_log_mult, stall_log_sd),
            D_f ~ Normal(−fast_log_mult, fast_log_sd),

i.e. most steps scatter log-normally around ``m``; with probability ``stall_prob`` a
step is *stalled*: multiplied by a log-normal factor ``exp(D_s)`` with median
``exp(stall_log_mult) > 1``; with probability ``fast_prob`` (optional component) it
runs a factor ``exp(−fast_log_mult) < 1`` of its body (steps the mean function
over-predicts). Summing the discrete indicators out, the density of the residual
``r = log y − log m`` is a normal mixture::

    p(r) = (1 − π_s − π_f)·N(r; 0, σ) + π_s·N(r; δ_s, s_s) + π_f·N(r; −δ_f, s_f),
    s_c = sqrt(σ² + ω_c²)

each tail component being the convolution of the body with its log multiplier, so
exactly normal as well. The components are ordered by construction (shifts δ_s > 0,
−δ_f < 0; wider than the body), so there is no label switching.

Why this family (and not the log Student-t it replaces):

* every moment exists in closed form::

    E[(y/m)^k] = exp(k²σ²/2)·(1 + π_s·expm1(kδ_s + k²ω_s²/2) + π_f·expm1(−kδ_f + k²ω_f²/2))

  so sums of step times (E2E, TTFT) have an exact predictive mean and variance; the
  log Student-t has no mean for any ν, which made ``m`` a median and every sum biased low;
* a heavy *right* tail with a learned rate and magnitude (GC pauses, preemption,
  clock throttling, collective-communication hiccups lengthen a step by a factor);
  a light-bodied left side, with the fast component as the robust outlet for steps
  the mean function over-predicts (a normal body alone would let a few such steps
  drag the corrections);
* the density is normal log-densities combined by ``logaddexp``: cheap, smooth, the
  same formula in JAX, NumPy and PyTensor (:func:`log_density` takes the array
  namespace).

Everything here is a pure function of arrays that broadcast together (per step,
per model or scalar parameters all work). Parameters are passed positionally in
:class:`NoiseParams` order; the three fast-component ones may be left out.
Public names: :func:`as_params` (positional parameters as :class:`NoiseParams`),
:func:`log_density` (density of ``log y``, any namespace),
:func:`mean_factor`, :func:`log_mean_factor`, :func:`moment` (``E[(y/m)^k]``),
:func:`sum_mean_var` (exact mean and variance of a sum of step times), :func:`cdf`,
:func:`quantile`, :func:`sample` (NumPy), :class:`LogStallNormal` (NumPyro
distribution of ``log y``, JAX sampler) and :func:`pymc_log_density`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from calib import config
from calib.vocab import NOISE_PARAMS

Array = Any  # numpy, jax or pytensor array

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
#: Upper bound on ``stall_prob`` and ``fast_prob`` in a model (defined in calib.config).
MAX_TAIL_PROB = config.NOISE_MAX_TAIL_PROB


class NoiseParams(NamedTuple):
    """The noise parameters (arrays that broadcast with each other and with ``m``).

    sigma : body log-scale sd (> 0).
    stall_prob : probability that a step stalls (π_s > 0).
    stall_log_mult : median log stall multiplier δ_s (> 0; multiplier exp(δ_s)).
    stall_log_sd : log sd ω_s of the stall multiplier (> 0).
    fast_prob, fast_log_mult, fast_log_sd : the optional *fast* component (None: absent):
        with probability π_f a step runs ``exp(−δ_f)`` times its body (δ_f > 0, log sd
        ω_f). π_s + π_f < 1 (sample them jointly, e.g. from a Dirichlet with the body).
    """

    sigma: Array
    stall_prob: Array
    stall_log_mult: Array
    stall_log_sd: Array
    fast_prob: Array | None = None
    fast_log_mult: Array | None = None
    fast_log_sd: Array | None = None


def posterior_params(draws: dict, n_models: int) -> tuple[np.ndarray, ...]:
    """The noise parameters of flat posterior draws (:func:`calib.posterior.flat_draws`)
    per model: a tuple in :class:`NoiseParams` order, each ``(draws, n_models)`` (pooled
    scalars broadcast). A posterior without the fast component gives the four others."""
    d = np.shape(draws["sigma"])[0]
    names = NOISE_PARAMS if "fast_prob" in draws else NOISE_PARAMS[:4]
    return tuple(
        np.broadcast_to(np.asarray(draws[k], np.float64).reshape(d, -1), (d, n_models))
        for k in names
    )


def stall_scale(sigma: Array, stall_log_sd: Array, xp: Any = np) -> Array:
    """sd of ``log y − log m`` given a stall (or a fast step): ``sqrt(σ² + ω²)``."""
    return xp.sqrt(sigma * sigma + stall_log_sd * stall_log_sd)


def as_params(params: tuple) -> NoiseParams:
    """The positional noise parameters (:class:`NoiseParams` order: the four body and
    stall ones, then optionally the three fast ones) as :class:`NoiseParams`."""
    p = NoiseParams(*params)
    fast = (p.fast_prob, p.fast_log_mult, p.fast_log_sd)
    if any(a is None for a in fast) and not all(a is None for a in fast):
        raise ValueError("give all three fast-component parameters or none")
    return p


def _tails(p: NoiseParams) -> list[tuple[Array, Array, Array]]:
    """The non-body components as (probability, log shift, log sd of the multiplier)."""
    out = [(p.stall_prob, p.stall_log_mult, p.stall_log_sd)]
    if p.fast_log_mult is not None:  # the three fast ones are given together (as_params)
        out.append((p.fast_prob, -p.fast_log_mult, p.fast_log_sd))
    return out


def _tail_prob(tails: list[tuple[Array, Array, Array]]) -> Array:
    """Total probability of the non-body components."""
    total = tails[0][0]
    for prob, _, _ in tails[1:]:
        total = total + prob
    return total


def log_density(log_y: Array, log_m: Array, *params: Array, xp: Any = np) -> Array:
    """Log density of ``log y`` (not of ``y``: subtract ``log y`` for that); parameters
    as :class:`NoiseParams`, positionally.

    ``xp`` is the array namespace: ``numpy``, ``jax.numpy`` or ``pytensor.tensor``;
    the one formula of the family, used by every backend.
    """
    p = as_params(params)
    r = log_y - log_m
    tails = _tails(p)
    zb = r / p.sigma
    out = xp.log1p(-_tail_prob(tails)) - 0.5 * zb * zb - xp.log(p.sigma)
    for prob, shift, sd in tails:
        s = stall_scale(p.sigma, sd, xp)
        z = (r - shift) / s
        out = xp.logaddexp(out, xp.log(prob) - 0.5 * z * z - xp.log(s))
    return out - _HALF_LOG_2PI


def moment(k: float, *params: Array, xp: Any = np) -> Array:
    """``E[(y/m)^k]`` (any real ``k``), exactly:
    ``exp(k²σ²/2)·(1 + Σ_c π_c·expm1(k·shift_c + k²ω_c²/2))`` over the stall (shift δ_s)
    and fast (shift −δ_f) components (parameters as :class:`NoiseParams`, positionally)."""
    p = as_params(params)
    acc = 1.0
    for prob, shift, sd in _tails(p):
        acc = acc + prob * xp.expm1(k * shift + 0.5 * k * k * sd * sd)
    return xp.exp(0.5 * k * k * p.sigma * p.sigma) * acc


def log_mean_factor(*params: Array, xp: Any = np) -> Array:
    """``log(E[y]/m)`` (parameters as :class:`NoiseParams`, positionally)."""
    return xp.log(moment(1.0, *params, xp=xp))


def mean_factor(*params: Array, xp: Any = np) -> Array:
    """``E[y]/m``: the predictive mean step time over the body median ``m``
    (parameters as :class:`NoiseParams`, positionally)."""
    return moment(1.0, *params, xp=xp)


def sum_mean_var(m: Array, *params: Array, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``Σ_i y_i`` for independent steps with body medians
    ``m`` (summed over ``axis``; the parameters, as :class:`NoiseParams`, broadcast with
    ``m``).

    ``E = Σ m_i·M1_i``, ``Var = Σ m_i²·(M2_i − M1_i²)`` with ``Mk`` = :func:`moment`.
    """
    m = np.asarray(m, dtype=np.float64)
    m1 = moment(1.0, *params)
    m2 = moment(2.0, *params)
    mean = np.sum(m * m1, axis=axis)
    var = np.sum(m * m * (m2 - m1 * m1), axis=axis)
    return mean, var


def cdf(log_y: Array, log_m: Array, *params: Array) -> np.ndarray:
    """``P(log Y ≤ log_y)`` (NumPy; parameters as :class:`NoiseParams`, positionally)."""
    from scipy.special import ndtr

    p = as_params(params)
    r = np.asarray(log_y, dtype=np.float64) - log_m
    tails = _tails(p)
    out = (1.0 - _tail_prob(tails)) * ndtr(r / p.sigma)
    for prob, shift, sd in tails:
        out = out + prob * ndtr((r - shift) / stall_scale(p.sigma, sd))
    return out


def quantile(q: Array, *params: Array) -> np.ndarray:
    """Quantile ``q`` of ``y/m`` (NumPy; bisection on the log scale to ~1e-12;
    parameters as :class:`NoiseParams`, positionally).

    ``quantile(0.5, ...)`` is the median step time over ``m``.
    """
    q = np.asarray(q, dtype=np.float64)
    shape = np.broadcast_shapes(q.shape, *(np.shape(a) for a in params if a is not None))
    sigma = np.asarray(params[0])
    lo, hi = -12.0 * sigma, 12.0 * sigma
    for _, shift, sd in _tails(as_params(params)):
        s = stall_scale(sigma, np.asarray(sd))
        # every component lies within 12 sd of its centre
        lo = np.minimum(lo, np.asarray(shift) - 12.0 * s)
        hi = np.maximum(hi, np.asarray(shift) + 12.0 * s)
    lo, hi = np.broadcast_to(lo, shape).copy(), np.broadcast_to(hi, shape).copy()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        below = cdf(mid, 0.0, *params) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.exp(0.5 * (lo + hi))


def sample(
    rng: np.random.Generator, m: Array, *params: Array, size: tuple[int, ...] | None = None
) -> np.ndarray:
    """Step times ``y`` (same units as ``m``) with the full tails, no clipping (NumPy;
    parameters as :class:`NoiseParams`, positionally).

    ``size`` defaults to the broadcast shape of ``m`` and the parameters.
    """
    if size is None:
        size = np.broadcast_shapes(np.shape(m), *(np.shape(a) for a in params if a is not None))
    sigma = params[0]
    log_ratio = sigma * rng.standard_normal(size)
    u = rng.random(size)
    edge = 0.0
    for prob, shift, sd in _tails(as_params(params)):
        hit = (u >= edge) & (u < edge + prob)
        log_ratio = log_ratio + np.where(hit, shift + sd * rng.standard_normal(size), 0.0)
        edge = edge + prob
    return np.asarray(m) * np.exp(log_ratio)


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
        :class:`NoiseParams` (the fast component optional). ``log_prob`` is
        :func:`log_density` with ``jax.numpy``; ``sample`` draws the component of each
        step explicitly (the density sums it out).
        """

        arg_constraints = {
            "loc": constraints.real,
            "sigma": constraints.positive,
            "stall_prob": constraints.open_interval(0.0, 1.0),
            "stall_log_mult": constraints.positive,
            "stall_log_sd": constraints.positive,
            "fast_prob": constraints.open_interval(0.0, 1.0),
            "fast_log_mult": constraints.positive,
            "fast_log_sd": constraints.positive,
        }
        support = constraints.real
        reparametrized_params = [
            "loc",
            "sigma",
            "stall_log_mult",
            "stall_log_sd",
            "fast_log_mult",
            "fast_log_sd",
        ]

        def __init__(
            self,
            loc,
            sigma,
            stall_prob,
            stall_log_mult,
            stall_log_sd,
            fast_prob=None,
            fast_log_mult=None,
            fast_log_sd=None,
            *,
            validate_args=None,
        ):
            given = as_params(
                (
                    sigma,
                    stall_prob,
                    stall_log_mult,
                    stall_log_sd,
                    fast_prob,
                    fast_log_mult,
                    fast_log_sd,
                )
            )
            args = promote_shapes(loc, *(a for a in given if a is not None))
            self.loc = args[0]
            for name, value in zip(NOISE_PARAMS, NoiseParams(*args[1:]), strict=True):
                setattr(self, name, value)
            if fast_prob is None:  # validate only the parameters given
                self.arg_constraints = {
                    k: v for k, v in type(self).arg_constraints.items() if not k.startswith("fast_")
                }
            batch_shape = jax.lax.broadcast_shapes(*(jnp.shape(a) for a in args))
            super().__init__(batch_shape=batch_shape, validate_args=validate_args)

        @property
        def params(self) -> tuple:
            p = (self.sigma, self.stall_prob, self.stall_log_mult, self.stall_log_sd)
            if self.fast_prob is None:
                return p
            return p + (self.fast_prob, self.fast_log_mult, self.fast_log_sd)

        def _tails(self):
            return _tails(NoiseParams(*self.params))

        def sample(self, key, sample_shape=()):
            shape = sample_shape + self.batch_shape
            k_eps, k_u, *k_tail = jax.random.split(key, 4)
            out = self.loc + self.sigma * jax.random.normal(k_eps, shape)
            u = jax.random.uniform(k_u, shape)
            edge = 0.0
            for kc, (prob, shift, sd) in zip(k_tail, self._tails(), strict=False):
                hit = (u >= edge) & (u < edge + prob)
                out = out + jnp.where(hit, shift + sd * jax.random.normal(kc, shape), 0.0)
                edge = edge + prob
            return out

        def log_prob(self, value):
            return log_density(value, self.loc, *self.params, xp=jnp)

        @property
        def mean(self):
            """Mean of ``log y`` (not of ``y``: that is ``exp(loc)·mean_factor``)."""
            out = self.loc
            for prob, shift, _ in self._tails():
                out = out + prob * shift
            return jnp.broadcast_to(out, self.batch_shape)

        @property
        def variance(self):
            tails = self._tails()
            mean = sum(prob * shift for prob, shift, _ in tails)
            second = self.sigma**2 + sum(
                prob * (sd * sd + shift * shift) for prob, shift, sd in tails
            )
            return jnp.broadcast_to(second - mean * mean, self.batch_shape)

    return LogStallNormal


def __getattr__(name: str):  # lazy: importing calib.noise must not import JAX
    if name == "LogStallNormal":
        cls = _numpyro_distribution()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ PyMC / PyTensor
def pymc_log_density(log_y, log_m, *params):
    """:func:`log_density` as a PyTensor expression (for ``pm.CustomDist`` /
    ``pm.Potential`` in the PyMC mirror); parameters as :class:`NoiseParams`."""
    import pytensor.tensor as pt

    return log_density(log_y, log_m, *params, xp=pt)
