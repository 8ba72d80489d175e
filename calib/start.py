"""Where NUTS starts: the posterior mode and the Laplace covariance around it.

At the real data size (10⁵ steps) the posterior is thousands of times narrower than
the prior in the directions the data pin. Started at the prior median, NUTS spends
its first adaptation window far out in the tails, where the gradient is huge and the
step size collapses; from some keys warmup then saturates the tree depth for hundreds
of iterations and never recovers (measured: R-hat 1.84 after 2 × (300 + 300)).

:func:`laplace_start` instead

1. maximises the log density in NumPyro's unconstrained space (L-BFGS, ~1 s at the
   real size: a few hundred gradients);
2. takes the Hessian there and turns it into a covariance (eigenvalues floored, so
   flat or non-convex directions get a unit-scale width instead of an infinite one);
3. starts each chain at an independent draw from that normal approximation (in the
   support: a draw with a non-finite density is pulled halfway back to the mode until
   it is finite), so chains start dispersed on the posterior's own scale and R-hat
   stays a meaningful check;
4. hands the covariance to NUTS as its initial (dense or diagonal) inverse mass
   matrix, which warmup then re-estimates from the chain as usual.

Like Stan's Pathfinder initialisation, this only changes where sampling begins; the
posterior is the model's. The optimiser's outcome is reported in :class:`Start`.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from calib import config

__all__ = ["Start", "laplace_start", "pooled_covariance"]


class Start(NamedTuple):
    """Initial state for NUTS (:func:`laplace_start`).

    Attributes
    ----------
    init_params : dict site -> (chains, ...) unconstrained starting values
        (``MCMC.run(init_params=...)``; no chain dim when ``chains == 1``).
    inverse_mass_matrix : dict ``{tuple(sites): matrix}`` for ``NUTS(inverse_mass_matrix=)``.
    report : JSON-ready summary (optimiser iterations, converged, log density at the
        mode, seconds, smallest Hessian eigenvalue, floored eigenvalues).
    """

    init_params: dict[str, Any]
    inverse_mass_matrix: dict[tuple[str, ...], Any]
    report: dict[str, Any]


def _covariance(hessian: np.ndarray, floor: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Covariance from a (symmetrised) Hessian of the negative log density."""
    h = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(h)):
        return np.eye(h.shape[0]), {"hessian": "non-finite: identity used"}
    w, v = np.linalg.eigh(h)
    wc = np.maximum(w, floor)
    return (v / wc) @ v.T, {"min_eigenvalue": float(w.min()), "max_eigenvalue": float(w.max()),
                            "floored_eigenvalues": int(np.sum(w < floor))}


def laplace_start(model_fn, data, priors, *, chains: int, seed: int, dense_mass: bool = True,
                  settings: config.StartDefaults = config.START) -> Start:
    """Start NUTS at draws from the Laplace approximation of ``model_fn(data, priors)``.

    Parameters
    ----------
    model_fn, data, priors : the NumPyro model and its arguments (as for NUTS).
    chains : number of chains (one start each).
    seed : seeds the starting draws (independent of the sampler's key).
    dense_mass : return a dense inverse mass matrix (else its diagonal).
    settings : optimiser limits and the eigenvalue floor (``config.START``).

    Returns
    -------
    Start
    """
    import jax
    import jax.numpy as jnp
    import scipy.optimize
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    t0 = time.perf_counter()
    key_init, key_draw = jax.random.split(jax.random.key(seed))
    info = initialize_model(key_init, model_fn, model_args=(data, priors),
                            init_strategy=init_to_median(num_samples=15))
    z0 = info.param_info.z
    flat0, unravel = ravel_pytree(z0)
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

    x0 = np.asarray(flat0, np.float64)
    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B",
                                  options={"maxiter": settings.max_iter})
    ok = bool(np.isfinite(res.fun))
    mode = res.x if ok and res.fun <= fun(x0)[0] else x0
    hess = np.asarray(jax.jit(jax.hessian(potential))(jnp.asarray(mode, dtype)), np.float64)
    cov, eig = _covariance(hess, settings.eigen_floor)

    # dispersed starts: one draw each from N(mode, cov), pulled back into the support
    chol = np.linalg.cholesky(cov + 1e-12 * np.eye(cov.shape[0]))
    eps = np.asarray(jax.random.normal(key_draw, (chains, mode.size)), np.float64)
    starts = mode + eps @ chol.T
    for c in range(chains):
        for _ in range(30):
            if np.isfinite(fun(starts[c])[0]):  # fun: inf outside the support
                break
            starts[c] = mode + 0.5 * (starts[c] - mode)
        else:
            starts[c] = mode
    init = jax.vmap(unravel)(jnp.asarray(starts, dtype))
    if chains == 1:
        init = jax.tree.map(lambda v: v[0], init)
    mass = jnp.asarray(cov if dense_mass else np.diag(cov), dtype)
    report = {"method": "laplace", "iterations": int(res.nit), "evaluations": int(res.nfev),
              "converged": bool(res.success), "message": str(res.message),
              "log_density_at_mode": -float(res.fun) if ok else None,
              "seconds": round(time.perf_counter() - t0, 3), **eig}
    return Start(init, {tuple(sorted(z0)): mass}, report)


def pooled_covariance(z: dict[str, Any], dense: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Mass matrix from the warmup draws of all chains (second phase of the warmup).

    NumPyro adapts each chain's dense mass matrix from that chain's last warmup window
    alone: at most a few hundred autocorrelated draws for ~45 parameters, whose covariance
    estimate is so noisy that NUTS then needs tiny steps (measured at the real data size:
    step size 0.027 and ~190 leapfrog steps per iteration with NumPyro's own estimate;
    0.21 and 20 with the covariance of 300 posterior draws). Here the draws of every
    chain are pooled (each centred on its own mean, so chains that disagree do not
    inflate it) and the sample covariance is shrunk toward its diagonal with weight
    ``d / (n + d)`` (``d`` parameters, ``n`` pooled draws).

    Parameters
    ----------
    z : site -> (chains, draws, ...) unconstrained draws (NumPyro's ``z`` extra field).
    dense : return the full matrix (else its diagonal).

    Returns
    -------
    (matrix, report) with the matrix in NumPyro's flattening order (sites sorted by name).
    """
    names = sorted(z)
    chains, draws = np.shape(z[names[0]])[:2]
    flat = np.concatenate([np.asarray(z[k], np.float64).reshape(chains, draws, -1)
                           for k in names], axis=-1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    x = centred.reshape(chains * draws, -1)
    n, d = x.shape
    cov = x.T @ x / max(n - chains, 1)
    shrink = d / (n + d)
    cov = (1.0 - shrink) * cov + shrink * np.diag(np.diag(cov))
    report = {"pooled_draws": int(n), "parameters": int(d), "shrinkage": round(shrink, 4)}
    return (cov if dense else np.diag(cov)), report
