"""Point-estimate baselines that check_e2e puts beside the Bayesian fit.

* ``blackbox`` — BLIS's old 3-coefficient blackbox step model,
  ``beta0 + beta1·prefill tokens + beta2·decode tokens`` (µs; prefill tokens are the
  tokens computed this step, i.e. cache misses), fitted by ordinary least squares
  per experiment on its sampled steps.
* ``nnls`` — non-negative least squares (``scipy.optimize.nnls``) of the same
  roofline terms as the Bayesian model, the way BLIS's training pipeline fits its
  coefficients: duration_us ≈ Σ_c β_c·T_c + β_L·L + β_B·B + β_step, all β ≥ 0,
  unweighted, per model on the sampled steps of all its experiments. Prefill and
  decode terms are added (no ``alpha``).

Both return one prediction per step (µs), no uncertainty.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from calib.predict import StepFeatures
from calib.vocab import fittable

__all__ = [
    "BASELINES",
    "baseline_step_predictions",
    "blackbox_fit",
    "blackbox_predict",
    "nnls_fit",
    "nnls_model_fits",
    "nnls_predict",
]

#: Baseline names in table order.
BASELINES = ("blackbox", "nnls")


def _blackbox_design(prefill_tokens, decode_tokens) -> np.ndarray:
    p = np.asarray(prefill_tokens, np.float64)
    return np.column_stack([np.ones_like(p), p, np.asarray(decode_tokens, np.float64)])


def blackbox_fit(prefill_tokens, decode_tokens, duration_us) -> np.ndarray:
    """Least-squares ``[beta0 (µs), beta1 (µs/prefill token), beta2 (µs/decode token)]``.

    NaN coefficients when fewer than 3 finite observations.
    """
    y = np.asarray(duration_us, np.float64)
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return np.full(3, np.nan)
    X = _blackbox_design(prefill_tokens, decode_tokens)[ok]
    coef, *_ = np.linalg.lstsq(X, y[ok], rcond=None)
    return coef


def blackbox_predict(coef, prefill_tokens, decode_tokens) -> np.ndarray:
    """Blackbox step time (µs)."""
    return _blackbox_design(prefill_tokens, decode_tokens) @ np.asarray(coef, np.float64)


def _nnls_design(features: StepFeatures) -> np.ndarray:
    B = np.asarray(features.batch_size, np.float64)
    return np.column_stack(
        [
            np.asarray(features.components, np.float64),
            np.asarray(features.num_layers, np.float64),
            B,
            (B > 0).astype(np.float64),
        ]
    )


def nnls_fit(features: StepFeatures, duration_us) -> np.ndarray:
    """NNLS coefficients: 6 component corrections (``COMPONENTS`` order), µs/layer,
    µs/request, µs/step. NaN when fewer than 9 finite observations."""
    y = np.asarray(duration_us, np.float64)
    ok = np.isfinite(y)
    if ok.sum() < 9:
        return np.full(9, np.nan)
    X = _nnls_design(features)[ok]
    scale = np.where(X.std(axis=0) > 0, np.abs(X).max(axis=0), 1.0)  # conditioning
    coef, _ = nnls(X / scale, y[ok], maxiter=50 * X.shape[1])
    return coef / scale


def nnls_predict(coef, features: StepFeatures) -> np.ndarray:
    """NNLS step time (µs)."""
    return _nnls_design(features) @ np.asarray(coef, np.float64)


def baseline_step_predictions(ds, features: StepFeatures) -> dict[str, np.ndarray]:
    """Per-step predictions (µs) of every baseline for all steps of ``ds``.

    ``features`` are the roofline terms of all steps of ``ds`` (same order).
    Fits use the sampled steps (finite ``duration_us``).
    """
    step_exp = np.asarray(ds["step_experiment"].values)
    dur = np.where(fittable(ds), np.asarray(ds["duration_us"].values, np.float64), np.nan)
    pf = np.asarray(ds["prefill_tokens"].values, np.float64)
    dc = np.asarray(ds["decode_tokens"].values, np.float64)
    exp_model = np.asarray(ds["exp_model"].values).astype(str)
    out = {name: np.full(step_exp.size, np.nan) for name in BASELINES}
    for e in np.unique(step_exp):
        sel = step_exp == e
        coef = blackbox_fit(pf[sel], dc[sel], dur[sel])
        out["blackbox"][sel] = blackbox_predict(coef, pf[sel], dc[sel])
    step_model = exp_model[step_exp]
    for m, coef in nnls_model_fits(ds, features).items():
        sel = np.nonzero(step_model == m)[0]
        out["nnls"][sel] = nnls_predict(coef, features.take(sel))
    return out


def nnls_model_fits(ds, features: StepFeatures) -> dict[str, np.ndarray]:
    """Per model of ``ds`` (``exp_model``), :func:`nnls_fit` on its sampled steps.

    ``features`` are the roofline terms of all steps of ``ds`` (same order). The
    coefficients map to BLIS betas with ``calib.predict.betas_from_params(coef[:6],
    *coef[6:])`` (prefill and decode added, as BLIS does).
    """
    step_exp = np.asarray(ds["step_experiment"].values)
    dur = np.where(fittable(ds), np.asarray(ds["duration_us"].values, np.float64), np.nan)
    step_model = np.asarray(ds["exp_model"].values).astype(str)[step_exp]
    fits = {}
    for m in np.unique(step_model):
        sel = np.nonzero(step_model == m)[0]
        fits[str(m)] = nnls_fit(features.take(sel), dur[sel])
    return fits
