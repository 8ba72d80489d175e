"""Random-effects pooling: the mean and between-group sd of group estimates that carry
their own standard errors.

* :func:`random_effects` (DerSimonian–Laird, precision-weighted): the API overheads
  across models (:mod:`calib.overheads`);
* :func:`unweighted_moments` (the unweighted method-of-moments, "Hedges", estimator):
  the structural discrepancy across experiments (:mod:`calib.discrepancy`), where the
  size of a group's effect grows with its standard error, so precision weights
  (which assume the two independent) pull the mean towards the precise groups and
  shrink ``tau``.

Pure NumPy over the last axis, so a whole bootstrap (replicates on the leading axes)
is one call.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_effects", "unweighted_moments"]


def random_effects(mean: np.ndarray, se2: np.ndarray) -> tuple:
    """DerSimonian–Laird over the last axis: (shrunk means, pooled mean, tau, Q).

    ``mean``, ``se2`` (..., M): group estimates and their squared standard errors.
    ``tau`` is the moment estimate of the between-group sd (truncated at 0), the
    pooled mean is the random-effects (``1/(se² + tau²)``-weighted) mean, and each
    group's mean is shrunk towards it by ``tau² / (tau² + se²)``.
    """
    se2 = np.maximum(se2, 1e-12)  # an exactly constant quantity (se 0): finite weights
    w = 1.0 / se2
    pooled = (w * mean).sum(-1) / w.sum(-1)
    q = (w * (mean - pooled[..., None]) ** 2).sum(-1)
    denom = w.sum(-1) - (w * w).sum(-1) / w.sum(-1)
    tau2 = np.maximum(0.0, (q - (mean.shape[-1] - 1)) / np.maximum(denom, 1e-300))
    wr = 1.0 / (se2 + tau2[..., None])
    mu = (wr * mean).sum(-1) / wr.sum(-1)  # random-effects mean
    shrink = tau2[..., None] / (tau2[..., None] + se2)
    return mu[..., None] + shrink * (mean - mu[..., None]), mu, np.sqrt(tau2), q


def unweighted_moments(mean: np.ndarray, se2: np.ndarray) -> tuple:
    """Unweighted method of moments over the last axis: (pooled mean, tau).

    ``mu = mean(x)``, ``tau² = max(0, var(x) − mean(se²))`` (sample variance, ddof 1):
    unbiased for the mean and for ``tau²`` (before truncation) whatever the relation
    between the effects and their standard errors; less efficient than the weighted
    estimators when they are independent.
    """
    m = mean.shape[-1]
    mu = mean.mean(-1)
    var = ((mean - mu[..., None]) ** 2).sum(-1) / max(m - 1, 1)
    return mu, np.sqrt(np.maximum(0.0, var - se2.mean(-1)))
