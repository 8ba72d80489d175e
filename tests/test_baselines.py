"""Baselines: blackbox least squares and roofline NNLS recover their generating coefficients."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset

from calib.baselines import (
    baseline_step_predictions,
    blackbox_fit,
    blackbox_predict,
    nnls_fit,
    nnls_model_fits,
    nnls_predict,
)
from calib.predict import StepFeatures, betas_from_params, blis_step_time_us


def test_blackbox_recovers_linear_coefficients():
    rng = np.random.default_rng(0)
    pf = rng.integers(0, 2000, 300)
    dc = rng.integers(0, 128, 300)
    y = 5000.0 + 12.5 * pf + 30.0 * dc
    y[::7] = np.nan  # unsampled
    coef = blackbox_fit(pf, dc, y)
    np.testing.assert_allclose(coef, [5000.0, 12.5, 30.0], rtol=1e-9)
    np.testing.assert_allclose(blackbox_predict(coef, [0, 100], [10, 0]), [5300.0, 6250.0])
    assert np.isnan(blackbox_fit(pf[:2], dc[:2], y[:2])).all()


def test_nnls_recovers_non_negative_roofline_coefficients():
    rng = np.random.default_rng(1)
    n = 400
    comps = rng.uniform(0, 5000, (n, 6))
    comps[:, 5] = 0.0  # tp term absent (TP = 1): its coefficient must stay 0
    L = np.full(n, 32.0)
    B = rng.integers(1, 64, n).astype(float)
    f = StepFeatures(comps, L, B, np.zeros(n))
    truth = np.array([1.5, 0.8, 2.0, 1.3, 1.1, 0.0, 0.0, 4.0, 300.0])  # L/intercept collinear
    y = nnls_predict(truth, f)
    coef = nnls_fit(f, y)
    assert (coef >= 0).all()
    np.testing.assert_allclose(coef[:5], truth[:5], rtol=1e-6)
    np.testing.assert_allclose(coef[7], 4.0, rtol=1e-6)
    np.testing.assert_allclose(nnls_predict(coef, f), y, rtol=1e-8)


def test_baseline_step_predictions_cover_every_step():
    ds, features, truth = make_replay_dataset(seed=4, steps_per_exp=300, requests_per_exp=10)
    preds = baseline_step_predictions(ds, features)
    assert set(preds) == {"blackbox", "nnls"}
    for v in preds.values():
        assert v.shape == (ds.sizes["step"],) and np.isfinite(v).all()
    # both track the true durations within a few percent on average
    for v in preds.values():
        assert abs(np.mean(v) / np.mean(truth["true_step_us"]) - 1) < 0.05
    assert np.mean(np.abs(preds["nnls"] - truth["true_step_us"]) / truth["true_step_us"]) < 0.15
    pytest.importorskip("scipy")


def test_nnls_model_fits_are_blis_betas():
    """Per model, the NNLS fit mapped to BLIS betas predicts what the baseline predicts."""
    ds, features, _ = make_replay_dataset(seed=4, steps_per_exp=300, requests_per_exp=10)
    fits = nnls_model_fits(ds, features)
    models = np.asarray(ds["exp_model"].values).astype(str)
    assert sorted(fits) == sorted(set(models))
    step_model = models[np.asarray(ds["step_experiment"].values)]
    base = baseline_step_predictions(ds, features)["nnls"]
    for m, coef in fits.items():
        sel = np.nonzero(step_model == m)[0]
        f = features.take(sel)
        betas = betas_from_params(coef[:6], *coef[6:])
        np.testing.assert_allclose(blis_step_time_us(betas, f), base[sel], rtol=1e-9)
