"""Where NUTS starts, and the whitened coordinates it samples in.

At the real data size (10⁵ steps) the posterior is thousands of times narrower than
the prior in the directions the data pin: the pinned per-step constants have posterior
standard deviations of ~4·10⁻⁴ in NumPyro's unconstrained space, the overheads and the
spreads across models ~1. Two things go wrong when NUTS samples those coordinates
directly:

* Started at the prior median, NUTS spends its first adaptation window far out in the
  tails, where the step size collapses; from some keys warmup then saturates the tree
  depth and never recovers (measured: R-hat 1.84 after 2 × (300 + 300)).
* NumPyro (like Stan) regularises each mass-matrix estimate toward ``1e-3·I`` in
  absolute units (``n/(n+5)·Σ + 1e-3·5/(n+5)·I``). For a direction with variance 2·10⁻⁷
  that adds ~50 times the variance, so the mass matrix is wrong exactly where the
  posterior is narrowest and the step size shrinks to fit it (measured: step size
  0.027 and ~195 leapfrog steps per iteration, whatever else was changed in the model).

:func:`laplace_start` therefore

1. maximises the log density in NumPyro's unconstrained space ``x``: L-BFGS (a few
   hundred gradients) gets near the mode, then trust-region Newton steps with the exact
   Hessian converge (the Hessian is ill-conditioned: on the default data its
   eigenvalues span 0.3 to 2·10⁶, and L-BFGS alone crawled along the overhead ridge for
   2,000 iterations without converging);
2. takes the Hessian there and turns it into a covariance ``Σ`` (eigenvalues floored,
   so flat or non-convex directions get a unit-scale width instead of an infinite one);
3. hands NUTS the potential in whitened coordinates ``y`` with ``x = mode + L·y``
   (``L`` the Cholesky factor of ``Σ``; a constant Jacobian, so the posterior is the
   model's), where every direction has a scale of about one and NumPyro's adaptation
   works as designed (measured at the real size: step size 0.19, 37 leapfrog steps per
   iteration);
4. starts each chain at an independent draw from ``N(0, I)`` in ``y`` (in the support:
   a draw with a non-finite density is pulled halfway back to the mode until it is
   finite), so chains start dispersed on the posterior's own scale and R-hat stays a
   meaningful check.

:func:`median_start` is the plain alternative (``--init median``): the prior median
(NumPyro's ``init_to_median``), unwhitened. Like Stan's Pathfinder initialisation, the
start changes only where and in which coordinates sampling runs; draws are mapped back
by :attr:`Start.postprocess_fn` and the posterior is the model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from calib import config

__all__ = ["Start", "laplace_start", "median_start"]


class Start(NamedTuple):
    """The coordinates NUTS samples in and where each chain starts (:func:`laplace_start`).

    NUTS samples a flat vector ``y`` (``d`` entries); NumPyro's unconstrained parameters
    are ``x = shift + chol @ y`` (flattened by ``jax.flatten_util.ravel_pytree``, sites
    sorted by name).

    Attributes
    ----------
    init_params : (chains, d) starting values of ``y`` (``(d,)`` when ``chains == 1``),
        for ``MCMC.run(init_params=...)``.
    potential_fn : ``y -> −log density`` (``NUTS(potential_fn=...)``).
    postprocess_fn : ``y -> {site: constrained value}`` with the deterministic sites
        (``MCMC(postprocess_fn=...)``).
    shift, chol : the affine map (numpy, float64).
    report : JSON-ready summary (method; for the Laplace start optimiser iterations,
        convergence, log density at the mode, seconds, Hessian eigenvalues).
    """

    init_params: Any
    potential_fn: Callable[[Any], Any]
    postprocess_fn: Callable[[Any], dict[str, Any]]
    shift: np.ndarray
    chol: np.ndarray
    report: dict[str, Any]


def _covariance(hessian: np.ndarray, floor: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Covariance from a (symmetrised) Hessian of the negative log density."""
    h = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(h)):
        return np.eye(h.shape[0]), {"hessian": "non-finite: identity used"}
    w, v = np.linalg.eigh(h)
    wc = np.maximum(w, floor)
    return (v / wc) @ v.T, {
        "min_eigenvalue": float(w.min()),
        "max_eigenvalue": float(w.max()),
        "floored_eigenvalues": int(np.sum(w < floor)),
    }


def _model_info(model_fn, data, priors, key):
    """NumPyro's potential and postprocessing for ``model_fn(data, priors)``, flattened."""
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    info = initialize_model(
        key, model_fn, model_args=(data, priors), init_strategy=init_to_median(num_samples=15)
    )
    z = info.param_info.z
    flat, unravel = ravel_pytree(z if np.ndim(key) == 0 else {k: v[0] for k, v in z.items()})
    return info, flat, unravel


def _whitened(info, unravel, shift: np.ndarray, chol: np.ndarray, dtype):
    """(potential_fn, postprocess_fn) of ``y`` with ``x = shift + chol @ y``."""
    import jax.numpy as jnp

    s = jnp.asarray(shift, dtype)
    L = jnp.asarray(chol, dtype)

    def potential_fn(y):
        return info.potential_fn(unravel(s + L @ y))

    def postprocess_fn(y):
        return info.postprocess_fn(unravel(s + L @ y))

    return potential_fn, postprocess_fn


def laplace_start(
    model_fn,
    data,
    priors,
    *,
    chains: int,
    key,
    dense_mass: bool = True,
    settings: config.StartDefaults = config.START,
) -> Start:
    """Whitened coordinates and starts from the Laplace approximation of ``model_fn``.

    Parameters
    ----------
    model_fn, data, priors : the NumPyro model and its arguments.
    chains : number of chains (one start each).
    key : JAX PRNG key of the starting draws (``calib.fit.run_nuts`` splits it from the
        run's seed, apart from the sampler's and the prior draws' keys).
    dense_mass : whiten with the Cholesky factor of the Laplace covariance (else with the
        square root of its diagonal only: no cross-parameter preconditioning).
    settings : optimiser limits and the eigenvalue floor (``config.START``).

    Returns
    -------
    Start
    """
    import jax
    import jax.numpy as jnp
    import scipy.optimize

    t0 = time.perf_counter()
    key_init, key_draw = jax.random.split(key)
    info, flat0, unravel = _model_info(model_fn, data, priors, key_init)
    dtype = flat0.dtype

    def potential(flat):
        return info.potential_fn(unravel(flat))

    value_and_grad = jax.jit(jax.value_and_grad(potential))

    def fun(x):
        v, g = value_and_grad(jnp.asarray(x, dtype))
        v, g = float(v), np.asarray(g, np.float64)
        if not (np.isfinite(v) and np.all(np.isfinite(g))):
            return np.inf, np.zeros_like(g)  # L-BFGS backtracks from outside the support
        return v, g

    hessian = jax.jit(jax.hessian(potential))

    def hess(x):
        return np.asarray(hessian(jnp.asarray(x, dtype)), np.float64)

    x0 = np.asarray(flat0, np.float64)
    res = scipy.optimize.minimize(
        fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": settings.max_iter}
    )
    nit, newton_nit = int(res.nit), 0
    if np.isfinite(res.fun) and settings.newton_iter > 0:
        # L-BFGS gets near the mode fast but crawls along its ill-conditioned ridges;
        # Newton steps with the exact Hessian in a trust region converge in a few more.
        newton = scipy.optimize.minimize(
            fun,
            res.x,
            jac=True,
            hess=lambda x: np.nan_to_num(hess(x)),
            method="trust-exact",
            options={"maxiter": settings.newton_iter},
        )
        if np.isfinite(newton.fun) and newton.fun <= res.fun:
            res, newton_nit = newton, int(newton.nit)
    ok = bool(np.isfinite(res.fun))
    mode = res.x if ok and res.fun <= fun(x0)[0] else x0
    hess_mode = hess(mode)
    cov, eig = _covariance(hess_mode, settings.eigen_floor)
    if dense_mass:
        chol = np.linalg.cholesky(cov + 1e-12 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    else:
        chol = np.diag(np.sqrt(np.diag(cov)))

    # dispersed starts: one draw each from N(0, I) in y, pulled back into the support
    starts = np.array(jax.random.normal(key_draw, (chains, mode.size)), np.float64)  # writable
    for c in range(chains):
        for _ in range(30):
            if np.isfinite(fun(mode + chol @ starts[c])[0]):  # fun: inf outside the support
                break
            starts[c] *= 0.5
        else:
            starts[c] = 0.0
    potential_fn, postprocess_fn = _whitened(info, unravel, mode, chol, dtype)
    init = jnp.asarray(starts[0] if chains == 1 else starts, dtype)
    report = {
        "method": "laplace",
        "iterations": nit,
        "newton_iterations": newton_nit,
        "evaluations": int(res.nfev),
        "converged": bool(res.success),
        "message": str(res.message),
        "log_density_at_mode": -float(res.fun) if ok else None,
        "whitening": "dense" if dense_mass else "diagonal",
        "seconds": round(time.perf_counter() - t0, 3),
        **eig,
    }
    return Start(init, potential_fn, postprocess_fn, mode, chol, report)


def median_start(model_fn, data, priors, *, chains: int, key, dense_mass: bool = True) -> Start:
    """Every chain at its own estimate of the prior median (NumPyro's ``init_to_median``
    of 15 draws), in NumPyro's unconstrained coordinates (no whitening).

    Parameters as for :func:`laplace_start` (``dense_mass`` is accepted and unused).
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    del dense_mass
    keys = jax.random.split(key, chains)
    info, flat0, unravel = _model_info(model_fn, data, priors, keys)
    starts = jax.vmap(lambda z: ravel_pytree(z)[0])(info.param_info.z)
    d = flat0.size
    potential_fn, postprocess_fn = _whitened(info, unravel, np.zeros(d), np.eye(d), flat0.dtype)
    init = jnp.asarray(starts[0] if chains == 1 else starts, flat0.dtype)
    return Start(init, potential_fn, postprocess_fn, np.zeros(d), np.eye(d), {"method": "median"})
